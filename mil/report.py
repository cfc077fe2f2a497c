"""Cross-validation report of one ``train-mil`` run: per-fold test metrics, their spread over folds and over init
seeds, pooled AUC with a bootstrap CI, plots.

A run is read from its record (:func:`mil.record.read_record`) and per (seed, fold) its ``predictions.csv``
(``slide_id, case_id, label, split`` and ``prob_<class>`` per class; runs of earlier versions have only ``prob``
= P(class 1), read as [1 - prob, prob]). A run missing recorded (seed, fold) pairs is refused
(:func:`mil.record.check_complete`) unless ``allow_partial``, and then every table and page names the missing
folds. Metrics (:mod:`mil.metrics`) are on the test rows. The spread over folds is the standard deviation
(ddof=1) of one seed's fold values; the spread over seeds that of the per-seed means. The report warns of test
folds with fewer than :data:`SMALL_FOLD` slides of a class and says why the mean per-fold AUC and the pooled AUC
differ. ``build_report`` writes ``report.html`` (self-contained), ``report.md``, ``report.json`` (every number)
and the PNG plots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mil import html, plots
from mil.metrics import (METRICS, THRESHOLD, auc_rows, auroc, classification_metrics, confusion, fmt, fmt_mean_std,
                         mean_std, metric_label)
from mil.record import Completeness, RunRecord, check_complete, finished_pairs, fold_dir, read_record
from zoomfeat.errors import DataError, one_line
from zoomfeat.store import write_json_atomic, write_text

BOOTSTRAP_CELLS = 2_000_000  # resampled predictions held in memory at once by the bootstrap
PREDICTION_COLUMNS = ("slide_id", "case_id", "label", "split")
SMALL_FOLD = 5  # a test fold with fewer slides of a class than this has an AUC of few possible values


Pair = tuple[int, int]  # (seed, fold)


@dataclass(frozen=True, eq=False)
class RunResult:
    """One run folder read back: its record, per (seed, fold) its predictions table (label as class index),
    and which recorded pairs are missing (a partial run read with ``allow_partial``)."""

    run_dir: Path
    record: RunRecord
    predictions: dict[Pair, pd.DataFrame]  # (seed, fold) -> rows of predictions.csv with prob_<class> columns
    completeness: Completeness | None = None

    @property
    def pairs(self) -> list[Pair]:
        """The (seed, fold) pairs read, seeds in the record's order."""
        return list(self.predictions)

    @property
    def folds(self) -> list[int]:
        return sorted({k for _, k in self.predictions})

    @property
    def seeds(self) -> list[int]:
        return list(dict.fromkeys(s for s, _ in self.predictions))

    @property
    def partial_note(self) -> str | None:
        return None if self.completeness is None else self.completeness.note()

    @property
    def classes(self) -> list[str]:
        return self.record.classes

    def test(self, pair: Pair) -> pd.DataFrame:
        df = self.predictions[pair]
        return df[df["split"] == "test"]

    def probs(self, frame: pd.DataFrame) -> np.ndarray:
        """[n, C] class probabilities of ``frame``'s rows."""
        return frame[[f"prob_{c}" for c in self.classes]].to_numpy(dtype=float)

    def scores(self, pair: Pair) -> tuple[np.ndarray, np.ndarray]:
        """(labels [n], probs [n, C]) of the test rows of (seed, fold) ``pair``."""
        test = self.test(pair)
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


