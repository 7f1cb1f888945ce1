"""Image folders (ImageNet layout) for the image presets: a few training steps end to end."""

import json

import pytest
import torch

torchvision = pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402

from mvit.cli import main  # noqa: E402
from mvit.data.image import ImageFolderDataset, read_image  # noqa: E402


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
    x, _ = ImageFolderDataset(items, 32, train=True, rand_augment=(7, 2), erasing=0.25)[(0, 9)]
    assert x.shape == (3, 1, 32, 32)
    assert read_image(items[0][0]).shape == (3, 40, 52)


def test_train_image_preset(image_root, tmp_path):
    out = tmp_path / "img"
    assert main(["train", "--preset", "mvitv2_t_image", "--data-root", str(image_root), "--crop-size", "64",
                 "--batch-size", "4", "--max-steps", "2", "--workers", "0", "--threads", "1", "--no-progress",
                 "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["val"]["videos"] == 6


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


def test_num_classes_below_the_class_folders(image_root, tmp_path, capsys):
    # was a cryptic one_hot error ("Class values must be smaller than num_classes") in the first step
    assert main(["train", "--preset", "mvitv2_t_image", "--data-root", str(image_root), "--num-classes", "1",
                 "--output-dir", str(tmp_path)]) == 2
    assert "--num-classes 1 is smaller than the 2 class folders" in capsys.readouterr().err
