"""Cross-validation report of one ``train-mil`` run: per-fold test metrics, pooled AUC with a bootstrap CI, plots.

A run folder (written by ``zoomfeat train-mil``) holds its record ``config.json`` (read through
:func:`mil.record.read_record`) and per fold ``fold_<k>/predictions.csv`` with ``slide_id, case_id, label,
split`` and one ``prob_<class>`` column per class of the record's label map (``label`` = class index; runs of
earlier versions have only ``prob`` = P(class 1), read as [1 - prob, prob]). Metrics are on the test rows and
come from :mod:`mil.metrics` (scikit-learn): AUC (macro one-vs-rest for more than two classes), balanced
accuracy and F1 (class 1; macro for more classes), predicted class = P(class 1) >= 0.5 (two classes) or
argmax. ``build_report`` writes ``report.html`` (self-contained), ``report.md``, ``report.json`` (every number)
and the PNG plots.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mil import html, plots
from mil.metrics import THRESHOLD, auc_rows, auroc, balanced_accuracy, check_finite, confusion, f1
from mil.record import RunRecord, read_record
from zoomfeat.errors import DataError, one_line
from zoomfeat.store import write_json_atomic

BOOTSTRAP_CELLS = 2_000_000  # resampled predictions held in memory at once by the bootstrap
PREDICTION_COLUMNS = ("slide_id", "case_id", "label", "split")
_FOLD_RE = re.compile(r"^fold_(\d+)$")


@dataclass(frozen=True, eq=False)
class RunResult:
    """One run folder read back: its record and, per fold, its predictions table (label as class index)."""

    run_dir: Path
    record: RunRecord
    predictions: dict[int, pd.DataFrame]  # fold -> rows of predictions.csv with prob_<class> columns

    @property
    def folds(self) -> list[int]:
        return sorted(self.predictions)

    @property
    def classes(self) -> list[str]:
        return self.record.classes

    def test(self, fold: int) -> pd.DataFrame:
        df = self.predictions[fold]
        return df[df["split"] == "test"]

    def probs(self, frame: pd.DataFrame) -> np.ndarray:
        """[n, C] class probabilities of ``frame``'s rows."""
        return frame[[f"prob_{c}" for c in self.classes]].to_numpy(dtype=float)

    def scores(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels [n], probs [n, C]) of the test rows of ``fold``."""
        test = self.test(fold)
        return test["label"].to_numpy(dtype=int), self.probs(test)


# ---------------------------------------------------------------------------------------------- loading
def _label_to_int(df: pd.DataFrame, record: RunRecord, path: Path) -> pd.Series:
    """Labels as class indices: numeric labels as they are, names through the record's label map."""
    labels = df["label"]
    if not pd.api.types.is_numeric_dtype(labels):
        unknown = sorted(set(labels.astype(str)) - set(record.label_map))
        if unknown:
            raise DataError(f"{path}: labels {unknown} are not in the run record's label map {record.label_map}")
        labels = labels.astype(str).map(record.label_map)
    values = set(labels.unique().tolist())
    if not values <= set(range(record.n_classes)):
        raise DataError(f"{path}: labels {sorted(values)} are not class indices of the label map {record.label_map}")
    return labels.astype(int)


def _probability_columns(df: pd.DataFrame, record: RunRecord, path: Path) -> pd.DataFrame:
    wanted = [f"prob_{c}" for c in record.classes]
    if not all(c in df.columns for c in wanted):
        if record.n_classes != 2 or "prob" not in df.columns:
            raise DataError(f"{path} lacks columns {[c for c in wanted if c not in df.columns]}: expected "
                            f"{', '.join(PREDICTION_COLUMNS)} and {', '.join(wanted)}")
        p1 = pd.to_numeric(df["prob"], errors="coerce")  # a run of an earlier version: P(class 1) only
        df = df.assign(**{wanted[0]: 1.0 - p1, wanted[1]: p1})
    for column in wanted:
        values = pd.to_numeric(df[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=float))
        if bad.any():
            row = int(np.flatnonzero(bad)[0]) + 2
            raise DataError(f"{path} row {row}: {column} is missing or not a finite number; rerun that fold")
        df[column] = values
    return df