def load_run(run_dir: str | Path, allow_partial: bool = False) -> RunResult:
    """Read the record and the predictions of every finished (seed, fold) of a run folder; DataError for a run
    missing recorded pairs unless ``allow_partial`` (mil.record.check_complete)."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)  # a path that is not a run folder: one line naming it
    pairs = finished_pairs(run_dir, record)
    if not pairs:
        raise DataError(f"{run_dir} has no finished fold (fold_<k>/metrics.json): has train-mil finished?")
    completeness = check_complete(run_dir, record, allow_partial)
    predictions: dict[Pair, pd.DataFrame] = {}
    for seed, k in pairs:
        path = fold_dir(run_dir, record.seeds, seed, k) / "predictions.csv"
        if not path.is_file():
            raise DataError(f"{path} is missing although the fold finished: delete {path.parent} and rerun "
                            "train-mil into the run to train it again")
        predictions[(seed, k)] = _read_predictions(path, record)
    return RunResult(run_dir=run_dir, record=record, predictions=predictions, completeness=completeness)


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
    if auroc(probs, labels) is None or n_bootstrap <= 0:  # auroc refuses non-finite probabilities
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
    """Test metrics of one fold (mil.metrics.METRICS); ``auc`` is None when its test set lacks a class."""
    n_classes = probs.shape[1]
    counts = np.bincount(labels, minlength=n_classes)
    out = {"n_test": int(len(labels)), "class_counts": counts.astype(int).tolist()}
    if n_classes == 2:
        out.update(n_pos=int(counts[1]), n_neg=int(counts[0]))
    return {**out, **classification_metrics(probs, labels, n_classes)}


# ---------------------------------------------------------------------------------------------- metadata
def run_metadata(record: RunRecord) -> dict:
    """The settings a report states, straight from the typed run record."""
    return {
        "task": record.task, "protocol": record.protocol.get("name"), "protocol_settings": record.protocol or None,
        "features": str(record.feature_spec), "feature_dim": record.feature_dim, "model": record.model,
        "model_config": record.model_kwargs or None, "split_source": record.split_source, "labels": record.labels,
        "classes": record.classes, "extractor": record.extractor, "extractor_config": record.extractor_config,
        "record_schema": record.schema_version, "seeds": list(record.seeds), "plan": record.plan or None,
    }


# ---------------------------------------------------------------------------------------------- report
def spread(per_fold: list[dict], seeds: list[int]) -> dict:
    """Per metric: ``folds`` (mean ± std over the folds of each seed), ``seeds`` (mean ± std over seeds of the
    per-seed means) and ``all`` (mean ± std over every (seed, fold)); std with ddof=1."""
    out = {}
    for key in METRICS:
        per_seed = {s: {**mean_std([m[key] for m in per_fold if m["seed"] == s]), "over": "fold"} for s in seeds}
        over_seeds = mean_std([v["mean"] for v in per_seed.values()])
        out[key] = {"folds": {str(s): v for s, v in per_seed.items()}, "seeds": {**over_seeds, "over": "seed"},
                    "all": mean_std([m[key] for m in per_fold])}
    return out


def small_folds(per_fold: list[dict], classes: list[str]) -> list[dict]:
    """Test folds holding fewer than SMALL_FOLD slides of some class (each fold once: its test set is the same
    under every seed): [{fold, class, n}]."""
    seen, out = set(), []
    for m in per_fold:
        if m["fold"] in seen:
            continue
        seen.add(m["fold"])
        out += [{"fold": m["fold"], "class": c, "n": n} for c, n in zip(classes, m["class_counts"]) if n < SMALL_FOLD]
    return out


def _pooled(run: RunResult, seed: int, n_bootstrap: int, boot_seed: int) -> dict:
    pooled = pd.concat([run.test(p) for p in run.pairs if p[0] == seed], ignore_index=True)
    labels, probs = pooled["label"].to_numpy(dtype=int), run.probs(pooled)
    return {"seed": seed, "n_test": int(len(pooled)),
            "class_counts": np.bincount(labels, minlength=len(run.classes)).tolist(),
            "n_pos": int((labels == 1).sum()), "auc": auroc(probs, labels, len(run.classes)),
            "auc_ci95": bootstrap_auc_ci(labels, probs, n_bootstrap, boot_seed),
            "confusion_matrix": confusion(probs, labels, len(run.classes))}


def _small_fold_note(small: list[dict]) -> str | None:
    if not small:
        return None
    cases = "; ".join(f"fold {w['fold']}: {w['n']} {w['class']}" for w in small)
    return (f"Small test folds ({cases}): with fewer than {SMALL_FOLD} test slides of a class a fold's AUC takes "
            "few values and lands near 0 or 1 by chance, so its per-fold AUC says little on its own.")


def _reconcile_note(result: dict) -> str | None:
    mean = result["summary"]["auc"]["mean"]
    pooled = [p["auc"] for p in result["pooled_by_seed"] if p["auc"] is not None]
    if mean is None or not pooled:
        return None
    pooled_text = f"{np.mean(pooled):.3f}" + (" (mean over seeds)" if len(pooled) > 1 else "")
    return (f"The mean per-fold AUC ({mean:.3f}) and the pooled AUC ({pooled_text}) differ by "
            f"{abs(mean - float(np.mean(pooled))):.3f} because a per-fold AUC ranks test slides only against "
            "slides of the same fold and model, while the pooled AUC also ranks slides scored by different folds' "
            "models against each other (their calibration differences count as errors), so a small per-fold "
            "test set moves the first and differently calibrated folds lower the second.")


def compute_report(run: RunResult, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Every number of the report, as a JSON-ready dict (no files written)."""
    per_fold = [{"seed": s, "fold": k, **fold_metrics(*run.scores((s, k)))} for s, k in run.pairs]
    undefined = [m["fold"] for m in per_fold if m["auc"] is None]
    rule = f"P({run.classes[1]}) >= {THRESHOLD}" if len(run.classes) == 2 else "the most probable class"
    labels = {key: metric_label(key, len(run.classes)) for key in METRICS}
    seeds = run.seeds
    notes = [f"{len(run.folds)} folds x {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); metrics on each "
             f"fold's test set: {', '.join(labels.values())}; predicted class: {rule}. Spread over folds: standard "
             "deviation (ddof=1) of one seed's fold values; over seeds: of the per-seed means."]
    if run.partial_note:
        notes.insert(0, run.partial_note)
    if undefined:
        notes.append(f"AUC undefined (test set lacks a class) for folds {sorted(set(undefined))}: shown as n/a and "
                     "excluded from the mean and standard deviation.")
    if run.record.inputs is None:
        notes.append("The run record has no input fingerprints (written by an older zoomfeat): which labels and "
                     "feature files the folds were trained on cannot be verified.")
    small = small_folds(per_fold, run.classes)
    pooled_by_seed = [_pooled(run, s, n_bootstrap, seed) for s in seeds]
    spreads = spread(per_fold, seeds)
    result = {
        "run_dir": str(run.run_dir),
        "metadata": run_metadata(run.record),
        "n_folds": len(run.folds),
        "seeds": seeds,
        "missing": [list(p) for p in (run.completeness.missing if run.completeness else ())],
        "metric_labels": labels,
        "threshold": THRESHOLD,
        "classes": run.classes,
        "folds": per_fold,
        "summary": {key: spreads[key]["all"] if len(seeds) > 1 else spreads[key]["folds"][str(seeds[0])]
                    for key in METRICS},
        "spread": spreads,
        "pooled": pooled_by_seed[0],
        "pooled_by_seed": pooled_by_seed,
        "small_folds": small,
        "folds_auc_undefined": undefined,
        "notes": notes,
    }
    notes += [n for n in (_small_fold_note(small), _reconcile_note(result)) if n]
    return result


