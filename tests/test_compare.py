"""``zoomfeat compare``: table, paired tests and split checks on fabricated runs, checked against scipy/sklearn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon
from sklearn.metrics import roc_auc_score

import cli
from mil.compare import build_comparison, feature_set_name
from mil.record import RunRecord
from test_report import assert_nontrivial_png, fabricate_run, parse_html
from zoomfeat.errors import DataError
from zoomfeat.features import FeatureSpec


def fold_aucs(run_dir: Path) -> dict[int, float]:
    out = {}
    for sub in sorted(run_dir.glob("fold_*")):
        df = pd.read_csv(sub / "predictions.csv")
        df = df[df["split"] == "test"]
        out[int(sub.name.split("_")[1])] = roc_auc_score(df["label"], df["prob"])
    return out


@pytest.fixture
def three_runs(tmp_path):
    a = fabricate_run(tmp_path / "zl_fused", seed=0, spec="/f/zoomldm_feats@20x+5x")
    b = fabricate_run(tmp_path / "uni20", seed=1, extractor="uni", spec="/f/uni_feats@20x")
    c = fabricate_run(tmp_path / "hrd", seed=2, task="hrd", extractor=None, spec="/f/ctranspath_feats@5x")
    return a, b, c


def test_feature_set_names():
    def record(spec, extractor=None):
        return RunRecord(config={}, task="t", label_map={"a": 0, "b": 1}, feature_spec=FeatureSpec.parse(spec), feature_dim=4,
                         split_source="s", split_fingerprints={}, inputs=None, extractor=extractor)

    assert feature_set_name(record("/x/feats@20x+5x", "zoomldm")) == "zoomldm@20x+5x"
    assert feature_set_name(record("feats@20x", "phikon")) == "phikon@20x"
    assert feature_set_name(record("/data/ctranspath_feats/@5x")) == "ctranspath_feats@5x"
    assert feature_set_name(record("/data/f@2_5x")) == "f@2.5x"


def test_comparison_numbers_and_files(three_runs, tmp_path):
    a, b, c = three_runs
    result = build_comparison([a, b, c], tmp_path / "cmp", reference=a, n_bootstrap=400)
    out = tmp_path / "cmp"
    saved = json.loads((out / "compare.json").read_text())
    assert saved["tasks"] == ["subtype", "hrd"]
    assert saved["feature_sets"] == ["zoomldm@20x+5x", "uni@20x", "ctranspath_feats@5x"]
    auc_a, auc_b = fold_aucs(a), fold_aucs(b)
    cell = saved["table"]["uni@20x"]["subtype"]
    assert cell["mean"] == pytest.approx(np.mean(list(auc_b.values())))
    assert cell["std"] == pytest.approx(np.std(list(auc_b.values()), ddof=1))
    assert "hrd" not in saved["table"]["uni@20x"]

    (pair,) = saved["comparisons"]  # hrd has a single run: nothing to pair
    diffs = [auc_b[k] - auc_a[k] for k in range(5)]
    assert list(pair["differences"].values()) == pytest.approx(diffs)
    assert pair["mean_difference"] == pytest.approx(np.mean(diffs))
    assert pair["wilcoxon_p"] == pytest.approx(wilcoxon(diffs).pvalue)
    ci = pair["bootstrap_ci95"]
    assert ci["low"] <= pair["mean_difference"] <= ci["high"] and ci["n_bootstrap"] == 400
    assert result["comparisons"][0]["wilcoxon_p"] == pair["wilcoxon_p"]

    page = parse_html(out / "compare.html")
    assert not page.external and len(page.images) == 2
    rows = {}
    for r in page.rows:
        if r:
            rows.setdefault(r[0], r)  # the first table's row of each feature set
    assert rows["uni@20x"][1].startswith(f"{np.mean(list(auc_b.values())):.3f} ± ")
    assert pair["n_pairs"] == 5 and pair["pairs"] == [[0, k] for k in range(5)] and rows["subtype"][3] == "5"
    metric_rows = [r for r in page.rows if r and r[0] == "uni@20x"]
    header = next(r for r in page.rows if r and r[0] == "feature set" and len(r) > 3)
    assert header[2:6] == ["AUC", "balanced accuracy", "accuracy", "macro F1"]
    assert metric_rows[1][2].startswith(f"{np.mean(list(auc_b.values())):.3f} ± ") and metric_rows[1][6] == "complete"
    assert "paired on 5 (seed, fold) pair(s)" in (out / "compare.md").read_text()
    assert rows["subtype"][7] == f"{wilcoxon(diffs).pvalue:.3f}"
    assert (out / "index.html").read_text() == (out / "compare.html").read_text()
    assert "| uni@20x |" in (out / "compare.md").read_text()
    for name in ("fold_auc_subtype.png", "fold_auc_hrd.png"):
        assert_nontrivial_png((out / name).read_bytes())


def test_identical_runs_have_no_wilcoxon(tmp_path):
    a = fabricate_run(tmp_path / "a", seed=0)
    b = fabricate_run(tmp_path / "b", seed=0)
    (pair,) = build_comparison([a, b], tmp_path / "cmp", n_bootstrap=50)["comparisons"]
    assert pair["wilcoxon_p"] is None and pair["mean_difference"] == 0
    assert pair["bootstrap_ci95"]["low"] == pair["bootstrap_ci95"]["high"] == 0


def test_different_splits_are_refused(tmp_path):
    a = fabricate_run(tmp_path / "a", seed=0)
    b = fabricate_run(tmp_path / "b", seed=1)
    config = json.loads((b / "config.json").read_text())
    config["split_fingerprints"]["3"] = "other"
    (b / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="folds 3 differ"):
        build_comparison([a, b], tmp_path / "cmp")
    # without fingerprints, the test slide ids of each fold decide
    for run in (a, b):
        config = json.loads((run / "config.json").read_text())
        config["split_fingerprints"] = {}
        (run / "config.json").write_text(json.dumps(config))
    preds = pd.read_csv(b / "fold_1" / "predictions.csv")
    preds.loc[preds.index[-1], "slide_id"] = "someone_else"
    preds.to_csv(b / "fold_1" / "predictions.csv", index=False)
    with pytest.raises(DataError, match="folds 1 differ"):
        build_comparison([a, b], tmp_path / "cmp")


def test_compare_cli(three_runs, tmp_path, capsys):
    a, b, _ = three_runs
    assert cli.main(["compare", str(a), str(b), "--out", str(tmp_path / "o"), "--n-bootstrap", "20"]) == 0
    assert "uni@20x" in capsys.readouterr().out and (tmp_path / "o" / "compare.json").is_file()


@pytest.mark.slow
def test_compare_real_train_mil_runs(tmp_path_factory):
    from test_heatmap import real_runs

    abmil, mean = real_runs(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("real_compare")
    result = build_comparison([abmil, mean], out, reference=abmil, n_bootstrap=100)
    assert result["tasks"] == ["custom"] and result["feature_sets"] == ["planted@20x", "planted@20x (mean)"]
    (pair,) = result["comparisons"]
    want = [b - a for a, b in zip(fold_aucs(abmil).values(), fold_aucs(mean).values())]
    assert list(pair["differences"].values()) == pytest.approx(want)
    nonzero = [d for d in want if d != 0]
    assert pair["wilcoxon_p"] == (pytest.approx(wilcoxon(want).pvalue) if len(nonzero) >= 2 else None)
    page = parse_html(out / "index.html")
    assert not page.external and any(r and r[0] == "planted@20x" for r in page.rows)
    assert_nontrivial_png((out / "fold_auc_custom.png").read_bytes())


def test_paired_ci_is_undefined_not_a_crash_when_shared_test_slides_lack_a_class(tmp_path):
    """Same split fingerprints, but run b scored other positive slides in fold 0 (e.g. features missing
    for a's): both fold AUCs exist, the paired bootstrap over the shared slides cannot."""
    a = fabricate_run(tmp_path / "a", seed=0)
    b = fabricate_run(tmp_path / "b", seed=1)
    preds = pd.read_csv(b / "fold_0" / "predictions.csv")
    positive = (preds.split == "test") & (preds.label == 1)
    preds.loc[positive, "slide_id"] = "b_only_" + preds.loc[positive, "slide_id"]
    preds.to_csv(b / "fold_0" / "predictions.csv", index=False)
    (pair,) = build_comparison([a, b], tmp_path / "cmp", n_bootstrap=20)["comparisons"]
    assert pair["folds"] == [0, 1, 2, 3, 4] and pair["mean_difference"] is not None
    assert pair["bootstrap_ci95"]["low"] is None and pair["bootstrap_ci95"]["undefined_fold"] == 0
