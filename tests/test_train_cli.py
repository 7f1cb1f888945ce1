"""Bad `mvit train` / `mvit eval` arguments give one clear line and exit status 2."""

import pytest

from mvit.cli import main


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "mvit_huge"], "unknown preset 'mvit_huge'"),
    (["train", "--data-root", "/nonexistent/videos"], "not found: /nonexistent/videos"),
    (["train", "--train-csv", "/nonexistent/train.csv"], "list file not found: /nonexistent/train.csv"),
    (["train", "--batch-size", "10", "--accum-steps", "4"], "not divisible"),
    (["train", "--rand-augment", "strong", "--data-root", "."], None),
    (["eval", "/nonexistent/checkpoint.pt"], "checkpoint not found"),
])
def test_bad_arguments(argv, message, capsys, tmp_path):
    if message is None:  # an existing root without train/: also a one-line error
        message = "data folder not found"
    assert main(argv + (["--output-dir", str(tmp_path)] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1


@pytest.fixture
def listed_videos(tmp_path):
    """Class folders and lists of (empty) video files: every check below fails before decoding."""
    for split in ("train", "val"):
        for cls in ("a", "b", "c"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                (tmp_path / split / cls / f"{i}.mp4").write_bytes(b"")
    lines = [f"train/{c}/{i}.mp4 {k}\n" for k, c in enumerate("abc") for i in range(2)]
    (tmp_path / "train.csv").write_text("".join(lines))
    return tmp_path


@pytest.mark.parametrize("extra, files, message", [
    # validation labels used to be taken as they came: never counted as hits (or "unreadable")
    (["--train-csv", "train.csv", "--val-csv", "val.csv"], {"val.csv": "val/a/0.mp4 0\nval/c/1.mp4 7\n"},
     "val.csv:2: label 7 is outside [0, 3) (3 classes, from the largest label in --train-csv"),
    (["--train-csv", "train.csv", "--val-csv", "val.csv", "--num-classes", "5"], {"val.csv": "val/a/0.mp4 5\n"},
     "val.csv:1: label 5 is outside [0, 5) (--num-classes 5)"),
    (["--train-csv", "ml.csv", "--val-csv", "val.csv", "--multi-label"],
     {"ml.csv": "train/a/0.mp4 0,1\ntrain/b/0.mp4 2\n", "val.csv": "val/a/0.mp4 1,3\n"},
     "val.csv:1: label 3 is outside [0, 3)"),
    (["--train-csv", "train.csv", "--num-classes", "2"], {},
     "train.csv:5: label 2 is outside [0, 2) (--num-classes 2)"),
    (["--data-root", "."], {"val.csv": "val/a/0.mp4 3\n"}, None),
    (["--data-root", ".", "--val-csv", "val.csv"], {"val.csv": "val/a/0.mp4 3\n"},
     "val.csv:1: label 3 is outside [0, 3) (3 class folders in --data-root)"),
    (["--data-root", ".", "--num-classes", "2"], {}, "--num-classes 2 is smaller than the 3 class folders"),
    # "label -1 is outside >= 0 (--num-classes None)"
    (["--train-csv", "neg.csv"], {"neg.csv": "train/a/0.mp4 0\ntrain/b/0.mp4 -1\n"},
     "neg.csv:2: label -1 is negative; class ids count from 0"),
    # a classifier of 10^20 classes failed inside nn.Linear, with a traceback
    (["--train-csv", "big.csv"], {"big.csv": "train/a/0.mp4 0\ntrain/b/0.mp4 99999999999999999999\n"},
     "the largest label in --train-csv big.csv is 99999999999999999999, which would make a classifier of "
     "100000000000000000000 classes; give --num-classes if that is meant"),
    (["--data-root", ".", "--multi-label"], {}, "--multi-label needs --train-csv"),
])
def test_labels_are_checked_against_the_classes(listed_videos, extra, files, message, capsys, monkeypatch):
    monkeypatch.chdir(listed_videos)
    for name, text in files.items():
        (listed_videos / name).write_text(text)
    if message is None:  # a valid setup gets past every check: stop it at the first decode
        from mvit.data import video

        def stop(*args, **kwargs):
            raise KeyError("stopped at the first decode")

        monkeypatch.setattr(video, "decode_frames", stop)
        with pytest.raises(KeyError):
            main(["train", "--workers", "0", "--batch-size", "2", "--output-dir", "run"] + extra)
        return
    assert main(["train", "--output-dir", "run"] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    # options the synthetic task has no use for were dropped without a word
    (["--rand-augment", "rand-m7-n4", "--crop-scale", "0.5", "1"],
     "the built-in synthetic task (no --train-csv or --data-root) does not use --rand-augment, --crop-scale: "
     "leave them out"),
    (["--random-erasing", "0.25", "--jitter-scales", "36", "40", "--sampling-rate", "2"],
     "does not use --sampling-rate, --jitter-scales, --random-erasing: leave them out"),
    (["--num-classes", "10", "--multi-label", "--test-clips", "3"],
     "does not use --test-clips, --multi-label, --num-classes"),
    (["--val-csv", "val.csv"], "--val-csv needs the training data too (--train-csv or --data-root)"),
    (["--preset", "mvitv2_t_image", "--data-root", ".", "--sampling-rate", "2", "--test-crops", "3"],
     "an image run does not use --sampling-rate, --test-crops"),
    (["--data-root", ".", "--synthetic-size", "8", "8"], "a video run does not use --synthetic-size"),
    # a moving square that leaves the frame: "high - low < 0" from numpy, or a broadcast error
    (["--num-frames", "16"], "the synthetic task needs --crop-size >= 3 * (--num-frames - 1) + 10 = 55 at 16 frames; "
                             "got 32 (the preset's)"),
    (["--num-frames", "4", "--crop-size", "16"], "= 19 at 4 frames; got 16"),
    # the synthetic recipe mixes nothing: these chose between two things that were both off
    (["--mixup-prob", "0.5", "--mixup-switch-prob", "0.2"], "does not use --mixup-prob, --mixup-switch-prob"),
])
def test_options_a_task_would_ignore(argv, message, capsys, tmp_path):
    if "--data-root" not in argv:  # a short run, should the check be missing
        argv = argv + ["--synthetic-size", "8", "0", "--batch-size", "8", "--max-steps", "1", "--no-progress"]
    assert main(["train"] + argv + ["--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_options_that_match_the_synthetic_task_are_accepted(tmp_path):
    # what the synthetic recipe does anyway is no conflict; nor are the recipe's own defaults
    assert main(["train", "--rand-augment", "none", "--random-erasing", "0", "--num-classes", "4", "--test-clips", "1",
                 "--synthetic-size", "8", "0", "--batch-size", "8", "--epochs", "1", "--threads", "1", "--no-progress",
                 "--output-dir", str(tmp_path / "run")]) == 0


def _short(argv):
    """argv plus what keeps a synthetic run short, where argv does not set it (should a check be missing)."""
    fast = {"--synthetic-size": ["8", "0"], "--batch-size": ["8"], "--max-steps": ["1"], "--epochs": ["1"]}
    return argv + [x for flag, value in fast.items() if flag not in argv for x in [flag] + value] + ["--no-progress"]


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),  # these two "succeeded", doing nothing
    (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
    (["--max-steps", "-1"], "--max-steps must be >= 0, got -1"),
    (["--eval-every", "0"], "--eval-every must be >= 1, got 0"),  # ZeroDivisionError after an epoch
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--threads", "-2"], "--threads must be >= 1, got -2"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "cpu:1"], "--device must be auto, cpu, cuda or cuda:N, got 'cpu:1'"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--ema-decay", "1.0"], "--ema-decay must be in [0, 1), got 1.0"),  # the EMA would never move
    (["--ema-decay", "-0.5"], "--ema-decay must be in [0, 1), got -0.5"),
    (["--sampling-rate", "0"], "--sampling-rate must be >= 1, got 0"),
    (["--synthetic-size", "0", "8"], "--synthetic-size needs TRAIN >= 1 and VAL >= 0 clips, got 0 8"),
    (["--layer-decay", "0"], "--layer-decay must be in (0, 1], got 0.0"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1), got 1.5"),
    (["--base-lr", "0"], "--base-lr must be > 0, got 0.0"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),  # torch's "expected non-negative integer"
    (["--seed", str(2**64)], "--seed must be in [0, 4294967295]"),  # "Overflow when unpacking long long"
    # mixup/cutmix of a one-clip micro-batch mixed each clip with itself
    (["--batch-size", "8", "--accum-steps", "8", "--cutmix", "1.0"],
     "leaves 1 clip per micro-batch: give --mixup 0 --cutmix 0, or a larger --batch-size"),
])
def test_values_out_of_range(argv, message, capsys, tmp_path):
    assert main(["train"] + _short(argv) + ["--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("flag", ["--base-lr", "--min-lr", "--weight-decay", "--mixup", "--warmup-epochs",
                                  "--target-fps"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_float_options_must_be_finite(flag, value, capsys, tmp_path):
    # --base-lr inf trained a NaN model to the end and reported success; --warmup-epochs inf an
    # OverflowError traceback; --mixup inf a NaN loss after the first step.
    with pytest.raises(SystemExit) as exit_:
        main(["train", f"{flag}={value}", "--output-dir", str(tmp_path / "run")])  # "-inf" alone reads as an option
    assert exit_.value.code == 2
    assert f"argument {flag}: expected a finite number, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_files_that_cannot_be_used_are_one_line_errors(capsys, tmp_path):
    # IsADirectoryError / FileExistsError / a UnicodeDecodeError without the path, as tracebacks
    folder = tmp_path / "lists"
    folder.mkdir()
    binary = tmp_path / "train.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    for argv, message in [
        (["--train-csv", str(folder), "--output-dir", str(tmp_path / "run")], "Is a directory"),
        (["--train-csv", str(binary), "--output-dir", str(tmp_path / "run")],
         f"{binary} is not a text list of 'path label' lines"),
        # "[Errno 17] File exists", naming no option
        (["--output-dir", str(binary)] + _short([]), f"--output-dir {binary} is a file, not a folder"),
        (["--output-dir", str(binary / "run")] + _short([]), f"--output-dir {binary / 'run'}: cannot create it (Not a directory)"),
        # "--data-root not found", of a path that is there
        (["--data-root", str(binary), "--output-dir", str(tmp_path / "run")], f"--data-root {binary} is a file, not a folder"),
    ]:
        assert main(["train"] + argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_one_clip_micro_batches_without_mixing_are_fine(tmp_path):
    assert main(["train"] + _short(["--batch-size", "2", "--accum-steps", "2", "--threads", "1"])
                + ["--output-dir", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--test-clips", "0"], "--test-clips must be >= 1, got 0"),  # was taken as the default, 10
    (["--sampling-rate", "0"], "--sampling-rate must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_eval_values_out_of_range(argv, message, capsys, tmp_path):
    assert main(["eval", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_image_runs_default_to_the_image_recipe_and_videos_to_kinetics():
    import argparse

    from mvit.train import IMAGE_RECIPE, PAPER_RECIPE, resolve_recipe

    def recipe(*argv):
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        import mvit.train

        mvit.train.add_parser(sub)
        return resolve_recipe(parser.parse_args(["train", *argv]))

    image = recipe("--preset", "mvitv2_s_image", "--data-root", ".")
    assert (image["epochs"], image["warmup_epochs"], image["base_lr"], image["repeated_aug"]) == (300, 70.0, 5e-4, 1)
    assert image["rand_augment"] == "rand-m9-n6-mstd0.5-inc1" == IMAGE_RECIPE["rand_augment"]
    assert image["zero_decay_pos_cls"] is False and recipe()["zero_decay_pos_cls"] is True  # synthetic: as measured
    assert recipe("--data-root", ".", "--zero-decay-pos-cls")["zero_decay_pos_cls"] is True
    assert recipe("--preset", "mvit_tiny", "--image-folders", "--data-root", ".")["epochs"] == 300
    video = recipe("--preset", "mvit_b_16x4", "--data-root", ".")
    assert video["rand_augment"] == "rand-m7-n4-mstd0.5-inc1" and video["repeated_aug"] == 2
    assert tuple(video["crop_scale"]) == (0.08, 1.0) == PAPER_RECIPE["crop_scale"]
    assert recipe("--data-root", ".", "--jitter-scales", "256", "320")["crop_scale"] is None
    assert recipe("--data-root", ".", "--crop-scale", "0.3", "1")["crop_scale"] == [0.3, 1.0]
    with pytest.raises(ValueError, match="--jitter-scales and --crop-scale choose between two ways of cropping"):
        recipe("--data-root", ".", "--jitter-scales", "256", "320", "--crop-scale", "0.3", "1")
    ssv2 = recipe("--preset", "mvitv2_s_16x4", "--data-root", ".", "--recipe", "ssv2")
    assert (ssv2["optimizer"], ssv2["weight_decay"], ssv2["epochs"], ssv2["warmup_epochs"]) == ("sgd", 1e-4, 100, 3.0)
    assert (ssv2["temporal_sampling"], ssv2["flip"], ssv2["crop_scale"], ssv2["inverse_uniform_jitter"]) == (
        "segments", False, None, True)
    assert ssv2["base_lr"] == pytest.approx(0.0025 * 512 / 16) and ssv2["drop_path"] == 0.4
    assert ssv2["clip_grad"] == 0 and video["clip_grad"] == image["clip_grad"] == 1.0  # SSv2 configs set none
    assert recipe("--data-root", ".", "--recipe", "ssv2", "--optimizer", "adamw")["optimizer"] == "adamw"
    assert recipe("--preset", "mvitv2_b_32x3", "--data-root", ".", "--recipe", "ssv2")["base_lr"] == pytest.approx(
        0.0015 * 512 / 16)  # its own config's LR
    assert recipe("--preset", "mvitv2_b_32x3", "--data-root", ".", "--recipe", "ssv2", "--base-lr", "0.01")[
        "base_lr"] == 0.01
    assert recipe("--preset", "mvitv2_b_32x3", "--data-root", ".")["base_lr"] == PAPER_RECIPE["base_lr"]
    large = recipe("--preset", "mvitv2_l_40x3", "--data-root", ".", "--recipe", "ssv2")  # SSv2/MVITv2_L_40x3.yaml
    assert (large["epochs"], large["clip_grad"], large["mixup_prob"], large["drop_path"]) == (40, 2.0, 0.0, 0.75)
    assert large["base_lr"] == pytest.approx(0.00125 * 512 / 8) and large["min_lr"] == pytest.approx(1e-6 * 512 / 8)
    assert recipe("--preset", "mvitv2_l_40x3", "--data-root", ".", "--recipe", "ssv2", "--epochs", "5")["epochs"] == 5
    assert recipe("--preset", "mvitv2_l_40x3", "--data-root", ".")["epochs"] == PAPER_RECIPE["epochs"]
    assert recipe("--preset", "mvitv2_s_image", "--data-root", ".", "--recipe", "kinetics")["epochs"] == 200


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "kinetics"], "the built-in synthetic task (no --train-csv or --data-root) does not use --recipe"),
    (["--data-root", ".", "--recipe", "ssv2", "--sampling-rate", "2"], "a video run does not use --sampling-rate"),
    (["--data-root", ".", "--inverse-uniform-jitter"], "a video run does not use --inverse-uniform-jitter"),
    (["--preset", "mvitv2_t_image", "--data-root", ".", "--temporal-sampling", "segments"],
     "an image run does not use --temporal-sampling"),
    (["--orientation", "display"], "the built-in synthetic task (no --train-csv or --data-root) does not use "
                                   "--orientation"),
])
def test_options_the_recipe_makes_unused(argv, message, tmp_path, capsys):
    assert main(["train", *argv, "--output-dir", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_video_runs_sample_frames_at_their_presets_stride():
    """pySlowFast's SAMPLING_RATE of each model: 3 for the 32x3 / 40x3 presets, 4 for 16x4; the run's
    --sampling-rate wins. (A default of 4 for every preset trained MViT-B 32x3 on 4/3 its span.)"""
    import argparse

    import mvit.train
    from mvit.train import check_options_used, resolve_recipe

    parser = argparse.ArgumentParser()
    mvit.train.add_parser(parser.add_subparsers())

    def rate(*argv):
        args = parser.parse_args(["train", "--data-root", ".", *argv])
        check_options_used(args, resolve_recipe(args))
        return args.sampling_rate

    assert [rate("--preset", p) for p in ("mvit_b_32x3", "mvitv2_b_32x3", "mvitv2_l_40x3", "mvit_b_64x3")] == [3] * 4
    assert rate("--preset", "mvit_b_16x4") == rate("--preset", "mvitv2_s_16x4") == 4
    assert rate("--preset", "mvitv2_b_32x3", "--sampling-rate", "2") == 2
