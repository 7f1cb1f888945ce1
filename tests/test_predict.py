"""mvit predict: the top classes of files, scored as mvit eval scores them, with class names."""

import argparse
import json

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
from PIL import Image  # noqa: E402

from mvit.cli import main  # noqa: E402


def _video(path, frames=40, h=36, w=44, seed=0, images=None, display_rotation=None):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (frames, h, w, 3), dtype=np.uint8) if images is None else images
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=30)
        s.width, s.height, s.pix_fmt = images.shape[2], images.shape[1], "yuv444p"
        if display_rotation is not None:
            s.set_display_rotation(display_rotation)
        for image in images:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return str(path)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert main(["train", "--synthetic-size", "16", "0", "--batch-size", "8", "--epochs", "1", "--threads", "1",
                 "--no-progress", "--output-dir", str(run)]) == 0
    return run


def test_video_top_classes_are_the_mean_softmax_over_the_papers_views(synthetic_run, tmp_path, capsys):
    from mvit.data.synthetic import SyntheticMotion
    from mvit.data.video import ClipSpec, VideoDataset
    from mvit.evaluate import load_model
    from mvit.training import checkpoint as ckpt

    clip = _video(tmp_path / "clip.mkv")
    capsys.readouterr()
    assert main(["predict", str(synthetic_run), clip, "--top-k", "10", "--json", "--device", "cpu"]) == 0
    [line] = capsys.readouterr().out.strip().splitlines()
    result = json.loads(line)
    assert result["input"] == clip and result["views"] == 5  # 5 clips x 1 crop
    top = result["top"]
    n = SyntheticMotion.num_classes
    assert len(top) == n and sorted(r["class"] for r in top) == list(range(n))  # --top-k above the classes
    assert [r["label"] for r in top] == [SyntheticMotion.classes[r["class"]] for r in top]  # the run's names
    probs = [r["prob"] for r in top]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)

    # the same number by hand: the run's model over pySlowFast's one-crop views, softmax averaged
    [path] = ckpt.list_checkpoints(str(synthetic_run))
    state = ckpt.load(path)
    model, _ = load_model(argparse.Namespace(checkpoint=path, source="mvit_kernels", preset=None, ema=False,
                                             fused=False))
    t, s = state["model_config"].input_size[:2]
    # the synthetic clips are consecutive frames: the run records stride 1, not the preset's 4
    assert state["model_config"].sampling_rate == 1
    spec = ClipSpec(frames=t, crop=s, stride=1, target_fps=30, jitter=(round(s * 256 / 224), round(s * 320 / 224)),
                    test_clips=5, test_crops=1)
    views, _ = VideoDataset([(clip, 0)], spec, False, n)[0]
    with torch.no_grad():
        expected = model.eval()(views).softmax(-1).mean(0)
    for r in top:
        assert r["prob"] == pytest.approx(float(expected[r["class"]]), abs=1e-5)

    capsys.readouterr()
    assert main(["predict", str(synthetic_run), clip, "--top-k", "2", "--test-clips", "2", "--test-crops", "3",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == clip and len(out) == 3 and out[1].split()[1] in SyntheticMotion.classes


def test_input_normalization_for_weights_whose_config_does_not_say_it(synthetic_run, tmp_path, capsys):
    """pySlowFast's SSv2 MViTv2-L weights expect ImageNet's mean and std in reverse channel order:
    --input-mean / --input-std replace the model's normalization in the views it scores."""
    import argparse

    from mvit.data import eval_views
    from mvit.evaluate import load_model

    clip = _video(tmp_path / "clip.mkv")
    mean, std = (0.406, 0.456, 0.485), (0.225, 0.224, 0.229)
    args = argparse.Namespace(checkpoint=str(synthetic_run), source="mvit_kernels", preset=None, ema=False,
                              fused=False, input_mean=list(mean), input_std=list(std), crop_fraction=None,
                              test_clips=1, test_crops=None, sampling_rate=None, target_fps=None,
                              temporal_sampling=None)
    _, state = load_model(args)
    views = eval_views(args, state, [(clip, 0)], image=False)
    assert (views.spec.mean, views.spec.std) == (mean, std)
    default = eval_views(args, dict(state, model_config=state["model_config"].replace(input_mean=None, input_std=None)),
                         [(clip, 0)], image=False)
    m, s = torch.tensor(mean).view(3, 1, 1, 1), torch.tensor(std).view(3, 1, 1, 1)
    k = torch.tensor(0.45), torch.tensor(0.225)
    torch.testing.assert_close(views[0][0][0] * s + m, default[0][0][0] * k[1] + k[0])  # the same pixels
    capsys.readouterr()
    base = ["predict", str(synthetic_run), clip, "--json", "--device", "cpu", "--test-clips", "1"]
    assert main(base + ["--input-mean", *map(str, mean), "--input-std", *map(str, std)]) == 0
    assert main(base) == 0
    given, plain = (json.loads(line)["top"] for line in capsys.readouterr().out.strip().splitlines())
    assert [r["prob"] for r in given] != [r["prob"] for r in plain]
    assert main(base + ["--input-mean", "0.4", "0.4", "0.4"]) == 2
    assert "--input-mean and --input-std go together" in capsys.readouterr().err
    assert main(base + ["--input-mean", "0.4", "0.4", "0.4", "--input-std", "0", "1", "1"]) == 2
    assert "input_std entries must be > 0" in capsys.readouterr().err


def test_image_weights_get_imagenet_names(tmp_path, capsys):
    from safetensors.torch import save_file
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    torch.manual_seed(0)
    source = MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1), img_size=64,
                           num_classes=1000).eval()
    weights = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(weights))
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(photo)
    capsys.readouterr()
    assert main(["predict", str(weights), str(photo), "--source", "timm", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["views"] == 1 and len(result["top"]) == 5
    assert all(r["label"] == _IMAGENET_CATEGORIES[r["class"]] for r in result["top"])
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"thing {i}\n" for i in range(1000)))
    capsys.readouterr()
    assert main(["predict", str(weights), str(photo), "--source", "timm", "--labels", str(labels), "--top-k", "1",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split("  ")[-1].startswith("thing ")
    as_json = tmp_path / "labels.json"  # Something-Something's form: {name: number as a string}
    as_json.write_text(json.dumps({f"thing {i}": str(999 - i) for i in range(1000)}))
    capsys.readouterr()
    assert main(["predict", str(weights), str(photo), "--source", "timm", "--labels", str(as_json), "--json",
                 "--device", "cpu"]) == 0
    assert all(r["label"] == f"thing {999 - r['class']}" for r in json.loads(capsys.readouterr().out)["top"])


def test_bad_inputs_are_one_line_errors(synthetic_run, tmp_path, capsys):
    clip = _video(tmp_path / "clip.mkv")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 4)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    for argv, message in (
        ([str(tmp_path / "missing.mp4")], "input not found"),
        ([str(tmp_path)], f"input {tmp_path} is a folder: give the video or image files in it"),  # was "not found"
        ([str(tmp_path / "notes.txt")], "not a video (.mp4"),
        ([clip, "--top-k", "0"], "--top-k must be >= 1"),
        ([clip, "--labels", str(labels)], "names 2 classes; the model has 4"),
        ([clip, "--crop-fraction", "0.9"], "does not use --crop-fraction"),
        ([str(tmp_path / "broken.mp4")], "cannot read"),
    ):
        capsys.readouterr()
        assert main(["predict", str(synthetic_run), *argv, "--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], (argv, err)


def test_a_video_for_an_image_model_is_an_error(tmp_path, capsys):
    from mvit import build_model
    from mvit.training import checkpoint as ckpt

    model = build_model("mvitv2_t_image", input_size=(1, 64, 64), num_classes=3)
    path = tmp_path / "img.pt"
    torch.save({"model": model.state_dict(), "model_config": model.cfg}, path)
    assert ckpt.load(str(path))["model_config"].patch_2d
    clip = _video(tmp_path / "clip.mkv")
    assert main(["predict", str(path), clip]) == 2
    assert "mvitv2_t_image is an image model: " in capsys.readouterr().err


def test_an_image_for_a_video_model_is_scored_with_a_note(synthetic_run, tmp_path, capsys):
    # Allowed (a one-frame clip), but it printed predictions as if nothing were unusual.
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photo)
    capsys.readouterr()
    assert main(["predict", str(synthetic_run), str(photo), "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    assert "is a video model: " in captured.err and "scored as a one-frame clip" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["views"] == 1


def test_the_python_api_scores_as_the_command_does(synthetic_run, tmp_path, capsys):
    from mvit.evaluate import load_model
    from mvit.predict import predict
    from mvit.training import checkpoint as ckpt

    clips = [_video(tmp_path / "a.mkv", seed=1), _video(tmp_path / "b.mkv", seed=2)]
    capsys.readouterr()
    assert main(["predict", str(synthetic_run), *clips, "--top-k", "3", "--test-clips", "2", "--json",
                 "--device", "cpu"]) == 0
    command = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    # a run folder, as the command takes it; nothing printed
    assert predict(synthetic_run, clips, top_k=3, test_clips=2, device="cpu") == command
    assert capsys.readouterr().out == ""

    # a model object: its views come from its config, and it is left on its device, in its mode
    [path] = ckpt.list_checkpoints(str(synthetic_run))
    model, _ = load_model(argparse.Namespace(checkpoint=path, source="mvit_kernels", preset=None, ema=False,
                                             fused=False))
    model.train()
    names = [f"class {i}" for i in range(model.cfg.num_classes)]
    got = predict(model, clips[0], labels=names, top_k=3, test_clips=2)
    assert model.training
    assert [r["label"] for r in got[0]["top"]] == [names[r["class"]] for r in command[0]["top"]]
    for mine, theirs in zip(got[0]["top"], command[0]["top"]):
        assert mine["class"] == theirs["class"] and mine["prob"] == pytest.approx(theirs["prob"], abs=1e-6)


def test_the_python_api_checks_its_options_as_the_command_does(synthetic_run, tmp_path):
    from mvit import build_model
    from mvit.predict import predict

    clip = _video(tmp_path / "clip.mkv")
    with pytest.raises(TypeError, match="unexpected keyword argument 'top'"):
        predict(synthetic_run, clip, top=3)  # argparse would have taken it for --top-k
    with pytest.raises(TypeError, match="unexpected keyword argument 'json'"):
        predict(synthetic_run, clip, json=True)
    with pytest.raises(ValueError, match=r"predict\(\): argument --test-crops: invalid choice"):
        predict(synthetic_run, clip, test_crops=2)
    with pytest.raises(ValueError, match="--top-k must be >= 1"):
        predict(synthetic_run, clip, top_k=0)
    with pytest.raises(FileNotFoundError, match="input not found"):
        predict(synthetic_run, str(tmp_path / "missing.mp4"))
    with pytest.raises(ValueError, match="inputs: give at least one file"):
        predict(synthetic_run, [])
    # os.fspath's and list()'s TypeErrors named neither argument
    with pytest.raises(TypeError, match="model must be an MViT or the path of a checkpoint or run folder, got NoneType"):
        predict(None, clip)
    with pytest.raises(TypeError, match=r"inputs must be a path or a list of paths \(of video or image files\), got NoneType"):
        predict(synthetic_run, None)
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a path \(of a video or image file\), got Tensor"):
        predict(synthetic_run, [clip, torch.zeros(3)])
    assert len(predict(synthetic_run, (p for p in [clip]))) == 1  # any iterable of paths
    model = build_model("mvit_tiny", num_classes=4, input_size=(8, 32, 32))
    with pytest.raises(ValueError, match=r"labels names 2 classes; the model has 4"):
        predict(model, clip, labels=["a", "b"])
    with pytest.raises(ValueError, match=r"source= reads weights from a file; the model is given"):
        predict(model, clip, source="timm")
    with pytest.raises(ValueError, match="--input-mean and --input-std go together"):
        predict(model, clip, input_mean=(0.4, 0.4, 0.4))
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photo)
    with pytest.warns(UserWarning, match="is a video model: .* is scored as a one-frame clip"):
        [result] = predict(model, photo, input_mean=(0.5, 0.5, 0.5), input_std=(0.2, 0.2, 0.2))
    assert result["views"] == 1 and result["top"][0]["label"] is None


def test_a_phone_video_is_scored_as_players_show_it(synthetic_run, tmp_path):
    # A phone held upright stores its frames on their side, with a display matrix that turns
    # them clockwise. Scored as stored, the model saw the scene on its side.
    from mvit.predict import predict

    landscape = np.random.default_rng(3).integers(0, 255, (40, 36, 44, 3), dtype=np.uint8)
    phone = _video(tmp_path / "phone.mkv", images=landscape, display_rotation=-90)
    upright = _video(tmp_path / "upright.mkv", images=np.ascontiguousarray(landscape.transpose(0, 2, 1, 3)[:, :, ::-1]))
    shown = predict(synthetic_run, phone, top_k=3, device="cpu")[0]["top"]
    assert shown == predict(synthetic_run, upright, top_k=3, device="cpu")[0]["top"]
    as_stored = predict(synthetic_run, phone, top_k=3, device="cpu", orientation="stored")[0]["top"]
    assert [r["prob"] for r in as_stored] != pytest.approx([r["prob"] for r in shown], abs=1e-3)
