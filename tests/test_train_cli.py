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
