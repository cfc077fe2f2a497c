"""Cross-validation report of one ``train-mil`` run: per-fold test metrics, pooled AUC with a bootstrap CI, plots.

A run directory (written by ``zoomfeat train-mil``) holds ``config.json`` and per fold
``fold_<k>/predictions.csv`` with columns ``slide_id, case_id, label, prob, split`` (split in {val, test};
``prob`` is the predicted probability of the positive class, label index 1). Metrics are on the test rows:
AUC, balanced accuracy and F1 at threshold 0.5. ``build_report`` writes ``report.html`` (self-contained),
``report.md``, ``report.json`` (every number) and the PNG plots.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from mil import html, plots
from zoomfeat.config import write_json_atomic
from zoomfeat.errors import DataError

THRESHOLD = 0.5
BOOTSTRAP_CELLS = 2_000_000  # resampled predictions held in memory at once by the bootstrap
PREDICTION_COLUMNS = ("slide_id", "case_id", "label", "prob", "split")
_FOLD_RE = re.compile(r"^fold_(\d+)$")


@dataclass(frozen=True, eq=False)
class RunResult:
    """One run directory read back: its config and, per fold, its predictions table."""

    run_dir: Path
    config: dict
    predictions: dict[int, pd.DataFrame]  # fold -> rows of predictions.csv, label as int 0/1

    @property
    def folds(self) -> list[int]:
        return sorted(self.predictions)

    def test(self, fold: int) -> pd.DataFrame:
        df = self.predictions[fold]
        return df[df["split"] == "test"]


# ---------------------------------------------------------------------------------------------- loading
def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        raise DataError(f"{run_dir} is not a train-mil run directory: {path} is missing")
    try:
        return flatten_config(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): rerun train-mil") from exc


def flatten_config(record: dict) -> dict:
    """train-mil's config.json keeps the run settings under ``config`` and provenance beside it (label_map,
    split_fingerprints, extractor ...): one flat dict of both (provenance wins on a clash)."""
    nested = record.get("config")
    if not isinstance(nested, dict):
        return dict(record)
    return {**nested, **{k: v for k, v in record.items() if k != "config"}}


def _label_to_int(df: pd.DataFrame, config: dict, path: Path) -> pd.Series:
    """Labels as 0/1 ints: numeric labels as they are, names through the config's label map."""
    labels = df["label"]
    if not pd.api.types.is_numeric_dtype(labels):
        label_map = config.get("label_map") or {}
        unknown = sorted(set(labels.astype(str)) - set(map(str, label_map)))
        if unknown:
            raise DataError(f"{path}: labels {unknown} are not in the label_map of config.json")
        labels = labels.astype(str).map({str(k): int(v) for k, v in label_map.items()})
    values = set(labels.unique().tolist())
    if not values <= {0, 1}:
        raise DataError(f"{path}: labels {sorted(values)} are not binary (0/1): reports cover binary tasks only")
    return labels.astype(int)


def _read_predictions(path: Path, config: dict) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"slide_id": str, "case_id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks columns {missing}: expected {', '.join(PREDICTION_COLUMNS)}")
    df = df.copy()
    df["label"] = _label_to_int(df, config, path)
    df["prob"] = pd.to_numeric(df["prob"], errors="coerce")
    if df["prob"].isna().any():
        row = int(df.index[df["prob"].isna()][0]) + 2
        raise DataError(f"{path} row {row}: prob is missing or not a number")
    return df


def load_run(run_dir: str | Path) -> RunResult:
    """Read ``config.json`` and every ``fold_<k>/predictions.csv`` of a run directory."""
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    predictions: dict[int, pd.DataFrame] = {}
    for sub in sorted(run_dir.iterdir()):
        match = _FOLD_RE.match(sub.name)
        if match and (sub / "predictions.csv").is_file():
            predictions[int(match.group(1))] = _read_predictions(sub / "predictions.csv", config)
    if not predictions:
        raise DataError(f"{run_dir} has no fold_<k>/predictions.csv: has train-mil finished?")
    return RunResult(run_dir=run_dir, config=config, predictions=predictions)