def _roc_inputs(run: RunResult) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """fold -> (test labels 0/1, P(class 1)) of the first seed of a binary run (the ROC figure's input)."""
    first = run.seeds[0]
    return {k: (run.scores((s, k))[0], run.scores((s, k))[1][:, 1]) for s, k in run.pairs if s == first}


def _metadata_rows(meta: dict, n_folds: int) -> list[tuple[str, str]]:
    rows = [("task", meta["task"]), ("classes", ", ".join(meta["classes"])), ("protocol", meta["protocol"]),
            ("feature set", meta["features"]), ("feature dim", meta["feature_dim"]), ("model", meta["model"]),
            ("split source", meta["split_source"]), ("labels", meta["labels"]), ("folds", n_folds),
            ("seeds", ", ".join(map(str, meta.get("seeds") or []))), ("extractor", meta["extractor"])]
    extractor_config = meta["extractor_config"]
    if isinstance(extractor_config, dict):
        rows += [(f"extractor_config.{k}", json.dumps(v) if isinstance(v, (dict, list)) else v)
                 for k, v in extractor_config.items()]
    if isinstance(meta["protocol_settings"], dict):
        rows.append(("protocol settings", json.dumps(meta["protocol_settings"], sort_keys=True)))
    if isinstance(meta["model_config"], dict):
        rows.append(("model settings", json.dumps(meta["model_config"], sort_keys=True)))
    rows += [(f"plan: {r['setting']}", f"{r['value']} [{r['source']}]") for r in meta.get("plan") or []]
    return [(k, "n/a" if v is None else str(v)) for k, v in rows]


def _counts_text(m: dict) -> str:
    return f"{m['n_pos']}/{m['n_neg']}" if "n_pos" in m else "/".join(map(str, m["class_counts"]))


