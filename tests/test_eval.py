"""Multi-view aggregation, top-k and mAP against hand computations; DDP sharding counts every
video exactly once."""

import math

import numpy as np
import pytest
import torch

from mvit.evaluate import (aggregate_views, mean_average_precision, metrics_from_scores, score_videos,
                           shuffle_views, topk_accuracy)


def test_average_of_softmax_over_views_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0]],  # softmax (.25,.75), (.75,.25)
                           [[0.0, 0.0], [0.0, math.log(4.0)]]])            # (.5,.5), (.2,.8)
    probs = aggregate_views(logits)
    assert torch.allclose(probs, torch.tensor([[0.5, 0.5], [0.35, 0.65]]))
    assert torch.allclose(aggregate_views(logits, ensemble="max"), torch.tensor([[0.75, 0.75], [0.5, 0.8]]))


def test_multi_label_views_combine_by_their_largest_sigmoid_as_pyslowfast_charades():
    # sigmoid(log 3) = .75, sigmoid(-log 3) = .25, sigmoid(0) = .5
    logits = torch.tensor([[[math.log(3.0), -math.log(3.0)], [0.0, 0.0], [-math.log(3.0), -math.log(3.0)]]])
    assert torch.allclose(aggregate_views(logits, multi_label=True), torch.tensor([[0.75, 0.5]]))
    assert torch.allclose(aggregate_views(logits, multi_label=True, ensemble="mean"), torch.tensor([[0.5, 1 / 3]]))
    with pytest.raises(ValueError, match="ensemble must be one of"):
        aggregate_views(logits, ensemble="sum")


def test_topk_by_hand():
    scores = np.array([[0.1, 0.5, 0.2, 0.2], [0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])
    labels = np.array([1, 2, 1])
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["top2"] == pytest.approx(100 / 3)  # video 1's label 2 ties at rank 2-4: stable order puts it 3rd
    assert acc["top5"] == 100.0  # k capped at the number of classes


def test_map_by_hand():
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.1, 0.6]])
    targets = np.array([[1, 0], [0, 1], [1, 0]])
    # class 0: ranking v0(+), v1(-), v2(+): AP = (1/1 + 2/3) / 2; class 1: v1(+) first: AP = 1
    assert mean_average_precision(scores, targets) == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1) / 2)


class _Videos(torch.utils.data.Dataset):
    """Video i has 3 views; its label is i % 4."""

    def __len__(self):
        return 11

    def __getitem__(self, i):
        torch.manual_seed(i)
        return torch.randn(3, 3, 2, 4, 4), i % 4


class _Model(torch.nn.Module):
    def forward(self, x):  # (B, 3, T, H, W) -> 4 logits, deterministic per view
        return x.flatten(1)[:, :4] * 3


def test_ddp_shards_count_each_video_once_and_match_hand_average():
    ds, model = _Videos(), _Model()
    single = score_videos(model, ds, 0, 1, "cpu", batch_size=4)
    shards = [score_videos(model, ds, r, 3, "cpu", batch_size=2) for r in range(3)]
    merged = [t for s in shards for t in s]
    assert sorted(i for i, _, _ in merged) == list(range(11))  # 11 videos over 3 ranks: no padding
    assert metrics_from_scores(merged, False) == metrics_from_scores(single, False)
    for i, s, y in merged:
        views, label = ds[i]
        by_hand = model(views).softmax(-1).mean(0).numpy()
        assert np.allclose(s, by_hand, atol=1e-6) and y == label
    with pytest.raises(RuntimeError, match="more than once"):
        metrics_from_scores(merged + merged[:1], False)
    assert metrics_from_scores(merged, False)["videos"] == 11


def test_shuffle_views_permutes_frames_reproducibly():
    views = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(2, 3, 8, 1, 1).contiguous()
    a, b = shuffle_views(views, 7), shuffle_views(views, 7)
    assert torch.equal(a, b)
    assert sorted(a[0, 0, :, 0, 0].tolist()) == list(range(8)) and not torch.equal(a, views)


def test_eval_of_a_synthetic_run_without_validation_clips(tmp_path):
    # trained with --synthetic-size N 0, `mvit eval` evaluated 0 videos and reported success
    import json

    from mvit.cli import main
    from mvit.train import SYNTHETIC_VAL_LENGTH

    run = tmp_path / "run"
    assert main(["train", "--synthetic-size", "8", "0", "--batch-size", "8", "--epochs", "1", "--threads", "1",
                 "--no-progress", "--output-dir", str(run)]) == 0
    assert json.loads((run / "result.json").read_text())["val"] == {}
    report = tmp_path / "eval.json"
    assert main(["eval", str(run), "--report", str(report)]) == 0
    ev = json.loads(report.read_text())
    assert ev["videos"] == SYNTHETIC_VAL_LENGTH and 0 <= ev["top1"] <= 100