def _read_predictions(path: Path, record: RunRecord) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"slide_id": str, "case_id": str})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot read {path}: {one_line(exc)}") from exc
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks columns {missing}: expected {', '.join(PREDICTION_COLUMNS)} and "
                        "prob_<class> per class")
    df = df.copy()
    df["label"] = _label_to_int(df, record, path)
    return _probability_columns(df, record, path)


def load_run(run_dir: str | Path) -> RunResult:
    """Read the record and every ``fold_<k>/predictions.csv`` of a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir} is not a train-mil run folder (not a folder); pass RUN_DIR of train-mil --out")
    record = read_record(run_dir)
    predictions: dict[int, pd.DataFrame] = {}
    for sub in sorted(run_dir.iterdir()):
        match = _FOLD_RE.match(sub.name)
        if match and (sub / "predictions.csv").is_file():
            predictions[int(match.group(1))] = _read_predictions(sub / "predictions.csv", record)
    if not predictions:
        raise DataError(f"{run_dir} has no fold_<k>/predictions.csv: has train-mil finished?")
    return RunResult(run_dir=run_dir, record=record, predictions=predictions)


# ---------------------------------------------------------------------------------------------- metrics
def resampled_aucs(labels: np.ndarray, probs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """AUC of each resample (rows of ``idx``); NaN where a resample lacks a class."""
    if probs.shape[1] == 2:
        return auc_rows(labels[idx] == 1, probs[idx, 1])
    values = [auroc(probs[row], labels[row], probs.shape[1]) for row in idx]
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def bootstrap_auc_ci(labels: np.ndarray, probs: np.ndarray, n_bootstrap: int, seed: int) -> dict:
    """Percentile 95% CI of the AUC by resampling slides with replacement (draws lacking a class are dropped).

    ``probs`` is [n, C] (a 1-d array is read as P(class 1) of a binary task)."""
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=float)
    probs = np.stack([1 - probs, probs], 1) if probs.ndim == 1 else probs
    empty = {"low": None, "high": None, "n_bootstrap": n_bootstrap, "n_valid": 0, "seed": seed}
    check_finite(probs)
    if n_bootstrap <= 0 or auroc(probs, labels) is None:
        return empty
    rng = np.random.default_rng(seed)
    chunk = max(1, BOOTSTRAP_CELLS // len(labels))  # resamples per batch: bounded memory on large cohorts
    parts = []
    for start in range(0, n_bootstrap, chunk):
        idx = rng.integers(0, len(labels), size=(min(chunk, n_bootstrap - start), len(labels)))
        parts.append(resampled_aucs(labels, probs, idx))
    values = np.concatenate(parts)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return empty
    low, high = np.percentile(values, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "n_bootstrap": n_bootstrap, "n_valid": int(values.size),
            "seed": seed}


def fold_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Test metrics of one fold; ``auc`` is None when its test set lacks a class."""
    n_classes = probs.shape[1]
    counts = np.bincount(labels, minlength=n_classes)
    out = {"n_test": int(len(labels)), "class_counts": counts.astype(int).tolist()}
    if n_classes == 2:
        out.update(n_pos=int(counts[1]), n_neg=int(counts[0]))
    return {**out, "auc": auroc(probs, labels, n_classes), "balanced_accuracy": balanced_accuracy(probs, labels),
            "f1": f1(probs, labels, n_classes)}


def mean_std(values: list[float | None]) -> dict:
    """Mean and standard deviation (ddof=1) of the defined values; std is None with fewer than two."""
    defined = [v for v in values if v is not None]
    mean = float(np.mean(defined)) if defined else None
    std = float(np.std(defined, ddof=1)) if len(defined) >= 2 else None
    return {"mean": mean, "std": std, "n": len(defined), "n_excluded": len(values) - len(defined)}


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for tables, ``n/a`` for undefined."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_mean_std(stats: dict, digits: int = 3) -> str:
    if stats["mean"] is None:
        return "n/a"
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f} (one fold)"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