def _fold_rows(result: dict) -> list[list[str]]:
    several = len(result["seeds"]) > 1
    rows = [([str(m["seed"])] if several else []) + [str(m["fold"]), str(m["n_test"]), _counts_text(m)]
            + [fmt(m[key]) for key in METRICS] for m in result["folds"]]
    pad = [""] * (3 if several else 2)
    for s in result["seeds"]:
        stats = {key: result["spread"][key]["folds"][str(s)] for key in METRICS}
        label = f"seed {s}: mean ± std over folds" if several else "mean ± std over folds"
        label += f" ({stats['auc']['n']} of {result['n_folds']} folds for AUC)"
        rows.append([label, *pad] + [fmt_mean_std(stats[key]) for key in METRICS])
    seeds = {key: result["spread"][key]["seeds"] for key in METRICS}
    rows.append([f"mean ± std over seeds (of the per-seed means, {len(result['seeds'])} seed(s))", *pad]
                + [fmt_mean_std(seeds[key]) for key in METRICS])
    return rows


def _fold_header(result: dict) -> list[str]:
    classes = result["classes"]
    counts = "pos/neg" if len(classes) == 2 else "/".join(classes)
    seed = ["seed"] if len(result["seeds"]) > 1 else []
    return [*seed, "fold", "test slides", counts, *(result["metric_labels"][key] for key in METRICS)]


def _fold_heading(result: dict) -> str:
    missing = result["missing"]
    return "Test metrics per fold" + (f" (partial run: {len(missing)} recorded (seed, fold) pair(s) missing, see "
                                      "the note below)" if missing else "")


def _pooled_line(result: dict) -> str:
    lines = []
    for pooled in result["pooled_by_seed"]:
        ci = pooled["auc_ci95"]
        ci_text = "n/a" if ci["low"] is None else f"[{ci['low']:.3f}, {ci['high']:.3f}]"
        counts = ", ".join(f"{n} {c}" for c, n in zip(result["classes"], pooled["class_counts"]))
        seed = f" (seed {pooled['seed']})" if len(result["seeds"]) > 1 else ""
        lines.append(f"Pooled test {result['metric_labels']['auc']}{seed} over all {result['n_folds']} folds "
                     f"({pooled['n_test']} slides: {counts}): {fmt(pooled['auc'])}, bootstrap 95% CI {ci_text} "
                     f"({ci['n_valid']} of {ci['n_bootstrap']} resamples of slides, seed {ci['seed']}).")
    return " ".join(lines)


def _first_seed(result: dict) -> str:
    return f", seed {result['seeds'][0]}" if len(result["seeds"]) > 1 else ""


def _title(meta: dict) -> str:
    return f"Cross-validation report: {meta['task']} / {meta['features']}"


def render_html(result: dict, images: dict[str, bytes]) -> str:
    meta = result["metadata"]
    parts = [html.heading("Run"), html.table(["setting", "value"], _metadata_rows(meta, result["n_folds"])),
             html.heading(_fold_heading(result)),
             html.table(_fold_header(result), _fold_rows(result), [False] + [True] * (len(_fold_header(result)) - 1)),
             html.paragraph(_pooled_line(result))]
    parts += [html.paragraph(note, "note") for note in result["notes"]]
    if "roc.png" in images:
        parts += [html.heading(f"ROC curves{_first_seed(result)}"), html.image(images["roc.png"], "ROC curves per fold and mean ROC")]
    parts += [html.heading(f"Confusion matrix (pooled test{_first_seed(result)})"), html.image(images["confusion.png"], "confusion matrix")]
    return html.page(_title(meta), parts)


def render_markdown(result: dict, images: dict[str, bytes]) -> str:
    meta = result["metadata"]
    lines = [f"# {_title(meta)}", "",
             html.markdown_table(["setting", "value"], _metadata_rows(meta, result["n_folds"])), "",
             f"## {_fold_heading(result)}", "", html.markdown_table(_fold_header(result), _fold_rows(result)), "",
             _pooled_line(result), ""]
    lines += [f"> {note}" for note in result["notes"]]
    lines += [""] + (["![ROC curves](roc.png)", ""] if "roc.png" in images else [])
    lines += ["![Confusion matrix](confusion.png)", ""]
    return "\n".join(lines)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, *, n_bootstrap: int = 1000,
                 seed: int = 0, allow_partial: bool = False) -> dict:
    """Write report.html / report.md / report.json / confusion.png (and roc.png for binary tasks); return
    report.json's dict. ``out_dir`` defaults to ``RUN_DIR/report``; the dict has ``files`` (name -> path)."""
    run = load_run(run_dir, allow_partial)
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
