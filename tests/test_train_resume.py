"""Runs replay: the same seed gives the same run, and resuming from a mid-epoch checkpoint
replays the uninterrupted run's losses exactly."""

import json
import os
import shutil

import pytest
import torch

from mvit.cli import main
from mvit.training import checkpoint as ckpt

COMMON = ["train", "--synthetic-size", "64", "16", "--batch-size", "8", "--epochs", "3", "--max-steps", "12",
          "--mixup", "0.8", "--cutmix", "1.0", "--drop-path", "0.2", "--ema-decay", "0.9", "--no-progress",
          "--seed", "3", "--threads", "1"]


def _losses(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}


def test_resume_mid_epoch_matches_uninterrupted(tmp_path):
    full = str(tmp_path / "full")
    assert main(COMMON + ["--output-dir", full, "--ckpt-every", "4", "--keep-ckpts", "10"]) == 0
    reference = _losses(full)
    assert sorted(reference) == list(range(1, 13))
    mid = [p for p in ckpt.list_checkpoints(full) if p.endswith(ckpt.checkpoint_name(0, 4))]
    assert mid, os.listdir(full)  # step 4 of 8 in epoch 0
    state = ckpt.load(mid[0])
    assert state["sampler"]["position"] == 32 and state["epoch"] == 0
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "ema", "rng", "step"}

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copy(mid[0], resumed)
    assert main(COMMON + ["--output-dir", resumed, "--resume", "auto"]) == 0
    again = _losses(resumed)
    assert sorted(again) == list(range(5, 13))  # crosses the epoch boundary at step 8
    for step, loss in again.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step
    with open(os.path.join(full, "result.json")) as f:
        a = json.load(f)
    with open(os.path.join(resumed, "result.json")) as f:
        b = json.load(f)
    assert a["val"] == b["val"]
    assert os.path.exists(os.path.join(full, "curves.png"))


def _with(argv, flag, value):
    """argv with flag's value replaced."""
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def test_same_seed_same_run_whatever_the_rng_state_before(tmp_path):
    """--seed fixes the initial weights too, not only the data: the global RNG is left in a
    different state before each run (as separate processes leave it) and the runs still agree."""
    runs = {}
    for name, rng_before, seed in (("a", 1, "3"), ("b", 2, "3"), ("c", 1, "4")):
        torch.manual_seed(rng_before)
        argv = _with(_with(COMMON, "--max-steps", "2"), "--seed", seed)
        assert main(argv + ["--output-dir", str(tmp_path / name)]) == 0
        runs[name] = _losses(str(tmp_path / name))
    assert sorted(runs["a"]) == [1, 2]
    assert runs["a"] == runs["b"]
    assert runs["c"][1] != runs["a"][1]  # another seed, another start (step 1's loss precedes any update)


SHORT = ["train", "--synthetic-size", "32", "8", "--batch-size", "16", "--threads", "1", "--no-progress",
         "--keep-ckpts", "0"]


def _one_line_error(capsys, *messages):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for message in messages:
        assert message in err, err


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tmp_path, capsys):
    # Pruning keeps the highest steps: the new run's own checkpoint was deleted, and eval and
    # --resume auto then took the old run's.
    out = str(tmp_path / "run")
    assert main(SHORT + ["--epochs", "2", "--output-dir", out]) == 0
    before = {p: os.path.getmtime(p) for p in ckpt.list_checkpoints(out)}
    capsys.readouterr()
    assert main(SHORT + ["--epochs", "1", "--output-dir", out]) == 2
    _one_line_error(capsys, f"--output-dir {out} already holds checkpoints of a run (checkpoint_e0002_s00000004.pt",
                    "give --resume auto to continue that run, or another --output-dir")
    assert {p: os.path.getmtime(p) for p in ckpt.list_checkpoints(out)} == before
    # resuming an earlier checkpoint of the folder: the later ones would outrank the new run's
    earlier = [p for p in before if p.endswith(ckpt.checkpoint_name(1, 2))][0]
    assert main(SHORT + ["--epochs", "2", "--output-dir", out, "--resume", earlier]) == 2
    _one_line_error(capsys, "is at step 2, but --output-dir", "holds later checkpoints (checkpoint_e0002_s00000004.pt)")


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, capsys, monkeypatch):
    # Two jobs given one --output-dir (or srun starting N copies of a command meant for torchrun)
    # both passed the check above before either had a checkpoint, then wrote the same names,
    # pruned each other's checkpoints and interleaved one log.
    out = str(tmp_path / "run")
    with ckpt.hold_output_dir(out):  # another run holds the folder (flock: any second open conflicts)
        assert main(SHORT + ["--output-dir", out, "--resume", "auto"]) == 2
        _one_line_error(capsys, f"--output-dir {out}: another run is training in it (pid {os.getpid()} on ")
        monkeypatch.setenv("SLURM_NTASKS", "4")
        assert main(SHORT + ["--output-dir", out]) == 2
        _one_line_error(capsys, "SLURM_NTASKS is 4 and torchrun did not start this process",
                        "Run torchrun under srun, one task per node")
        assert os.listdir(out) == [ckpt.LOCK_NAME]  # nothing written
    monkeypatch.delenv("SLURM_NTASKS")
    assert main(SHORT + ["--output-dir", out]) == 0  # free again, and after each run
    assert main(SHORT + ["--epochs", "2", "--output-dir", out, "--resume", "auto"]) == 0