# ---------------------------------------------------------------------------------------------- metadata
def run_metadata(record: RunRecord) -> dict:
    """The settings a report states, straight from the typed run record."""
    return {
        "task": record.task, "protocol": record.protocol.get("name"), "protocol_settings": record.protocol or None,
        "features": record.feature_spec, "feature_dim": record.feature_dim, "model": record.model,
        "model_config": record.model_kwargs or None, "split_source": record.split_source, "labels": record.labels,
        "classes": record.classes, "extractor": record.extractor, "extractor_config": record.extractor_config,
        "record_schema": record.schema_version,
    }


# ---------------------------------------------------------------------------------------------- report
def compute_report(run: RunResult, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Every number of the report, as a JSON-ready dict (no files written)."""
    per_fold = [{"fold": k, **fold_metrics(*run.scores(k))} for k in run.folds]
    undefined = [m["fold"] for m in per_fold if m["auc"] is None]
    pooled = pd.concat([run.test(k) for k in run.folds], ignore_index=True)
    labels, probs = pooled["label"].to_numpy(dtype=int), run.probs(pooled)
    rule = f"P({run.classes[1]}) >= {THRESHOLD}" if len(run.classes) == 2 else "the most probable class"
    notes = [f"{len(per_fold)} folds; metrics on each fold's test set; predicted class: {rule}."]
    if undefined:
        notes.append(f"AUC undefined (test set lacks a class) for folds {undefined}: shown as n/a and "
                     "excluded from the mean and standard deviation.")
    if run.record.inputs is None:
        notes.append("The run record has no input fingerprints (written by an older zoomfeat): which labels and "
                     "feature files the folds were trained on cannot be verified.")
    return {
        "run_dir": str(run.run_dir),
        "metadata": run_metadata(run.record),
        "n_folds": len(per_fold),
        "threshold": THRESHOLD,
        "classes": run.classes,
        "folds": per_fold,
        "summary": {key: mean_std([m[key] for m in per_fold]) for key in ("auc", "balanced_accuracy", "f1")},
        "pooled": {
            "n_test": int(len(pooled)), "class_counts": np.bincount(labels, minlength=len(run.classes)).tolist(),
            "n_pos": int((labels == 1).sum()), "auc": auroc(probs, labels, len(run.classes)),
            "auc_ci95": bootstrap_auc_ci(labels, probs, n_bootstrap, seed),
            "confusion_matrix": confusion(probs, labels, len(run.classes)),
        },
        "folds_auc_undefined": undefined,
        "notes": notes,
    }


def _roc_inputs(run: RunResult) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """fold -> (test labels 0/1, P(class 1)) of a binary run (the ROC figure's input)."""
    return {k: (run.scores(k)[0], run.scores(k)[1][:, 1]) for k in run.folds}


def _metadata_rows(meta: dict, n_folds: int) -> list[tuple[str, str]]:
    rows = [("task", meta["task"]), ("classes", ", ".join(meta["classes"])), ("protocol", meta["protocol"]),
            ("feature set", meta["features"]), ("feature dim", meta["feature_dim"]), ("model", meta["model"]),
            ("split source", meta["split_source"]), ("labels", meta["labels"]), ("folds", n_folds),
            ("extractor", meta["extractor"])]
    extractor_config = meta["extractor_config"]
    if isinstance(extractor_config, dict):
        rows += [(f"extractor_config.{k}", json.dumps(v) if isinstance(v, (dict, list)) else v)
                 for k, v in extractor_config.items()]
    if isinstance(meta["protocol_settings"], dict):
        rows.append(("protocol settings", json.dumps(meta["protocol_settings"], sort_keys=True)))
    if isinstance(meta["model_config"], dict):
        rows.append(("model settings", json.dumps(meta["model_config"], sort_keys=True)))
    return [(k, "n/a" if v is None else str(v)) for k, v in rows]


def _counts_text(m: dict) -> str:
    return f"{m['n_pos']}/{m['n_neg']}" if "n_pos" in m else "/".join(map(str, m["class_counts"]))


def _fold_rows(result: dict) -> list[list[str]]:
    rows = [[str(m["fold"]), str(m["n_test"]), _counts_text(m), fmt(m["auc"]),
             fmt(m["balanced_accuracy"]), fmt(m["f1"])] for m in result["folds"]]
    s = result["summary"]
    rows.append([f"mean ± std ({s['auc']['n']} of {result['n_folds']} folds for AUC)", "", "",
                 fmt_mean_std(s["auc"]), fmt_mean_std(s["balanced_accuracy"]), fmt_mean_std(s["f1"])])
    return rows


def _fold_header(result: dict) -> list[str]:
    classes = result["classes"]
    counts = "pos/neg" if len(classes) == 2 else "/".join(classes)
    return ["fold", "test slides", counts, "AUC", "balanced accuracy", "F1"]


def _pooled_line(result: dict) -> str:
    pooled, ci = result["pooled"], result["pooled"]["auc_ci95"]
    ci_text = "n/a" if ci["low"] is None else f"[{ci['low']:.3f}, {ci['high']:.3f}]"
    counts = ", ".join(f"{n} {c}" for c, n in zip(result["classes"], pooled["class_counts"]))
    return (f"Pooled test AUC over all {result['n_folds']} folds ({pooled['n_test']} slides: {counts}): "
            f"{fmt(pooled['auc'])}, bootstrap 95% CI {ci_text} "
            f"({ci['n_valid']} of {ci['n_bootstrap']} resamples of slides, seed {ci['seed']}).")


def _title(meta: dict) -> str:
    return f"Cross-validation report: {meta['task']} / {meta['features']}"


def render_html(result: dict, images: dict[str, bytes]) -> str:
    meta = result["metadata"]
    parts = [html.heading("Run"), html.table(["setting", "value"], _metadata_rows(meta, result["n_folds"])),
             html.heading("Test metrics per fold"),
             html.table(_fold_header(result), _fold_rows(result), [False, True, True, True, True, True]),
             html.paragraph(_pooled_line(result))]
    parts += [html.paragraph(note, "note") for note in result["notes"]]
    if "roc.png" in images:
        parts += [html.heading("ROC curves"), html.image(images["roc.png"], "ROC curves per fold and mean ROC")]
    parts += [html.heading("Confusion matrix (pooled test)"), html.image(images["confusion.png"], "confusion matrix")]
    return html.page(_title(meta), parts)


def render_markdown(result: dict, images: dict[str, bytes]) -> str:
    meta = result["metadata"]
    lines = [f"# {_title(meta)}", "",
             html.markdown_table(["setting", "value"], _metadata_rows(meta, result["n_folds"])), "",
             "## Test metrics per fold", "", html.markdown_table(_fold_header(result), _fold_rows(result)), "",
             _pooled_line(result), ""]
    lines += [f"> {note}" for note in result["notes"]]
    lines += [""] + (["![ROC curves](roc.png)", ""] if "roc.png" in images else [])
    lines += ["![Confusion matrix](confusion.png)", ""]
    return "\n".join(lines)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, *, n_bootstrap: int = 1000,
                 seed: int = 0) -> dict:
    """Write report.html / report.md / report.json / confusion.png (and roc.png for binary tasks); return
    report.json's dict. ``out_dir`` defaults to ``RUN_DIR/report``; the dict has ``files`` (name -> path)."""
    from zoomfeat.store import write_text

    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    result = compute_report(run, n_bootstrap=n_bootstrap, seed=seed)
    images = {"confusion.png": plots.confusion_figure(result["pooled"]["confusion_matrix"], run.classes)}
    if len(run.classes) == 2:
        images["roc.png"], result["mean_roc"] = plots.roc_figure(_roc_inputs(run))
    files = {name: out / name for name in ("report.html", "report.md", "report.json", *images)}
    for name, png in images.items():
        plots.write_png(files[name], png)
    write_text(files["report.html"], render_html(result, images))
    write_text(files["report.md"], render_markdown(result, images))
    result["files"] = {k: str(v) for k, v in files.items()}
    write_json_atomic(files["report.json"], result)
    return result