def test_eval_of_a_synthetic_run_refuses_video_view_options(tmp_path, capsys):
    from mvit.cli import main

    run = tmp_path / "run"
    assert main(["train", "--synthetic-size", "8", "0", "--batch-size", "8", "--epochs", "1", "--threads", "1",
                 "--no-progress", "--output-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--test-clips", "5", "--sampling-rate", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the synthetic task's evaluation does not use --test-clips, --sampling-rate: leave them out" in err, err
    assert main(["eval", str(run), "--crop-fraction", "0.9"]) == 2
    assert "does not use --crop-fraction" in capsys.readouterr().err
    assert main(["eval", str(run), "--input-mean", "0.4", "0.4", "0.4", "--input-std", "0.2", "0.2", "0.2"]) == 2
    assert "does not use --input-mean, --input-std" in capsys.readouterr().err
    assert main(["eval", str(run), "--skip-unreadable"]) == 2  # rendered clips: nothing to skip
    assert "does not use --skip-unreadable" in capsys.readouterr().err


def test_a_run_with_ema_says_its_validation_scored_the_ema_weights(tmp_path, capsys):
    # the trainer validates the EMA weights, `mvit eval` the raw ones unless --ema: result.json
    # reported one model's accuracy and `mvit eval RUN` another's, with nothing saying so
    import json

    from mvit.cli import main

    run = tmp_path / "run"
    assert main(["train", "--synthetic-size", "16", "12", "--batch-size", "8", "--epochs", "1", "--ema-decay", "0.5",
                 "--threads", "1", "--no-progress", "--output-dir", str(run)]) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["ema"] is True
    assert "validation of the EMA weights top-1" in capsys.readouterr().out
    records = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert val and all(r["ema"] is True for r in val)
    report = tmp_path / "eval.json"
    assert main(["eval", str(run), "--ema", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["top1"] == result["val"]["top1"]
    capsys.readouterr()
    assert main(["eval", str(run), "--report", str(report)]) == 0
    assert "the checkpoint also holds EMA weights, which its run validated: --ema evaluates those" in \
        capsys.readouterr().err
    assert json.loads(report.read_text())["ema"] is False
    # Default report paths: the EMA's and the shuffled-frame scores do not overwrite the plain one.
    (ck,) = run.glob("checkpoint_*.pt")
    for flags in ([], ["--ema"], ["--shuffle-frames"], ["--ema", "--shuffle-frames"]):
        assert main(["eval", str(run)] + flags) == 0
    for suffix, ema, shuffled in (("", False, False), ("_ema", True, False), ("_shuffled", False, True),
                                  ("_ema_shuffled", True, True)):
        written = json.loads(ck.with_name(f"{ck.stem}_eval{suffix}.json").read_text())
        assert (written["ema"], written["shuffle_frames"]) == (ema, shuffled)


def test_eval_scores_at_the_runs_precision_unless_told(tmp_path, capsys):
    # A bf16 run validated (result.json) in bf16, and `mvit eval RUN` scored it again in fp32 (its
    # own "auto" on a CPU): the README says eval scores those weights again.
    import json

    from mvit.cli import main

    run = tmp_path / "run"
    assert main(["train", "--synthetic-size", "16", "24", "--batch-size", "8", "--epochs", "1", "--precision", "bf16",
                 "--threads", "1", "--no-progress", "--output-dir", str(run)]) == 0
    result = json.loads((run / "result.json").read_text())
    report = tmp_path / "eval.json"
    for flag, expected in ([], "bf16"), (["--precision", "fp32"], "fp32"):
        assert main(["eval", str(run), "--report", str(report)] + flag) == 0
        scored = json.loads(report.read_text())
        assert scored["precision"] == expected
        if expected == "bf16":
            assert (scored["top1"], scored["top5"]) == (result["val"]["top1"], result["val"]["top5"])
    # A run trained at the default "auto": the report names what it resolved to here (it said "auto").
    auto_run = tmp_path / "auto_run"
    assert main(["train", "--synthetic-size", "16", "24", "--batch-size", "8", "--epochs", "1", "--threads", "1",
                 "--no-progress", "--output-dir", str(auto_run)]) == 0
    assert main(["eval", str(auto_run), "--report", str(report)]) == 0
    assert json.loads(report.read_text())["precision"] == "fp32"


def test_eval_of_timm_weights_scores_what_timm_scores(tmp_path, capsys):
    """mvit eval WEIGHTS --source timm: the converted model on image folders gives the metrics
    timm's own model gives on the same preprocessed images."""
    import json

    from PIL import Image
    from safetensors.torch import save_file
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    from mvit.cli import main
    from mvit.data.image import ImageFolderDataset
    from mvit.data.video import class_folders

    g = torch.Generator().manual_seed(0)
    for cls in ("ant", "bee", "cat"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(4):
            img = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8, generator=g)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "val" / cls / f"{i}.png")
    torch.manual_seed(1)
    source = MultiScaleVit(MultiScaleVitCfg(depths=(1, 2, 1, 1), embed_dim=32, num_heads=2), img_size=64,
                           num_classes=3).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    weights = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(weights))

    items, _ = class_folders(str(tmp_path), "val", (".png",), None)
    dataset = ImageFolderDataset(items, 64, False, num_classes=3)
    triples = score_videos(lambda x: source(x[:, :, 0]), dataset, 0, 1, torch.device("cpu"), batch_size=5)
    expected = metrics_from_scores(triples, multi_label=False)

    report = tmp_path / "eval.json"
    assert main(["eval", str(weights), "--source", "timm", "--data-root", str(tmp_path), "--workers", "0",
                 "--report", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["source"] == "timm" and got["model"] == "mvitv2_image_1-2-1-1"
    assert {k: got[k] for k in expected} == expected
    assert 0 < expected["top1"] < 100  # the model tells some classes apart, not all

    capsys.readouterr()
    for extra, message in ((["--ema"], "--ema reads the EMA weights of a checkpoint of `mvit train`"),
                           ([], "give --val-csv or --data-root")):
        args = ["eval", str(weights), "--source", "timm", *extra]
        if extra:
            args += ["--data-root", str(tmp_path)]
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert main(["eval", str(weights), "--preset", "mvitv2_t_image", "--data-root", str(tmp_path)]) == 2
    assert "--preset goes with --source" in capsys.readouterr().err