def _lrs(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return {r["step"]: r["lr"] for r in map(json.loads, f) if r["kind"] == "train"}


def test_resume_follows_a_changed_schedule_and_says_so(tmp_path, capsys):
    # --epochs (and the other schedule settings) were silently replaced by the checkpoint's
    from mvit.training.optim import WarmupCosine

    out = str(tmp_path / "run")
    assert main(SHORT + ["--epochs", "2", "--output-dir", out]) == 0
    capsys.readouterr()
    assert main(SHORT + ["--epochs", "4", "--base-lr", "4e-3", "--output-dir", out, "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert "resuming with changed settings" in err and "--epochs 2 -> 4" in err and "--base-lr 0.008 -> 0.004" in err
    lrs = _lrs(out)
    assert sorted(lrs) == list(range(1, 9))
    peak = 4e-3 * 16 / 512  # 2 steps per epoch, 1 warmup epoch
    # the synthetic recipe's warmup start and end LRs (8e-6 and 8e-5 per 512) at this batch of 16
    extended = WarmupCosine(peak, 8, 2, start_lr=8e-6 * 16 / 512, end_lr=8e-5 * 16 / 512)
    for step in range(5, 9):  # the log's step s ran at schedule position s - 1
        assert lrs[step] == pytest.approx(extended.lr_at(step - 1), rel=1e-12), step
    assert lrs[5] > 5e-5  # the 2-epoch schedule had ended at min_lr (2.5e-6)


def test_resume_lists_changes_of_data_seed_ema_and_precision(tmp_path, capsys):
    # They applied without a word: --ema-decay 0 dropped the run's average from every later
    # checkpoint, another --seed reordered the rest of the epoch, --precision fp16 failed loading
    # the scaler state a bf16/fp32 run had saved ("The source state dict is empty").
    out = str(tmp_path / "run")
    assert main(SHORT + ["--epochs", "1", "--ema-decay", "0.9", "--drop-path", "0.3", "--output-dir", out]) == 0
    capsys.readouterr()
    assert main(SHORT + ["--epochs", "2", "--seed", "5", "--precision", "fp16", "--accum-steps", "2",
                         "--output-dir", out, "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    for change in ("--epochs 1 -> 2", "--seed 0 -> 5", "--ema-decay 0.9 -> 0.0", "--accum-steps 1 -> 2",
                   "--precision auto -> fp16", "--drop-path 0.3 -> 0.1"):  # back to mvit_tiny's rate
        assert change in err, (change, err)
    # the preset's own rate, given by value, is no change (the checkpoint's recipe says None)
    out2 = str(tmp_path / "run2")
    assert main(SHORT + ["--epochs", "1", "--output-dir", out2]) == 0
    capsys.readouterr()
    preset_rate = ckpt.load(ckpt.list_checkpoints(out2)[0])["model_config"].drop_path_rate
    assert main(SHORT + ["--epochs", "2", "--drop-path", str(preset_rate), "--output-dir", out2,
                         "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert "--drop-path" not in err, err


def _one_epoch_run(tmp_path, capsys):
    """A one-epoch synthetic run: its folder, its checkpoint's path and the checkpoint."""
    out = str(tmp_path / "run")
    assert main(SHORT + ["--epochs", "1", "--output-dir", out]) == 0
    capsys.readouterr()
    path = ckpt.list_checkpoints(out)[0]
    return out, path, ckpt.load(path)


def test_resume_lists_a_changed_epoch_length(tmp_path, capsys):
    # A change in the sampler's rules (the repeated-augmentation epoch became N x repeats long) or
    # a list edited under the same name changes the epoch's length with every argument unchanged;
    # the checkpoint records the length, so a resume says so.
    out, path, obj = _one_epoch_run(tmp_path, capsys)
    assert obj["steps_per_epoch"] == 2  # 32 videos, batches of 16
    assert main(SHORT + ["--epochs", "1", "--output-dir", out, "--resume", "auto"]) == 0
    assert "changed settings" not in capsys.readouterr().err  # nothing changed, nothing listed
    obj["steps_per_epoch"] = 1  # as saved by code whose sampler gave half the epoch
    ckpt.atomic_save(obj, path)
    assert main(SHORT + ["--epochs", "2", "--output-dir", out, "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert "resuming with changed settings" in err and "steps per epoch 1 -> 2" in err, err


def test_checkpoints_of_earlier_versions_read_in_todays_terms(tmp_path, capsys):
    # A checkpoint rewritten as earlier versions of `mvit train` wrote it: no steps_per_epoch, the
    # recipe's min_lr absolute and no warmup_start_lr, a config from before sampling_rate, and (a
    # synthetic run before 2026-12-07) the preset's stride 4 in its args. A resume listed
    # "--min-lr 1e-05 -> 8e-05" for an unchanged schedule and no change of the epoch's length;
    # mvit predict sampled its rendered-style clips every 4th frame.
    out, path, obj = _one_epoch_run(tmp_path, capsys)
    assert (obj["recipe"]["min_lr"], obj["recipe"]["warmup_start_lr"], obj["steps_per_epoch"]) == (8e-5, 8e-6, 2)
    del obj["steps_per_epoch"]
    obj["scheduler"]["total_steps"] = 1  # as if its epoch had been 1 step long (1 epoch)
    per_512 = 512 / obj["recipe"]["batch_size"]
    obj["recipe"]["min_lr"] /= per_512  # absolute, as before 2026-12-07
    obj["scheduler"]["start_lr"] = obj["recipe"].pop("warmup_start_lr") / per_512
    obj["args"]["sampling_rate"] = 4
    vars(obj["model_config"]).pop("sampling_rate")  # pickled before the field existed
    ckpt.atomic_save(obj, path)

    upgraded = ckpt.load_checked(path, "")
    assert upgraded["model_config"].sampling_rate == 1 and upgraded["args"]["sampling_rate"] == 1
    assert upgraded["steps_per_epoch"] == 1
    assert upgraded["recipe"]["min_lr"] == pytest.approx(8e-5) and upgraded["recipe"]["warmup_start_lr"] == pytest.approx(8e-6)
    assert main(SHORT + ["--epochs", "2", "--output-dir", out, "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert "steps per epoch 1 -> 2" in err and "--epochs 1 -> 2" in err, err
    assert "--min-lr" not in err and "--warmup-start-lr" not in err and "--sampling-rate" not in err, err

    # A run on real data whose config predates sampling_rate: the run's --sampling-rate, not the default 4.
    real = dict(obj, recipe=dict(obj["recipe"], synthetic=False), args=dict(obj["args"], sampling_rate=2))
    assert ckpt.upgrade(real)["model_config"].sampling_rate == 2
    # Published weights and today's checkpoints pass unchanged.
    assert ckpt.upgrade({"model": {}}) == {"model": {}}
    today = ckpt.load(os.path.join(out, ckpt.checkpoint_name(2, 4)))  # written by the resumed run
    assert ckpt.upgrade(dict(today)) == today


def test_a_resume_logs_each_step_once_and_sets_torn_checkpoints_aside(tmp_path, capsys):
    # Steps logged after the checkpoint a run resumes from were logged again (and plotted twice);
    # a newer checkpoint that does not load held one of the --keep-ckpts places, so pruning
    # deleted a good one instead.
    out = tmp_path / "run"
    argv = SHORT + ["--epochs", "2", "--output-dir", str(out)]
    assert main(argv) == 0  # 2 epochs of 2 steps, a checkpoint after each epoch
    whole = _losses(out)
    paths = ckpt.list_checkpoints(str(out))
    assert [ckpt.step_of(p) for p in paths] == [4, 2]
    os.unlink(paths[0])  # killed after logging steps 3 and 4, before the epoch's checkpoint
    torn = out / "checkpoint_e0009_s00000009.pt"
    torn.write_bytes(b"torn")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*checkpoint_e0009_s00000009.pt"):
        assert main(argv + ["--resume", "auto", "--keep-ckpts", "2"]) == 0
    assert "renamed the unreadable checkpoint_e0009_s00000009.pt" in capsys.readouterr().err
    assert os.path.exists(f"{torn}.unreadable") and not torn.exists()
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(str(out))] == [4, 2]  # the good one kept
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]  # once each
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4]
    assert _losses(out) == whole  # and replayed as the uninterrupted run
    assert [r["kind"] for r in records].count("result") == 1


def test_warmup_start_and_end_lrs_scale_with_the_batch_like_the_base_lr(tmp_path):
    """pySlowFast scales BASE_LR, WARMUP_START_LR and COSINE_END_LR alike with the machines; all
    three are per 512 clips here. 32 clips / batch 16 = 2 steps an epoch, 1 warmup epoch, 3 epochs."""
    from mvit.training.optim import WarmupCosine

    out = str(tmp_path / "run")
    assert main(SHORT + ["--epochs", "3", "--base-lr", "0.0512", "--warmup-start-lr", "0.00512", "--min-lr",
                         "0.000512", "--output-dir", out]) == 0
    lrs = _lrs(out)
    scale = 16 / 512
    schedule = WarmupCosine(0.0512 * scale, 6, 2, start_lr=0.00512 * scale, end_lr=0.000512 * scale)
    assert lrs[1] == pytest.approx(0.00512 * scale, rel=1e-12)  # the first step: the warmup's start
    for step in range(1, 7):
        assert lrs[step] == pytest.approx(schedule.lr_at(step - 1), rel=1e-12), step


def test_resuming_a_finished_run_keeps_its_metrics(tmp_path, capsys):
    # result.json said "val": {}: nothing was trained, so nothing was evaluated
    out = str(tmp_path / "run")
    assert main(SHORT + ["--epochs", "1", "--output-dir", out]) == 0
    with open(os.path.join(out, "result.json")) as f:
        first = json.load(f)
    assert first["val"]["videos"] == 8
    capsys.readouterr()
    assert main(SHORT + ["--epochs", "1", "--output-dir", out, "--resume", "auto"]) == 0
    assert "nothing left to train (epoch 1 of 1, step 2): evaluating the checkpoint" in capsys.readouterr().err
    with open(os.path.join(out, "result.json")) as f:
        again = json.load(f)
    assert again["val"] == first["val"] and again["val_shuffled_frames"] == first["val_shuffled_frames"]
    assert again["steps"] == 2
    # wall_s is the run's, over its processes: it held only the evaluation's seconds
    last = sorted(p for p in os.listdir(out) if p.endswith(".pt"))[-1]
    trained = torch.load(os.path.join(out, last), map_location="cpu", weights_only=False)["wall_s"]
    assert trained > 0 and again["wall_s"] >= round(trained, 1)


def test_resume_refuses_another_model_batch_size_or_file(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(SHORT + ["--epochs", "1", "--output-dir", out]) == 0
    [last] = ckpt.list_checkpoints(out)
    capsys.readouterr()
    resume = SHORT + ["--epochs", "2", "--output-dir", out, "--resume"]
    assert main(resume + ["auto", "--crop-size", "40"]) == 2  # was a size-mismatch traceback
    _one_line_error(capsys, f"--resume {last}: the checkpoint's model differs from this run's "
                            "(input_size (8, 32, 32) in the checkpoint, (8, 40, 40) now)")
    assert main(resume + ["auto", "--batch-size", "8"]) == 2
    _one_line_error(capsys, "the run was started with --batch-size 16, not 8")
    assert main(resume + ["auto", "--layer-decay", "0.5"]) == 2
    _one_line_error(capsys, "the run was started with --layer-decay 1.0, not 0.5")
    assert main(resume + ["auto", "--optimizer", "sgd"]) == 2  # other optimizer state
    _one_line_error(capsys, "the run was started with --optimizer adamw, not sgd")
    assert main(resume + ["auto", "--no-zero-decay-pos-cls"]) == 2  # other parameter groups
    _one_line_error(capsys, "the run was started with --zero-decay-pos-cls (the optimizer's parameter groups "
                            "differ): give --zero-decay-pos-cls")
    foreign = str(tmp_path / "weights.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    assert main(resume + [foreign]) == 2  # was KeyError: 'model'
    _one_line_error(capsys, f"--resume {foreign} is not a checkpoint written by `mvit train` (it has no 'model'")
    log = os.path.join(out, "log.jsonl")
    assert main(resume + [log]) == 2  # was an UnpicklingError traceback
    _one_line_error(capsys, f"--resume {log} cannot be read as a checkpoint (UnpicklingError: weights-only "
                            "unpickling refused it: Unsupported operand 123)")  # not torch's weights_only=False advice
    assert main(["eval", log]) == 2
    _one_line_error(capsys, f"{log} cannot be read as a checkpoint (UnpicklingError")
    assert main(["eval", foreign]) == 2
    _one_line_error(capsys, "is not a checkpoint written by `mvit train` (it has no 'model', 'model_config')")


def test_ema_added_on_resume_starts_from_the_resumed_weights(tmp_path):
    # it was copied from the freshly initialized model before the checkpoint was loaded
    out = str(tmp_path / "run")
    assert main(SHORT + ["--epochs", "1", "--output-dir", out]) == 0
    [first] = ckpt.list_checkpoints(out)
    resumed_weights = ckpt.load(first)["model"]
    assert main(SHORT + ["--epochs", "2", "--max-steps", "3", "--ema-decay", "0.999999", "--output-dir", out,
                         "--resume", "auto"]) == 0
    ema = ckpt.load(ckpt.list_checkpoints(out)[0])["ema"]
    for name, w in resumed_weights.items():
        if w.is_floating_point():
            assert torch.allclose(ema[name], w, atol=1e-4), name


def test_resume_mid_epoch_with_another_number_of_processes(tmp_path):
    # The data position is counted in one rank's samples: a 2-process run's mid-epoch checkpoint
    # resumed in one process skipped half the clips already trained on, and the epoch never ended
    # (the loop restarted it with no step left, rewriting the same checkpoint for ever). The
    # checkpoint below is what rank 0 of 2 writes after 3 steps of 4 + 4 clips (batch 8):
    # position 12; the weights are a 1-process run's, which step 3 of either run computes alike.
    argv = ["train", "--synthetic-size", "64", "4", "--batch-size", "8", "--epochs", "2", "--drop-path", "0",
            "--threads", "1", "--no-progress", "--max-steps", "8"]
    full = str(tmp_path / "full")
    assert main(argv + ["--output-dir", full, "--ckpt-every", "3", "--keep-ckpts", "0"]) == 0
    reference = _losses(full)
    [mid] = [p for p in ckpt.list_checkpoints(full) if p.endswith(ckpt.checkpoint_name(0, 3))]
    state = ckpt.load(mid)
    assert state["sampler"]["position"] == 24 and state["world_size"] == 1
    state["sampler"]["position"], state["world_size"], state["rng"] = 12, 2, state["rng"] * 2
    resumed = str(tmp_path / "resumed")
    ckpt.atomic_save(state, os.path.join(resumed, os.path.basename(mid)))
    # --max-steps 8, the epoch's last step, bounds the run of the old code, which never ended it
    assert main(argv + ["--output-dir", resumed, "--resume", "auto"]) == 0
    again = _losses(resumed)
    assert sorted(again) == [4, 5, 6, 7, 8]
    for step, loss in again.items():  # the same clips as the uninterrupted run's steps
        assert loss == pytest.approx(reference[step], abs=1e-6), step
    last = ckpt.load(ckpt.list_checkpoints(resumed)[0])
    assert (last["epoch"], last["step"], last["sampler"]["position"]) == (1, 8, 0)  # the epoch ended at step 8
