"""End to end on tiny videos: class folders with the paper recipe's augmentations and DataLoader
workers, fine-tuning from a synthetic-task checkpoint onto a new label set with layer-wise LR
decay, a multi-label (Charades-style) CSV run with mAP, and `mvit eval` multi-view on the result."""

import json
import os

import numpy as np
import pytest

av = pytest.importorskip("av")
from mvit.cli import main  # noqa: E402
from mvit.training import checkpoint as ckpt  # noqa: E402


def _video(path, seed, n=20, h=40, w=48):
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=30)
        s.width, s.height, s.pix_fmt = w, h, "yuv444p"
        for _ in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for split, count in (("train", 4), ("val", 2)):
        for k, cls in enumerate(("push", "pull", "spin")):
            os.makedirs(root / split / cls)
            for i in range(count):
                _video(root / split / cls / f"{i}.mkv", seed=hash((split, k, i)) % 1000)
    return root


SMALL = ["--num-frames", "8", "--crop-size", "32", "--jitter-scales", "32", "40", "--sampling-rate", "2",
         "--batch-size", "4", "--max-steps", "2", "--threads", "1", "--no-progress"]
# the papers' cropping (random resized crops) and RandAugment, the recipe's defaults
SMALL_PAPER_CROP = SMALL[:4] + SMALL[7:]
assert "--jitter-scales" not in SMALL_PAPER_CROP and "--crop-size" in SMALL_PAPER_CROP


