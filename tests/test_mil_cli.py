"""``zoomfeat train-mil`` through the real CLI dispatcher."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import cli
from mil_data import planted_cohort

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_train_mil_cli_runs_resumes_and_reports_errors(tmp_path, capsys):
    paths = planted_cohort(tmp_path / "c", n_slides=20, dim=8, sizes=(4, 9))
    args = ["train-mil", "--task", "subtyping", "--features", f"{paths['features']}@20x", "--model", "dsmil",
            "--labels", str(paths["labels"]), "--splits", str(paths["splits"]), "--out", str(tmp_path / "run"),
            "--protocol", "simil", "--epochs", "2", "--lr", "1e-3", "--seed", "3",
            "--model-kwargs", '{"query_dim": 8}']
    assert cli.main([*args, "--folds", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "mean" in out and "summary.csv" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["protocol"] == {"name": "simil", "lr": 1e-3, "weight_decay": 5e-3, "epochs": 2,
                                            "selection": "val_auc", "patience": None, "min_epochs": 1}
    assert config["config"]["model_kwargs"] == {"query_dim": 8} and config["config"]["folds"] == [0, 1]
    summary = pd.read_csv(tmp_path / "run" / "summary.csv", dtype=str)
    assert list(summary.fold) == ["0", "1", "mean", "std", "mean", "mean"]
    assert list(summary.seed) == ["3", "3", "3", "3", "mean", "std"]
    assert list(summary.columns) == ["seed", "fold", "test_auc", "test_balanced_accuracy", "test_accuracy",
                                     "test_macro_f1"]
    assert config["seeds"] == [3] and "init seeds" in {row["setting"] for row in config["plan"]}
    assert cli.main([*args, "--folds", "0,1,2"]) == 0  # resumes: folds 0 and 1 are skipped
    assert (tmp_path / "run" / "fold_2" / "metrics.json").is_file()

    bad = ["train-mil", "--features", str(paths["features"]), "--labels", str(paths["labels"]),
           "--splits", str(paths["splits"]), "--out", str(tmp_path / "bad")]
    assert cli.main(bad) == 2
    assert "lacks a magnification" in capsys.readouterr().err
    assert cli.main([*bad[:2], f"{paths['features']}@20x", *bad[3:], "--folds", "7"]) == 2
    assert "--folds 7 not in" in capsys.readouterr().err
    assert cli.main([*bad[:2], f"{paths['features']}@20x", *bad[3:], "--model-kwargs", "[1]"]) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_train_mil_user_errors_are_one_line(tmp_path, capsys):
    paths = planted_cohort(tmp_path / "c", n_slides=10, dim=4, sizes=(4, 6), folds=2)
    feats, labels, splits = str(paths["features"]), str(paths["labels"]), str(paths["splits"])

    def error(features=f"{feats}@20x", labels=labels, extra=()):
        code = cli.main(["train-mil", "--features", features, "--labels", labels, "--splits", splits,
                         "--out", str(tmp_path / "run"), "--epochs", "1", *extra])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
        return lines[0]

    assert "nope.csv" in error(labels=str(tmp_path / "nope.csv"))
    assert "unknown magnification '7x'" in error(features=f"{feats}@7x")
    assert f"write {feats}@20x+5x" in error(features=f"{feats}@5x+20x")
    assert "feature folder" in error(features=f"{tmp_path / 'absent'}@20x")
    assert "unknown model 'nomil'" in error(extra=("--model", "nomil"))
    assert "unknown protocol 'fast'" in error(extra=("--protocol", "fast"))
    assert "unknown task 'grading'" in error(extra=("--task", "grading"))
    assert not (tmp_path / "run").exists()
