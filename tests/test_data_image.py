"""Image folders (ImageNet layout) for the image presets: a few training steps end to end."""

import json

import pytest
import torch

torchvision = pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402

from mvit.cli import main  # noqa: E402
from mvit.data.image import ImageFolderDataset, read_image  # noqa: E402
from mvit.data.rand_augment import parse  # noqa: E402


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                img = torch.randint(0, 256, (3, 40, 52), dtype=torch.uint8, generator=g)
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / split / cls / f"{i}.png")
    (root / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    return root


def test_image_dataset_shapes(image_root):
    items = [(str(image_root / "val" / "cat" / "0.png"), 0)]
    x, y = ImageFolderDataset(items, 32, train=False)[0]
    assert x.shape == (1, 3, 1, 32, 32) and y == 0  # one view of a one-frame clip
    x, _ = ImageFolderDataset(items, 32, train=True, rand_augment=parse("rand-m7-n2-mstd0.5-inc1"),
                                erasing=0.25)[(0, 9)]
    assert x.shape == (3, 1, 32, 32)
    assert read_image(items[0][0]).shape == (3, 40, 52)


def test_unreadable_training_images_are_replaced_and_named(image_root, tmp_path, caplog):
    good = str(image_root / "train" / "cat" / "0.png")
    broken = str(image_root / "train" / "dog" / "broken.png")
    truncated = tmp_path / "truncated.png"  # a valid header, half of the data: Pillow fails on load
    truncated.write_bytes((image_root / "train" / "cat" / "1.png").read_bytes()[:300])
    items = [(broken, 1), (str(truncated), 1), (good, 0)]
    data = ImageFolderDataset(items, 32, train=True, max_retries=50)
    with caplog.at_level("WARNING", logger="mvit.data"):
        for seed in range(4):
            x, y = data[(seed % 2, seed)]
            assert x.shape == (3, 1, 32, 32) and y == 0  # only the good image can come back
    assert f"unreadable image {broken} (UnidentifiedImageError" in caplog.text
    assert f"unreadable image {truncated} (OSError" in caplog.text
    with pytest.raises(RuntimeError, match=r"3 images in a row could not be read; last: .*(broken|truncated)"):
        ImageFolderDataset(items[:2], 32, train=True, max_retries=2)[(0, 0)]


def test_train_image_preset(image_root, tmp_path, capsys):
    out = tmp_path / "img"
    assert main(["train", "--preset", "mvitv2_t_image", "--data-root", str(image_root), "--crop-size", "64",
                 "--batch-size", "4", "--max-steps", "2", "--workers", "0", "--threads", "1", "--no-progress",
                 "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["val"]["videos"] == 6  # the key's name for both
    err = capsys.readouterr().err
    assert "(6 images)" in err and "videos" not in err


@pytest.mark.parametrize("orientation, shown", [
    (6, lambda a: a.transpose(1, 0, 2)[:, ::-1]),  # turned 90 degrees clockwise to show: phones held upright
    (8, lambda a: a.transpose(1, 0, 2)[::-1]),  # counter-clockwise
    (3, lambda a: a[::-1, ::-1]),
    (2, lambda a: a[:, ::-1]),  # mirrored
    (1, lambda a: a),
])
def test_exif_orientation_with_display_orientation(tmp_path, orientation, shown):
    import numpy as np

    stored = np.random.default_rng(orientation).integers(0, 255, (9, 14, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation  # the EXIF Orientation tag
    path = tmp_path / "photo.png"  # lossless, with an eXIf chunk
    Image.fromarray(stored).save(path, exif=exif)
    as_stored = read_image(str(path)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(as_stored, stored)  # the default, as torchvision's and timm's loaders
    np.testing.assert_array_equal(read_image(str(path), display=True).permute(1, 2, 0).numpy(), shown(stored))
    views = ImageFolderDataset([(str(path), 0)], 8, False, crop_fraction=1.0, orientation="display")
    assert views[0][0].shape == (1, 3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"--orientation must be one of"):
        ImageFolderDataset([(str(path), 0)], 8, False, orientation="exif")


def test_16_bit_grayscale_png_is_scaled_to_8_bits(tmp_path):
    # convert("RGB") clipped every 16-bit value above 255: such images loaded almost white
    import numpy as np

    values = np.random.default_rng(0).integers(0, 65536, (9, 11)).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")
    x = read_image(str(path))
    assert x.shape == (3, 9, 11) and x.dtype == torch.uint8
    expected = torch.from_numpy(np.rint(values / 257.0).astype(np.uint8))
    assert all(torch.equal(x[c], expected) for c in range(3))


def test_image_lists_multi_label_and_eval(image_root, tmp_path):
    # --train-csv / --val-csv / --multi-label were ignored on the image path (class folders were
    # read instead), and `mvit eval --val-csv` of an image checkpoint failed with a TypeError
    train_csv, val_csv = tmp_path / "train.csv", tmp_path / "val.csv"
    train_csv.write_text("".join(f"train/{c}/{i}.png {k},2\n" for k, c in enumerate(("cat", "dog")) for i in range(3)))
    val_csv.write_text("val/cat/0.png 0\nval/dog/1.png 1,2\nval/dog/2.png 2\n")
    out = tmp_path / "ml"
    assert main(["train", "--preset", "mvitv2_t_image", "--train-csv", str(train_csv), "--val-csv", str(val_csv),
                 "--data-root", str(image_root), "--multi-label", "--crop-size", "64", "--batch-size", "2",
                 "--max-steps", "1", "--workers", "0", "--threads", "1", "--no-progress",
                 "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["val"]["videos"] == 3 and 0 <= result["val"]["mAP"] <= 100
    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--val-csv", str(val_csv), "--data-root", str(image_root), "--workers", "0",
                 "--report", str(report)]) == 0
    ev = json.loads(report.read_text())
    assert ev["videos"] == 3 and ev["mAP"] == result["val"]["mAP"]
    # one centre crop per image: video views are refused, not ignored
    assert main(["eval", str(out), "--val-csv", str(val_csv), "--data-root", str(image_root), "--test-crops", "3"]) == 2


def test_an_unreadable_test_image_stops_evaluation_naming_it(image_root, tmp_path, capsys):
    # It was replaced by another image, with that image's label: the metric counted one image
    # twice and reported the listed count. Training still replaces it (broken.png is in train/).
    out = tmp_path / "run"
    assert main(["train", "--preset", "mvitv2_t_image", "--data-root", str(image_root), "--crop-size", "64",
                 "--batch-size", "4", "--max-steps", "1", "--workers", "0", "--threads", "1", "--no-progress",
                 "--output-dir", str(out)]) == 0
    val_csv = tmp_path / "val.csv"
    val_csv.write_text("val/cat/0.png 0\ntrain/dog/broken.png 1\nval/dog/1.png 1\n")
    capsys.readouterr()
    # --workers 1: the error comes from a DataLoader worker, whose traceback the CLI leaves out
    assert main(["eval", str(out), "--val-csv", str(val_csv), "--data-root", str(image_root), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    broken = str(image_root / "train" / "dog" / "broken.png")
    assert f"cannot read the image {broken} (" in err, err
    assert "fix the file, remove it from the list, or pass --skip-unreadable" in err

    # --skip-unreadable: the metrics of the readable ones, as if the list lacked the broken line,
    # and the report lists what was left out
    clean_csv = tmp_path / "clean.csv"
    clean_csv.write_text("val/cat/0.png 0\nval/dog/1.png 1\n")
    reports = {}
    for name, csv, extra in (("skip", val_csv, ["--skip-unreadable"]), ("clean", clean_csv, [])):
        reports[name] = tmp_path / f"{name}.json"
        assert main(["eval", str(out), "--val-csv", str(csv), "--data-root", str(image_root), "--workers", "1",
                     "--batch-size", "2", "--report", str(reports[name])] + extra) == 0
    skipped, clean = (json.loads(reports[n].read_text()) for n in ("skip", "clean"))
    assert skipped["unreadable"] == [broken] and "unreadable" not in clean
    assert skipped["videos"] == clean["videos"] == 2
    assert (skipped["top1"], skipped["top5"]) == (clean["top1"], clean["top5"])
    assert "1 unreadable file(s) left out of the metrics" in capsys.readouterr().err


def test_training_validation_leaves_an_unreadable_file_out_and_lists_it(image_root, tmp_path, capsys):
    # As an error it ended the run at its first validation, before that epoch's checkpoint.
    train_csv, val_csv = tmp_path / "train.csv", tmp_path / "val.csv"
    train_csv.write_text("".join(f"train/{c}/{i}.png {k}\n" for k, c in enumerate(("cat", "dog")) for i in range(3)))
    val_csv.write_text("val/cat/0.png 0\ntrain/dog/broken.png 1\nval/dog/1.png 1\n")
    out = tmp_path / "run"
    assert main(["train", "--preset", "mvitv2_t_image", "--train-csv", str(train_csv), "--val-csv", str(val_csv),
                 "--data-root", str(image_root), "--crop-size", "64", "--batch-size", "2", "--max-steps", "1",
                 "--workers", "0", "--threads", "1", "--no-progress", "--output-dir", str(out)]) == 0
    broken = str(image_root / "train" / "dog" / "broken.png")
    result = json.loads((out / "result.json").read_text())
    assert result["val"]["videos"] == 2 and result["val"]["unreadable"] == [broken]
    assert "(2 images; 1 unreadable left out)" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert val and val[-1]["unreadable"] == [broken]


def test_num_classes_below_the_class_folders(image_root, tmp_path, capsys):
    # was a cryptic one_hot error ("Class values must be smaller than num_classes") in the first step
    assert main(["train", "--preset", "mvitv2_t_image", "--data-root", str(image_root), "--num-classes", "1",
                 "--output-dir", str(tmp_path)]) == 2
    assert "--num-classes 1 is smaller than the 2 class folders" in capsys.readouterr().err


def _photo(h, w, seed=0) -> torch.Tensor:
    """(3, H, W) uint8: smooth colour fields plus strong noise, detail that aliases when shrunk."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 15, generator=g) * 255, size=(h, w),
                                             mode="bicubic", align_corners=False)
    return (smooth + torch.randn(1, 3, h, w, generator=g) * 40).clamp(0, 255).round().to(torch.uint8)[0]


@pytest.mark.parametrize("fraction,size", [(0.875, (333, 410)), (0.875, (420, 300)), (0.9, (301, 377))])
def test_val_images_are_preprocessed_as_facebookresearch_mvit(tmp_path, fraction, size):
    """Its ImageNet val transform: Resize(int(224 / fraction), PIL bicubic), CenterCrop(224),
    ToTensor, Normalize. The former bilinear resize without antialiasing was 5.3 levels off on
    average here."""
    import numpy as np
    from torchvision import transforms as tv

    from mvit.data.image import IMAGENET_MEAN, IMAGENET_STD

    path = tmp_path / "photo.png"
    Image.fromarray(_photo(*size).permute(1, 2, 0).numpy()).save(path)
    x, _ = ImageFolderDataset([(str(path), 0)], 224, train=False, crop_fraction=fraction)[0]
    with Image.open(path) as img:
        ref = tv.Compose([tv.Resize(int(224 / fraction), interpolation=tv.InterpolationMode.BICUBIC),
                          tv.CenterCrop(224), tv.ToTensor(), tv.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    levels = ((x[0, :, 0] - ref) * std * 255).abs()  # back to 0..255 levels
    assert x.shape == (1, 3, 1, 224, 224)
    assert float(levels.mean()) < 0.5 and float(levels.max()) < 12, (float(levels.mean()), float(levels.max()))
    assert float(np.percentile(levels.numpy(), 99)) <= 3.01, float(np.percentile(levels.numpy(), 99))


def test_crop_fraction_must_be_a_fraction():
    with pytest.raises(ValueError, match=r"--crop-fraction must be in \(0, 1\], got 1.2"):
        ImageFolderDataset([], 224, train=False, crop_fraction=1.2)


def test_train_images_fill_with_the_imagenet_mean(tmp_path, monkeypatch):
    """timm's RandAugment (facebookresearch/mvit's training) fills uncovered pixels with the mean."""
    from mvit.data import image as image_module
    from mvit.data.image import IMAGENET_FILL

    assert IMAGENET_FILL == (124, 116, 104)
    seen = {}
    real = image_module.rand_augment

    def spy(img, spec, gen, fill):
        seen["fill"], seen["shape"] = fill, tuple(img.shape)
        return real(img, spec, gen, fill)

    monkeypatch.setattr(image_module, "rand_augment", spy)
    path = tmp_path / "photo.png"
    Image.fromarray(_photo(50, 70).permute(1, 2, 0).numpy()).save(path)
    ds = ImageFolderDataset([(str(path), 0)], 32, train=True, rand_augment=parse("rand-m9-n6-mstd0.5-inc1"))
    x, _ = ds[(0, 3)]
    assert seen == {"fill": IMAGENET_FILL, "shape": (1, 3, 32, 32)}  # after the crop, as timm
    assert torch.equal(x, ds[(0, 3)][0]) and not torch.equal(x, ds[(0, 4)][0])


def test_a_skipped_test_image_is_logged_without_the_advice_to_skip_it(image_root, caplog):
    # The warning repeated the error's advice ("... or pass --skip-unreadable") while skipping.
    from mvit.evaluate import _Indexed

    broken = str(image_root / "train" / "dog" / "broken.png")
    data = ImageFolderDataset([(broken, 1)], 32, train=False)
    with caplog.at_level("WARNING", logger="mvit.eval"):
        assert _Indexed(data, [0], shuffle_frames=False, skip_unreadable=True)[0] == (0, None, broken)
    assert f"skipping the unreadable file {broken} (UnidentifiedImageError: " in caplog.text
    assert "--skip-unreadable" not in caplog.text


@pytest.mark.parametrize("flag, expected", [([], "stored"), (["--orientation", "display"], "display")])
def test_image_training_and_validation_read_the_orientation_asked_for(image_root, flag, expected):
    import argparse

    import mvit.train
    from mvit.data import build_datasets
    from mvit.train import check_options_used, resolve_recipe

    parser = argparse.ArgumentParser()
    mvit.train.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--preset", "mvitv2_t_image", "--data-root", str(image_root), *flag])
    recipe = resolve_recipe(args)
    check_options_used(args, recipe)
    data = build_datasets(args, recipe)
    assert data.train.orientation == data.val.orientation == expected