def test_finetune_class_folders_new_head(video_root, tmp_path):
    pre = tmp_path / "pre"
    assert main(["train", "--synthetic-size", "16", "8", "--batch-size", "8", "--epochs", "1", "--threads", "1",
                 "--no-progress", "--output-dir", str(pre)]) == 0
    [pre_ck] = ckpt.list_checkpoints(str(pre))
    out = tmp_path / "ft"
    assert main(["train", "--data-root", str(video_root), "--finetune", pre_ck, "--layer-decay", "0.75",
                 "--workers", "1", "--test-clips", "2", "--test-crops", "3", "--output-dir", str(out)] + SMALL) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["val"]["videos"] == 6 and "top1" in result["val"]
    [ck] = ckpt.list_checkpoints(str(out))
    state = ckpt.load(ck)
    assert state["model"]["head.projection.weight"].shape[0] == 3 and state["classes"] == ["pull", "push", "spin"]
    pre_state = ckpt.load(pre_ck)["model"]
    assert pre_state["head.projection.weight"].shape[0] == 4
    # multi-view eval: 2 clips x 3 crops per video
    report = tmp_path / "eval.json"
    assert main(["eval", ck, "--data-root", str(video_root), "--test-clips", "2", "--test-crops", "3",
                 "--workers", "0", "--report", str(report)]) == 0
    ev = json.loads(report.read_text())
    assert ev["videos"] == 6 and ev["views_per_video"] == 6 and ev["top1"] == result["val"]["top1"]
    # the MViT papers' views by default: 5 clips x 1 crop
    assert main(["eval", ck, "--data-root", str(video_root), "--workers", "0", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["views_per_video"] == 5
    assert main(["eval", ck, "--data-root", str(video_root), "--crop-fraction", "0.9"]) == 2


def test_multi_label_csv(video_root, tmp_path):
    train_csv, val_csv = tmp_path / "train.csv", tmp_path / "val.csv"
    train_csv.write_text("".join(f"train/push/{i}.mkv 0,{1 + i % 3}\n" for i in range(4)))
    val_csv.write_text("val/spin/0.mkv 2,3\nval/pull/1.mkv 1\n")
    out = tmp_path / "ml"
    assert main(["train", "--train-csv", str(train_csv), "--val-csv", str(val_csv), "--data-root", str(video_root),
                 "--multi-label", "--workers", "0", "--output-dir", str(out)] + SMALL_PAPER_CROP) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["val"]["videos"] == 2 and 0 <= result["val"]["mAP"] <= 100
    # multi-view eval of a multi-label run combines the views' sigmoids by their max (pySlowFast's
    # Charades configs); --ensemble mean is there too
    report = tmp_path / "eval.json"
    for flag, ensemble in (([], "max"), (["--ensemble", "mean"], "mean")):
        assert main(["eval", str(out), "--val-csv", str(val_csv), "--data-root", str(video_root), "--workers", "0",
                     "--test-clips", "2", "--report", str(report)] + flag) == 0
        ev = json.loads(report.read_text())
        assert ev["ensemble"] == ensemble and ev["views_per_video"] == 2 and 0 <= ev["mAP"] <= 100


def test_val_csv_with_class_folders(video_root, tmp_path, capsys):
    # --val-csv was ignored when the training videos came from class folders
    val_csv = tmp_path / "val.csv"
    val_csv.write_text("val/spin/0.mkv 2\nval/pull/1.mkv 0\n")  # labels index the sorted folders
    out = tmp_path / "folders"
    assert main(["train", "--data-root", str(video_root), "--val-csv", str(val_csv), "--workers", "0",
                 "--output-dir", str(out)] + SMALL) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["val"]["videos"] == 2  # not the 6 of val/
    [ck] = ckpt.list_checkpoints(str(out))
    assert ckpt.load(ck)["model_config"].sampling_rate == 2  # the model records its clips' stride
    # `mvit eval` checks a list's labels against the checkpoint's classes
    val_csv.write_text("val/spin/0.mkv 2\nval/pull/1.mkv 3\n")
    capsys.readouterr()
    assert main(["eval", str(out), "--val-csv", str(val_csv), "--data-root", str(video_root)]) == 2
    err = capsys.readouterr().err
    assert f"{val_csv}:2: label 3 is outside [0, 3) (the checkpoint's model has 3 classes)" in err, err


def test_something_something_recipe(video_root, tmp_path):
    """--recipe ssv2: segment frames, SGD, no flips; mvit eval then tests 1 clip x 3 crops."""
    out = tmp_path / "ssv2"
    argv = ["--num-frames", "8", "--crop-size", "32", "--jitter-scales", "32", "40", "--batch-size", "4",
            "--max-steps", "2", "--threads", "1", "--no-progress", "--workers", "0"]
    assert main(["train", "--data-root", str(video_root), "--recipe", "ssv2", "--output-dir", str(out)] + argv) == 0
    [ck] = ckpt.list_checkpoints(str(out))
    state = ckpt.load(ck)
    assert state["recipe"]["temporal_sampling"] == "segments" and state["recipe"]["optimizer"] == "sgd"
    assert "momentum_buffer" in next(iter(state["optimizer"]["state"].values()))
    report = tmp_path / "eval.json"
    assert main(["eval", ck, "--data-root", str(video_root), "--workers", "0", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["views_per_video"] == 3
    assert main(["eval", ck, "--data-root", str(video_root), "--test-clips", "2"]) == 2


def test_something_something_download_layout(tmp_path, capsys):
    """Something-Something v2 as downloaded: <id>.webm videos and its JSON lists, read as
    pySlowFast reads them; the run keeps the class names, which mvit predict prints."""
    rng = np.random.default_rng(0)
    labels = {"Holding something": "0", "Pushing something from left to right": "1"}
    (tmp_path / "something-something-v2-labels.json").write_text(json.dumps(labels))
    entries = []
    for i in range(6):
        with av.open(str(tmp_path / f"{100 + i}.webm"), "w") as c:
            s = c.add_stream("libvpx-vp9", rate=12)
            s.width, s.height, s.pix_fmt = 48, 40, "yuv420p"
            for _ in range(14):
                frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), format="rgb24")
                for p in s.encode(frame):
                    c.mux(p)
            for p in s.encode(None):
                c.mux(p)
        template = "Holding [something]" if i % 2 else "Pushing [something] from left to right"
        entries.append({"id": str(100 + i), "template": template, "placeholders": ["x"]})
    (tmp_path / "something-something-v2-train.json").write_text(json.dumps(entries))
    (tmp_path / "something-something-v2-validation.json").write_text(json.dumps(entries[:2]))
    out = tmp_path / "run"
    assert main(["train", "--recipe", "ssv2", "--data-root", str(tmp_path),
                 "--train-csv", str(tmp_path / "something-something-v2-train.json"),
                 "--val-csv", str(tmp_path / "something-something-v2-validation.json"),
                 "--num-frames", "8", "--crop-size", "32", "--jitter-scales", "32", "40", "--batch-size", "2",
                 "--max-steps", "2", "--threads", "1", "--no-progress", "--workers", "0",
                 "--output-dir", str(out)]) == 0
    [ck] = ckpt.list_checkpoints(str(out))
    assert ckpt.load(ck)["classes"] == ["Holding something", "Pushing something from left to right"]
    capsys.readouterr()
    assert main(["predict", ck, str(tmp_path / "100.webm"), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["views"] == 3 and {r["label"] for r in result["top"]} == set(labels)


def test_resume_may_change_the_sampling_rate_and_says_so(video_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data-root", str(video_root), "--workers", "0", "--output-dir", str(out)] + SMALL) == 0
    capsys.readouterr()
    again = [a if a != "2" or SMALL[i - 1] != "--max-steps" else "3" for i, a in enumerate(SMALL)]
    again[again.index("--sampling-rate") + 1] = "3"
    assert main(["train", "--data-root", str(video_root), "--workers", "0", "--output-dir", str(out),
                 "--resume", "auto"] + again) == 0
    assert "--sampling-rate 2 -> 3" in capsys.readouterr().err
    newest = ckpt.list_checkpoints(str(out))[0]
    assert ckpt.load(newest)["model_config"].sampling_rate == 3


@pytest.mark.parametrize("flag, expected", [([], "stored"), (["--orientation", "display"], "display")])
def test_training_and_validation_read_the_orientation_asked_for(video_root, flag, expected):
    import argparse

    import mvit.train
    from mvit.data import build_datasets
    from mvit.train import check_options_used, resolve_recipe

    parser = argparse.ArgumentParser()
    mvit.train.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--data-root", str(video_root), *flag, *SMALL])
    recipe = resolve_recipe(args)
    check_options_used(args, recipe)
    data = build_datasets(args, recipe)
    assert data.train.spec.orientation == data.val.spec.orientation == expected


def _exit_of(tmp_path, argv):
    """(exit code, seconds, stderr) of ``mvit`` in a process of its own whose DataLoader workers
    outlast SIGTERM for 10 minutes, as they do for a minute after a stop signal."""
    import subprocess
    import sys
    import time

    script = ("import sys; import mvit.training.signals as s; s.WORKER_GRACE_S = 600; "
              "from mvit.cli import main; sys.exit(main(sys.argv[1:]))")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__))))
    return proc.returncode, time.time() - start, proc.stderr


def test_an_error_with_dataloader_workers_exits_without_waiting_out_their_grace(video_root, tmp_path):
    # The error's traceback kept the batch iterator alive until the interpreter's exit, where
    # multiprocessing stopped the workers with SIGTERM and waited: the stop signals' grace held
    # every such exit for a minute (here ten).
    run = tmp_path / "run"
    assert main(["train", "--data-root", str(video_root), "--output-dir", str(run), "--epochs", "1",
                 "--workers", "0"] + SMALL) == 0
    bad = tmp_path / "bad"
    for split in ("train", "val"):
        for cls in ("push", "pull", "spin"):
            os.makedirs(bad / split / cls)
            for i in range(2):
                (bad / split / cls / f"{i}.mkv").write_bytes(b"not a video")
    code, seconds, err = _exit_of(tmp_path, ["eval", str(run), "--data-root", str(bad), "--workers", "2"])
    assert code == 2 and "cannot read the video" in err and seconds < 120, err[-2000:]
    code, seconds, err = _exit_of(tmp_path, ["train", "--data-root", str(bad), "--output-dir", str(tmp_path / "r2"),
                                             "--workers", "2"] + SMALL)
    assert code == 1 and "could not be read" in err and seconds < 120, err[-2000:]
