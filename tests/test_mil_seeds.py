"""``train-mil --seeds``: one run folder, the cross-validation once per init seed, summarised against an
independent computation from the per-seed predictions files (sklearn, numpy); resume per (seed, fold)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from mil.config import MILConfig, make_protocol
from mil.cv import run_cv
from mil_data import planted_cohort
from zoomfeat.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = (0, 1, 2)
FOLDS = (0, 1, 2)


def _config(paths: dict, out: Path, **overrides) -> MILConfig:
    return MILConfig(features=f"{paths['features']}@20x", labels=str(paths["labels"]), splits=str(paths["splits"]),
                     out=str(out), model="abmil", model_kwargs={"hidden": 8, "attn_dim": 4},
                     protocol=make_protocol("hipt", epochs=2, lr=5e-3), **overrides)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return planted_cohort(tmp_path_factory.mktemp("seeds"), n_slides=18, dim=6, sizes=(4, 8), folds=3)


@pytest.fixture(scope="module")
def three_seeds(cohort, tmp_path_factory):
    cfg = _config(cohort, tmp_path_factory.mktemp("run") / "run", seeds=SEEDS)
    return cfg, run_cv(cfg)


def _expected(run: Path, seeds=SEEDS, folds=FOLDS) -> dict:
    """Per (seed, fold) test metrics from seed_<s>/fold_<k>/predictions.csv with sklearn; per-seed means over
    folds; mean and standard deviation (ddof=1) over seeds of the per-seed means (numpy)."""
    per = {}
    for s in seeds:
        for k in folds:
            df = pd.read_csv(run / f"seed_{s}" / f"fold_{k}" / "predictions.csv")
            df = df[df.split == "test"]
            y, p = df.label.to_numpy(), df.prob_ILC.to_numpy()
            pred = (p >= 0.5).astype(int)
            per[(s, k)] = {"test_auc": roc_auc_score(y, p), "test_balanced_accuracy": balanced_accuracy_score(y, pred),
                           "test_accuracy": accuracy_score(y, pred),
                           "test_macro_f1": f1_score(y, pred, average="macro", labels=[0, 1], zero_division=0)}
    metrics = list(per[(seeds[0], folds[0])])
    seed_means = {s: {m: np.mean([per[(s, k)][m] for k in folds]) for m in metrics} for s in seeds}
    over = {m: (np.mean([seed_means[s][m] for s in seeds]), np.std([seed_means[s][m] for s in seeds], ddof=1))
            for m in metrics}
    return {"per": per, "seed_means": seed_means, "over": over}


def test_summary_matches_an_independent_computation_from_the_predictions(three_seeds):
    cfg, summary = three_seeds
    run = Path(cfg.out)
    want = _expected(run)
    saved = pd.read_csv(run / "summary.csv", dtype={"seed": str, "fold": str}).set_index(["seed", "fold"])
    for (s, k), metrics in want["per"].items():
        for m, v in metrics.items():
            assert saved.at[(str(s), str(k)), m] == pytest.approx(v, abs=1e-9), (s, k, m)
    for s, means in want["seed_means"].items():
        for m, v in means.items():
            assert saved.at[(str(s), "mean"), m] == pytest.approx(v, abs=1e-9)
    for m, (mean, std) in want["over"].items():
        assert saved.at[("mean", "mean"), m] == pytest.approx(mean, abs=1e-9)
        assert saved.at[("std", "mean"), m] == pytest.approx(std, abs=1e-9)
    assert want["over"]["test_auc"][1] > 0  # the seeds differ: the spread is not trivially zero
    assert json.loads((run / "config.json").read_text())["seeds"] == list(SEEDS)
    assert not (run / "fold_0").exists()  # several seeds: seed_<s>/fold_<k>/ only


def test_a_seed_of_a_multi_seed_run_is_the_one_seed_run_of_that_seed(three_seeds, cohort, tmp_path):
    cfg, _ = three_seeds
    run_cv(_config(cohort, tmp_path / "one", seed=1))
    for k in FOLDS:
        alone = pd.read_csv(tmp_path / "one" / f"fold_{k}" / "predictions.csv")
        within = pd.read_csv(Path(cfg.out) / "seed_1" / f"fold_{k}" / "predictions.csv")
        pd.testing.assert_frame_equal(alone, within)


def test_report_and_compare_show_the_spread_over_seeds(three_seeds, tmp_path):
    from mil.compare import build_comparison
    from mil.report import build_report

    cfg, _ = three_seeds
    run = Path(cfg.out)
    want = _expected(run)
    result = build_report(run, tmp_path / "rep", n_bootstrap=0)
    spread = result["spread"]["auc"]
    assert spread["seeds"]["mean"] == pytest.approx(want["over"]["test_auc"][0])
    assert spread["seeds"]["std"] == pytest.approx(want["over"]["test_auc"][1])
    for s in SEEDS:
        folds = [want["per"][(s, k)]["test_auc"] for k in FOLDS]
        assert spread["folds"][str(s)]["std"] == pytest.approx(np.std(folds, ddof=1))
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "mean ± std over seeds" in text and "seed 2: mean ± std over folds" in text
    (pair,) = build_comparison([run, run], tmp_path / "cmp", n_bootstrap=0)["comparisons"]
    assert pair["n_pairs"] == 9 and pair["pairs"] == [[s, k] for s in SEEDS for k in FOLDS]
    assert "paired on 9 (seed, fold) pair(s) (seeds 0, 1, 2)" in (tmp_path / "cmp" / "compare.md").read_text()


class _Stop(Exception):
    pass


def test_an_interrupted_multi_seed_run_resumes_to_the_uninterrupted_one(three_seeds, cohort, tmp_path, caplog):
    cfg, _ = three_seeds
    out = tmp_path / "resumed"
    done = []

    def stop_after_four(seed, fold, metrics):
        done.append((seed, fold))
        if len(done) == 4:
            raise _Stop  # killed after (0, 0), (0, 1), (0, 2), (1, 0)

    with pytest.raises(_Stop):
        run_cv(replace(cfg, out=str(out)), on_fold=stop_after_four)
    assert done == [(0, 0), (0, 1), (0, 2), (1, 0)] and not (out / "seed_1" / "fold_1").exists()
    (out / "seed_0" / "fold_2" / "metrics.json").unlink()  # and a finished fold's output lost as well
    caplog.clear()  # only the resumed run's lines (the first run's reach caplog when another test set the level)
    with caplog.at_level(logging.INFO, logger="zoomfeat"):
        run_cv(replace(cfg, out=str(out)), on_fold=lambda s, k, m: done.append((s, k)))
    assert done[4:] == [(0, 2), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]  # only the missing pairs were trained
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fold ")]
    assert len(lines) == 6 and all(re.fullmatch(r"fold \d/3 \(seed \d\): val AUC \S+, test AUC \S+, \d+ s", x)
                                   for x in lines), lines
    for s in SEEDS:
        for k in FOLDS:
            a = pd.read_csv(Path(cfg.out) / f"seed_{s}" / f"fold_{k}" / "predictions.csv")
            b = pd.read_csv(out / f"seed_{s}" / f"fold_{k}" / "predictions.csv")
            pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(pd.read_csv(Path(cfg.out) / "summary.csv"), pd.read_csv(out / "summary.csv"))


def test_resume_refuses_other_seeds_and_folders_of_another_layout(three_seeds, cohort, tmp_path):
    cfg, _ = three_seeds
    with pytest.raises(ConfigError, match=r"fold folders this run does not plan \(seed_0/fold_0"):
        run_cv(replace(cfg, seeds=(0,), seed=0))
    with pytest.raises(ConfigError, match="seed_2/fold_0"):
        run_cv(replace(cfg, seeds=(0, 1), seed=0))
    with pytest.raises(ConfigError, match="repeats a seed"):
        replace(cfg, seeds=(1, 1))


def test_seed_options_of_the_cli(cohort, tmp_path, capsys):
    import cli

    base = ["train-mil", "--features", f"{cohort['features']}@20x", "--labels", str(cohort["labels"]),
            "--splits", str(cohort["splits"]), "--out", str(tmp_path / "run"), "--epochs", "1"]
    assert cli.main([*base, "--seed", "1", "--seeds", "1,2"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert cli.main([*base, "--seeds", "1,x"]) == 2
    assert "--seeds takes numbers" in capsys.readouterr().err
    assert cli.main([*base, "--seeds", str(2**63)]) == 2
    assert "bad --seeds 9223372036854775808: a seed is an integer from 0 to 2^63-1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_model_of_each_seed_loads_and_reproduces_its_predictions(three_seeds):
    import torch

    from mil.bags import load_bag
    from mil.cv import load_fold_model

    cfg, _ = three_seeds
    for s in (0, 2):
        model, record = load_fold_model(cfg.out, 1, seed=s)
        preds = pd.read_csv(Path(cfg.out) / f"seed_{s}" / "fold_1" / "predictions.csv")
        with torch.no_grad():
            probs = [float(torch.softmax(model(load_bag(record.feature_spec, x).features[None]).logits, 1)[0, 1])
                     for x in preds.slide_id]
        assert np.allclose(probs, preds.prob_ILC, atol=1e-5)
    with pytest.raises(ConfigError, match="--seed 5: .* was trained with seeds 0,1,2"):
        load_fold_model(cfg.out, 1, seed=5)