# ---------------------------------------------------------------------------------------------- metrics
def auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row (Mann-Whitney U with average ranks for ties, = sklearn's roc_auc_score).

    labels, scores: [B, n] (or [n]); returns [B] (or a 0-d array); NaN for rows with a single class.
    """
    labels = np.atleast_2d(np.asarray(labels, dtype=bool))
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    ranks = rankdata(scores, axis=1)
    n_pos = labels.sum(axis=1).astype(float)
    n_neg = labels.shape[1] - n_pos
    u = (ranks * labels).sum(axis=1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def auc(labels, scores) -> float | None:
    """ROC AUC of one set of predictions; None when only one class is present."""
    value = float(auc_rows(labels, scores)[0])
    return None if math.isnan(value) else value


def bootstrap_auc_ci(labels: np.ndarray, scores: np.ndarray, n_bootstrap: int, seed: int) -> dict:
    """Percentile 95% CI of the AUC by resampling slides with replacement (draws with one class are dropped)."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    if n_bootstrap <= 0 or auc(labels, scores) is None:
        return {"low": None, "high": None, "n_bootstrap": n_bootstrap, "n_valid": 0, "seed": seed}
    rng = np.random.default_rng(seed)
    chunk = max(1, BOOTSTRAP_CELLS // len(labels))  # resamples per batch: bounded memory on large cohorts
    parts = []
    for start in range(0, n_bootstrap, chunk):
        idx = rng.integers(0, len(labels), size=(min(chunk, n_bootstrap - start), len(labels)))
        parts.append(auc_rows(labels[idx], scores[idx]))
    values = np.concatenate(parts)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"low": None, "high": None, "n_bootstrap": n_bootstrap, "n_valid": 0, "seed": seed}
    low, high = np.percentile(values, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "n_bootstrap": n_bootstrap, "n_valid": int(values.size),
            "seed": seed}


def balanced_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    """Mean of the per-class recalls over the classes present in ``labels``."""
    recalls = [float(np.mean(pred[labels == c] == c)) for c in (0, 1) if np.any(labels == c)]
    return float(np.mean(recalls))


def f1(labels: np.ndarray, pred: np.ndarray) -> float:
    """F1 of the positive class (0 when there are no true positives)."""
    tp = int(np.sum((pred == 1) & (labels == 1)))
    fp = int(np.sum((pred == 1) & (labels == 0)))
    fn = int(np.sum((pred == 0) & (labels == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def confusion(labels: np.ndarray, pred: np.ndarray) -> list[list[int]]:
    """[[TN, FP], [FN, TP]] (rows: true class 0/1, columns: predicted class 0/1)."""
    return [[int(np.sum((labels == t) & (pred == p))) for p in (0, 1)] for t in (0, 1)]


def fold_metrics(test: pd.DataFrame) -> dict:
    """Test metrics of one fold; ``auc`` is None when its test set has a single class."""
    labels, probs = test["label"].to_numpy(), test["prob"].to_numpy(dtype=float)
    pred = (probs >= THRESHOLD).astype(int)
    return {
        "n_test": int(len(test)), "n_pos": int(labels.sum()), "n_neg": int(len(labels) - labels.sum()),
        "auc": auc(labels, probs) if len(test) else None,
        "balanced_accuracy": balanced_accuracy(labels, pred) if len(test) else None,
        "f1": f1(labels, pred) if len(test) else None,
    }


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
def _first(config: dict, *keys: str) -> Any:
    for key in keys:
        if config.get(key) not in (None, "", {}):
            return config[key]
    return None


def _name_of(value: Any) -> Any:
    """A setting's name: the value itself, or the ``name`` of a dict-valued setting (protocol, model)."""
    return value.get("name", value) if isinstance(value, dict) else value


def run_metadata(config: dict) -> dict:
    """The settings a report states: task, protocol, feature set, model, split source, extractor."""
    features = _first(config, "features", "feature_spec", "spec")
    if isinstance(features, dict):
        features = features.get("spec") or features.get("text") or json.dumps(features, sort_keys=True)
    extractor_config = config.get("extractor_config")
    if isinstance(extractor_config, str):
        try:
            extractor_config = json.loads(extractor_config)
        except json.JSONDecodeError:
            pass
    protocol = _first(config, "protocol", "split_protocol")
    model = _first(config, "model", "head", "model_name")
    model_config = _first(config, "model_kwargs", "model_config")
    return {
        "task": _first(config, "task", "task_name"),
        "protocol": _name_of(protocol),
        "protocol_settings": protocol if isinstance(protocol, dict) else None,
        "features": features,
        "model": _name_of(model),
        "model_config": model_config if model_config is not None else (model if isinstance(model, dict) else None),
        "split_source": _first(config, "split_source", "splits", "split_file", "splits_path"),
        "labels": _first(config, "labels", "labels_path", "labels_csv"),
        "extractor": config.get("extractor"),
        "extractor_config": extractor_config,
    }


# ---------------------------------------------------------------------------------------------- report
def compute_report(run: RunResult, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Every number of the report, as a JSON-ready dict (no files written)."""
    per_fold = [{"fold": k, **fold_metrics(run.test(k))} for k in run.folds]
    undefined = [m["fold"] for m in per_fold if m["auc"] is None]
    pooled = pd.concat([run.test(k) for k in run.folds], ignore_index=True)
    labels, probs = pooled["label"].to_numpy(), pooled["prob"].to_numpy(dtype=float)
    pred = (probs >= THRESHOLD).astype(int)
    notes = [f"{len(per_fold)} folds; metrics on each fold's test set, threshold {THRESHOLD} on prob."]
    if undefined:
        notes.append(f"AUC undefined (test set has one class) for folds {undefined}: shown as n/a and "
                     "excluded from the mean and standard deviation.")
    return {
        "run_dir": str(run.run_dir),
        "metadata": run_metadata(run.config),
        "n_folds": len(per_fold),
        "threshold": THRESHOLD,
        "folds": per_fold,
        "summary": {key: mean_std([m[key] for m in per_fold]) for key in ("auc", "balanced_accuracy", "f1")},
        "pooled": {
            "n_test": int(len(pooled)), "n_pos": int(labels.sum()),
            "auc": auc(labels, probs) if len(pooled) else None,
            "auc_ci95": bootstrap_auc_ci(labels, probs, n_bootstrap, seed),
            "confusion_matrix": confusion(labels, pred),
        },
        "folds_auc_undefined": undefined,
        "notes": notes,
    }


def _roc_inputs(run: RunResult) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    return {k: (run.test(k)["label"].to_numpy(), run.test(k)["prob"].to_numpy(dtype=float)) for k in run.folds}


def _metadata_rows(meta: dict, n_folds: int) -> list[tuple[str, str]]:
    rows = [("task", meta["task"]), ("protocol", meta["protocol"]), ("feature set", meta["features"]),
            ("model", meta["model"]), ("split source", meta["split_source"]), ("labels", meta["labels"]),
            ("folds", n_folds), ("extractor", meta["extractor"])]
    extractor_config = meta["extractor_config"]
    if isinstance(extractor_config, dict):
        rows += [(f"extractor_config.{k}", json.dumps(v) if isinstance(v, (dict, list)) else v)
                 for k, v in extractor_config.items()]
    elif extractor_config is not None:
        rows.append(("extractor_config", extractor_config))
    if isinstance(meta["protocol_settings"], dict):
        rows.append(("protocol settings", json.dumps(meta["protocol_settings"], sort_keys=True)))
    if isinstance(meta["model_config"], dict):
        rows.append(("model settings", json.dumps(meta["model_config"], sort_keys=True)))
    return [(k, "n/a" if v is None else str(v)) for k, v in rows]


def _fold_rows(result: dict) -> list[list[str]]:
    rows = [[str(m["fold"]), str(m["n_test"]), f"{m['n_pos']}/{m['n_neg']}", fmt(m["auc"]),
             fmt(m["balanced_accuracy"]), fmt(m["f1"])] for m in result["folds"]]
    s = result["summary"]
    rows.append([f"mean ± std ({s['auc']['n']} of {result['n_folds']} folds for AUC)", "", "",
                 fmt_mean_std(s["auc"]), fmt_mean_std(s["balanced_accuracy"]), fmt_mean_std(s["f1"])])
    return rows


FOLD_HEADER = ["fold", "test slides", "pos/neg", "AUC", "balanced accuracy", "F1"]


def _pooled_line(result: dict) -> str:
    pooled, ci = result["pooled"], result["pooled"]["auc_ci95"]
    ci_text = "n/a" if ci["low"] is None else f"[{ci['low']:.3f}, {ci['high']:.3f}]"
    return (f"Pooled test AUC over all {result['n_folds']} folds ({pooled['n_test']} slides, "
            f"{pooled['n_pos']} positive): {fmt(pooled['auc'])}, bootstrap 95% CI {ci_text} "
            f"({ci['n_valid']} of {ci['n_bootstrap']} resamples of slides, seed {ci['seed']}).")


def render_html(result: dict, images: dict[str, bytes]) -> str:
    meta = result["metadata"]
    title = f"Cross-validation report: {meta['task'] or 'task'} / {meta['features'] or 'features'}"
    parts = [html.heading("Run"), html.table(["setting", "value"], _metadata_rows(meta, result["n_folds"])),
             html.heading("Test metrics per fold"),
             html.table(FOLD_HEADER, _fold_rows(result), [False, True, True, True, True, True]),
             html.paragraph(_pooled_line(result))]
    parts += [html.paragraph(note, "note") for note in result["notes"]]
    parts += [html.heading("ROC curves"), html.image(images["roc.png"], "ROC curves per fold and mean ROC"),
              html.heading("Confusion matrix (pooled test, threshold 0.5)"),
              html.image(images["confusion.png"], "confusion matrix")]
    return html.page(title, parts)


def render_markdown(result: dict) -> str:
    meta = result["metadata"]
    lines = [f"# Cross-validation report: {meta['task'] or 'task'} / {meta['features'] or 'features'}", "",
             html.markdown_table(["setting", "value"], _metadata_rows(meta, result["n_folds"])), "",
             "## Test metrics per fold", "", html.markdown_table(FOLD_HEADER, _fold_rows(result)), "",
             _pooled_line(result), ""]
    lines += [f"> {note}" for note in result["notes"]]
    lines += ["", "![ROC curves](roc.png)", "", "![Confusion matrix](confusion.png)", ""]
    return "\n".join(lines)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, *, n_bootstrap: int = 1000,
                 seed: int = 0) -> dict:
    """Write report.html / report.md / report.json / roc.png / confusion.png for a run; return report.json's dict.

    ``out_dir`` defaults to ``RUN_DIR/report``; the returned dict has ``files`` (name -> path).
    """
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    result = compute_report(run, n_bootstrap=n_bootstrap, seed=seed)
    roc_png, roc_data = plots.roc_figure(_roc_inputs(run))
    result["mean_roc"] = roc_data
    images = {"roc.png": roc_png, "confusion.png": plots.confusion_figure(result["pooled"]["confusion_matrix"])}
    files = {name: out / name for name in ("report.html", "report.md", "report.json", *images)}
    for name, png in images.items():
        files[name].write_bytes(png)
    files["report.html"].write_text(render_html(result, images))
    files["report.md"].write_text(render_markdown(result))
    result["files"] = {k: str(v) for k, v in files.items()}
    write_json_atomic(files["report.json"], result)
    return result
