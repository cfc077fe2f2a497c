"""``zoomfeat report``: numbers checked against sklearn on fabricated runs; files parsed back; a real run."""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

import cli
from mil.metrics import auc_rows
from mil.report import bootstrap_auc_ci, build_report


def fabricate_run(run_dir: Path, *, n_folds=5, n_per_fold=12, seed=0, one_class_fold=None, task="subtype",
                  extractor="zoomldm", spec="/data/feats_zoomldm@20x+5x", legacy_prob_only=False) -> Path:
    """A run folder with a schema-2 record (written by hand, as documented in mil/record.py) and
    fold_k/predictions.csv of known, noisy predictions (prob_IDC, prob_ILC and the binary prob column)."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    record = {"format": "zoomfeat-mil-run", "schema_version": 2, "task": task,
              "config": {"model": "abmil", "labels": "labels.csv", "model_kwargs": {"hidden": 8},
                         "protocol": {"name": "hipt-5fold", "lr": 2e-4, "epochs": 20}},
              "label_map": {"IDC": 0, "ILC": 1}, "feature_spec": spec, "feature_dim": 8,
              "split_source": "splits/brca.csv", "split_fingerprints": {str(k): f"sha{k}" for k in range(n_folds)},
              "inputs": {"labels_sha256": "0" * 64, "feature_files": {}},
              "extractor": extractor, "extractor_config": {"timestep": 50, "block": 3, "pooling": "mean"}}
    (run_dir / "config.json").write_text(json.dumps(record))
    for k in range(n_folds):
        ids = [f"slide{k}_{i:02d}" for i in range(n_per_fold)]
        labels = np.arange(n_per_fold) % 2 if k != one_class_fold else np.ones(n_per_fold, int)
        probs = np.clip(0.5 + 0.25 * (labels - 0.5) + rng.normal(0, 0.25, n_per_fold), 0, 1).round(4)
        val = pd.DataFrame({"slide_id": [f"v{k}_{i}" for i in range(4)], "case_id": "c", "label": [0, 1, 0, 1],
                            "prob": [0.9, 0.1, 0.9, 0.1], "split": "val"})  # must be ignored by the report
        test = pd.DataFrame({"slide_id": ids, "case_id": ids, "label": labels, "prob": probs, "split": "test"})
        frame = pd.concat([val, test])
        if not legacy_prob_only:
            frame = frame.assign(prob_IDC=1 - frame["prob"], prob_ILC=frame["prob"])
        (run_dir / f"fold_{k}").mkdir()
        frame.to_csv(run_dir / f"fold_{k}" / "predictions.csv", index=False)
        (run_dir / f"fold_{k}" / "metrics.json").write_text("{}")  # train-mil's done marker, written last
    return run_dir


class _Page(HTMLParser):
    """Collects table rows (cell texts), <img> sources and external references of an HTML page."""

    def __init__(self):
        super().__init__()
        self.rows, self.images, self.external, self._row, self._cell = [], [], [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("link", "script") or (tag == "img" and not attrs.get("src", "").startswith("data:")):
            self.external.append(tag)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr":
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse_html(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def assert_nontrivial_png(data: bytes, min_side: int = 100) -> np.ndarray:
    pixels = mpimg.imread(io.BytesIO(data), format="png")
    assert pixels.shape[0] >= min_side and pixels.shape[1] >= min_side
    assert pixels[..., :3].std() > 0.02
    return pixels


def expected_fold_metrics(run_dir: Path) -> dict[int, dict]:
    """Independent computation from predictions.csv with sklearn."""
    out = {}
    for k in range(5):
        df = pd.read_csv(run_dir / f"fold_{k}" / "predictions.csv")
        df = df[df["split"] == "test"]
        y, p = df["label"].to_numpy(), df["prob"].to_numpy()
        pred = (p >= 0.5).astype(int)
        out[k] = {"auc": roc_auc_score(y, p) if len(set(y)) == 2 else None,
                  "macro_f1": f1_score(y, pred, average="macro", labels=[0, 1], zero_division=0),
                  "accuracy": float(np.mean(pred == y)),
                  "balanced_accuracy": balanced_accuracy_score(y, pred) if len(set(y)) == 2 else float(
                      np.mean(pred[y == y[0]] == y[0]))}
    return out


def test_auc_rows_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=(20, 30))
    s = rng.integers(0, 5, size=(20, 30)).astype(float)  # many ties
    got = auc_rows(y, s)
    want = [roc_auc_score(y[i], s[i]) for i in range(20)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.isnan(auc_rows(np.ones((1, 5)), np.arange(5.0)))[0]


@pytest.mark.slow
def test_report_numbers_files_and_html(tmp_path):
    run = fabricate_run(tmp_path / "run", one_class_fold=2)
    result = build_report(run, n_bootstrap=300, seed=1)
    out = run / "report"
    want = expected_fold_metrics(run)

    saved = json.loads((out / "report.json").read_text())
    assert saved["n_folds"] == 5
    for m in saved["folds"]:
        w = want[m["fold"]]
        assert m["n_test"] == 12
        assert (m["auc"] is None) == (w["auc"] is None)
        if w["auc"] is not None:
            assert m["auc"] == pytest.approx(w["auc"], abs=1e-12)
        assert m["macro_f1"] == pytest.approx(w["macro_f1"]) and m["accuracy"] == pytest.approx(w["accuracy"])
        assert m["balanced_accuracy"] == pytest.approx(w["balanced_accuracy"])
    defined = [w["auc"] for w in want.values() if w["auc"] is not None]
    assert saved["summary"]["auc"]["mean"] == pytest.approx(np.mean(defined))
    assert saved["summary"]["auc"]["std"] == pytest.approx(np.std(defined, ddof=1))
    assert saved["summary"]["auc"]["n_excluded"] == 1 and saved["folds_auc_undefined"] == [2]

    pooled = pd.concat(pd.read_csv(run / f"fold_{k}" / "predictions.csv") for k in range(5))
    pooled = pooled[pooled["split"] == "test"]
    assert saved["pooled"]["auc"] == pytest.approx(roc_auc_score(pooled["label"], pooled["prob"]))
    ci = saved["pooled"]["auc_ci95"]
    assert ci["low"] < saved["pooled"]["auc"] < ci["high"] and ci["n_bootstrap"] == 300
    (tn, fp), (fn, tp) = saved["pooled"]["confusion_matrix"]
    pred = pooled["prob"] >= 0.5
    assert tp == int((pred & (pooled["label"] == 1)).sum()) and tn + fp + fn + tp == 60
    assert result["pooled"]["auc"] == saved["pooled"]["auc"]

    page = parse_html(out / "report.html")
    assert not page.external and len(page.images) == 2
    table = {r[0]: r for r in page.rows if r}
    for k, w in want.items():
        assert table[str(k)][3] == ("n/a" if w["auc"] is None else f"{w['auc']:.3f}")
        assert table[str(k)][5] == f"{w['accuracy']:.3f}" and table[str(k)][6] == f"{w['macro_f1']:.3f}"
    header = next(r for r in page.rows if r and r[0] == "fold")
    assert header[3:] == ["AUC", "balanced accuracy", "accuracy", "macro F1"]
    settings = {r[0]: r[1] for r in page.rows if len(r) == 2}
    assert settings["protocol"] == "hipt-5fold" and settings["model"] == "abmil" and settings["classes"] == "IDC, ILC"
    assert settings["extractor"] == "zoomldm" and settings["extractor_config.timestep"] == "50"
    assert settings["split source"] == "splits/brca.csv" and settings["folds"] == "5"
    text = (out / "report.html").read_text()
    assert "excluded from the mean" in text and "5 folds" in text
    for name in ("roc.png", "confusion.png"):
        assert_nontrivial_png((out / name).read_bytes())
    assert "| 2 | 12 | 12/0 | n/a |" in (out / "report.md").read_text()


def test_bootstrap_ci_is_seeded_and_sane():
    rng = np.random.default_rng(0)
    y = np.arange(80) % 2
    s = y * 0.6 + rng.normal(0, 0.5, 80)
    a, b = bootstrap_auc_ci(y, s, 500, seed=7), bootstrap_auc_ci(y, s, 500, seed=7)
    assert a == b and a["low"] < roc_auc_score(y, s) < a["high"] and a["high"] - a["low"] < 0.4
    assert bootstrap_auc_ci(np.ones(5), np.arange(5.0), 100, 0)["low"] is None


@pytest.mark.slow
def test_report_cli_and_errors(tmp_path, capsys):
    run = fabricate_run(tmp_path / "run")
    assert cli.main(["report", str(run), "--out", str(tmp_path / "rep"), "--n-bootstrap", "50"]) == 0
    assert (tmp_path / "rep" / "report.html").is_file() and "pooled AUC" in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "not a train-mil run folder" in capsys.readouterr().err
    bad = run / "fold_0" / "predictions.csv"
    bad.write_text("slide_id,label\na,1\n")
    assert cli.main(["report", str(run)]) == 2
    assert "lacks columns" in capsys.readouterr().err


@pytest.mark.slow
def test_report_on_a_real_train_mil_run(tmp_path_factory):
    from test_heatmap import real_runs

    run = real_runs(tmp_path_factory.getbasetemp())[0]
    out = tmp_path_factory.mktemp("real_report")
    build_report(run, out, n_bootstrap=200)
    saved = json.loads((out / "report.json").read_text())
    folds = sorted(int(p.name.split("_")[1]) for p in run.glob("fold_*"))
    assert saved["n_folds"] == len(folds) == 2
    for m in saved["folds"]:
        df = pd.read_csv(run / f"fold_{m['fold']}" / "predictions.csv")
        df = df[df["split"] == "test"]
        assert m["auc"] == pytest.approx(roc_auc_score(df["label"], df["prob"]))
        assert m["macro_f1"] == pytest.approx(f1_score(df["label"], df["prob"] >= 0.5, average="macro"))
        metrics = json.loads((run / f"fold_{m['fold']}" / "metrics.json").read_text())
        assert m["auc"] == pytest.approx(metrics["test_auc"])
    settings = {r[0]: r[1] for r in parse_html(out / "report.html").rows if len(r) == 2}
    assert settings["task"] == "custom" and settings["model"] == "abmil" and settings["protocol"] == "hipt"
    assert settings["extractor"] == "planted" and "signal tiles" in settings["extractor_config.rule"]
    assert settings["split source"].endswith("splits") and settings["feature set"].endswith("features@20x")
    for name in ("roc.png", "confusion.png"):
        assert_nontrivial_png((out / name).read_bytes())


@pytest.mark.slow
def test_three_class_report_matches_sklearn(tmp_path):
    """prob_<class> columns of a 3-class run: macro one-vs-rest AUC, balanced accuracy, macro F1, 3x3 confusion."""
    from sklearn.metrics import confusion_matrix

    run = fabricate_run(tmp_path / "run", n_folds=3)
    record = json.loads((run / "config.json").read_text())
    record["label_map"] = {"A": 0, "B": 1, "C": 2}
    (run / "config.json").write_text(json.dumps(record))
    rng = np.random.default_rng(5)
    for k in range(3):
        y = np.arange(15) % 3
        logits = rng.normal(0, 1, (15, 3)) + 1.5 * np.eye(3)[y]
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        pd.DataFrame({"slide_id": [f"s{k}_{i}" for i in range(15)], "case_id": "c", "label": y, "split": "test",
                      "prob_A": p[:, 0], "prob_B": p[:, 1], "prob_C": p[:, 2]}).to_csv(
            run / f"fold_{k}" / "predictions.csv", index=False)
    result = build_report(run, n_bootstrap=50)
    for m in result["folds"]:
        df = pd.read_csv(run / f"fold_{m['fold']}" / "predictions.csv")
        p, y = df[["prob_A", "prob_B", "prob_C"]].to_numpy(), df["label"].to_numpy()
        assert m["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
        assert m["macro_f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    pooled = pd.concat(pd.read_csv(run / f"fold_{k}" / "predictions.csv") for k in range(3))
    want = confusion_matrix(pooled["label"], pooled[["prob_A", "prob_B", "prob_C"]].to_numpy().argmax(1))
    assert result["pooled"]["confusion_matrix"] == want.tolist()
    assert "roc.png" not in result["files"] and (run / "report" / "confusion.png").is_file()
    assert "A/B/C" in (run / "report" / "report.md").read_text()
    assert "AUC (one-vs-rest macro)" in (run / "report" / "report.md").read_text()


@pytest.mark.slow
def test_records_of_the_first_schema_are_read_and_newer_ones_refused(tmp_path):
    """Runs written before typed records (config + provenance, prob only) still report; a schema from a newer
    zoomfeat is refused by name."""
    from mil.record import read_record
    from zoomfeat.errors import DataError

    run = fabricate_run(tmp_path / "old", legacy_prob_only=True)
    new = json.loads((run / "config.json").read_text())
    old = {"config": {"task": "subtype", "features": new["feature_spec"], "model": "abmil", "labels": "l.csv"},
           "label_map": new["label_map"], "feature_dim": 8, "split_source": "s",
           "split_fingerprints": new["split_fingerprints"], "extractor": "zoomldm", "extractor_config": None}
    (run / "config.json").write_text(json.dumps(old))
    record = read_record(run)
    assert record.schema_version == 1 and record.inputs is None and record.task == "subtype"
    want = expected_fold_metrics(run)
    got = {m["fold"]: m for m in build_report(run, n_bootstrap=0)["folds"]}
    assert all(got[k]["macro_f1"] == pytest.approx(w["macro_f1"]) for k, w in want.items())
    assert "no input fingerprints" in (run / "report" / "report.md").read_text()
    (run / "config.json").write_text(json.dumps({**new, "schema_version": 99}))
    with pytest.raises(DataError, match="schema 99 is newer"):
        read_record(run)


def test_metric_functions_take_tensors_or_arrays_and_refuse_non_finite_scores():
    """The training loop (torch tensors) and the reports (numpy) get the same sklearn numbers; NaN is an error."""
    import torch

    from mil.metrics import accuracy, auroc, balanced_accuracy, macro_f1
    from zoomfeat.errors import DataError

    rng = np.random.default_rng(2)
    y = np.arange(20) % 2
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.3, 20), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    for p, t in ((probs, y), (torch.tensor(probs, dtype=torch.float32), torch.tensor(y))):
        assert auroc(p, t) == pytest.approx(roc_auc_score(y, p1), abs=1e-6)
        assert balanced_accuracy(p, t) == pytest.approx(balanced_accuracy_score(y, p1 >= 0.5))
        assert macro_f1(p, t) == pytest.approx(f1_score(y, p1 >= 0.5, average="macro"))
        assert accuracy(p, t) == pytest.approx(float(np.mean((p1 >= 0.5) == y)))
    assert auroc(probs[y == 1], y[y == 1]) is None  # one class: undefined, not 0.5 or 1.0
    bad = probs.copy()
    bad[3, 1] = np.nan
    for metric in (auroc, balanced_accuracy, accuracy, macro_f1):
        with pytest.raises(DataError, match="non-finite"):
            metric(bad, y)


def test_small_test_folds_are_flagged_and_per_fold_and_pooled_auc_reconciled(tmp_path):
    run = fabricate_run(tmp_path / "run", n_folds=3, n_per_fold=8, seed=4)  # 4 IDC + 4 ILC per test fold
    result = build_report(run, n_bootstrap=0)
    assert result["small_folds"] == [{"fold": k, "class": c, "n": 4} for k in range(3) for c in ("IDC", "ILC")]
    aucs, frames = [], []
    for k in range(3):
        df = pd.read_csv(run / f"fold_{k}" / "predictions.csv")
        df = df[df.split == "test"]
        aucs.append(roc_auc_score(df.label, df.prob))
        frames.append(df)
    pooled = pd.concat(frames)
    pooled_auc = roc_auc_score(pooled.label, pooled.prob)
    text = (run / "report" / "report.md").read_text()
    assert "Small test folds (fold 0: 4 IDC; fold 0: 4 ILC; fold 1: 4 IDC" in text
    assert "lands near 0 or 1 by chance" in text
    assert (f"The mean per-fold AUC ({np.mean(aucs):.3f}) and the pooled AUC ({pooled_auc:.3f}) differ by "
            f"{abs(np.mean(aucs) - pooled_auc):.3f} because") in text
    assert fabricate_run(tmp_path / "big", n_folds=2, n_per_fold=10) and not build_report(
        tmp_path / "big", n_bootstrap=0)["small_folds"]  # 5 slides of each class: not small
