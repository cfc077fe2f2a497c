"""Compare ``train-mil`` runs: a feature-set x task table of mean +- std test AUC, paired per-(seed, fold) tests.

Runs are grouped by the task of their run record. Within a task every run is paired by (init seed, fold) with the
reference run of that task (``reference`` when it is of that task, else the task's first run), on the pairs both
runs hold (the number used is reported): the per-pair AUC differences (run - reference), a Wilcoxon signed-rank
p-value over them, and a paired bootstrap 95% CI of their mean (slides resampled with replacement within each
fold's test set, stratified by class so every draw has an AUC, the same draw for both runs). A second table gives
every metric of :mod:`mil.metrics` by name. A partial run is refused unless ``allow_partial``; then its cells
and the notes name the missing folds. Runs of one task must share their label map and their splits (the
``split_fingerprints`` of their records, else the test slide ids of each fold): otherwise a DataError names the
folds that differ.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from mil import html, plots
from mil.metrics import METRICS, auroc, fmt, fmt_mean_std, mean_std, metric_label
from mil.record import RunRecord
from mil.report import Pair, RunResult, fold_metrics, load_run, resampled_aucs
from zoomfeat.errors import DataError
from zoomfeat.store import write_json_atomic, write_text


def base_feature_set(record: RunRecord) -> str:
    """``<extractor>@<mags>`` (e.g. ``zoomldm@20x+5x``); the feature folder's name when no extractor is recorded."""
    spec = record.feature_spec
    base = record.extractor or spec.directory.name or "features"
    return f"{base}@{spec.mags_text}"


def training_data(record: RunRecord) -> tuple[float, bool]:
    """(training fraction, synthetic augmentation) of a run (``--train-fraction``, ``--augment``)."""
    config = record.config or {}
    return float(config.get("train_fraction") or 1.0), bool(config.get("augment"))


def feature_set_name(record: RunRecord) -> str:
    """The row name: the feature set, ``+syn`` for synthetic augmentation, ``NN%`` for a training fraction."""
    fraction, synthetic = training_data(record)
    name = base_feature_set(record) + (" +syn" if synthetic else "")
    return name if fraction == 1.0 else f"{name} {fraction * 100:g}%"


def fraction_curves(entries: list[dict], records: dict[str, RunRecord]) -> dict[str, dict[str, dict[float, float]]]:
    """task -> series (feature set, ``+syn``) -> {training fraction: mean test AUC}: the label-efficiency curves,
    only for series with runs at two or more fractions."""
    curves: dict[str, dict[str, dict[float, float]]] = {}
    for e in entries:
        record = records[e["run_dir"]]
        fraction, synthetic = training_data(record)
        if e["auc"]["mean"] is None:
            continue
        series = base_feature_set(record) + (" +syn" if synthetic else "")
        curves.setdefault(e["task"], {}).setdefault(series, {})[fraction] = e["auc"]["mean"]
    return {t: {n: dict(sorted(v.items())) for n, v in series.items() if len(v) >= 2}
            for t, series in curves.items() if any(len(v) >= 2 for v in series.values())}


# ---------------------------------------------------------------------------------------------- splits
def _test_ids(run: RunResult, fold: int) -> frozenset[str]:
    pair = next(p for p in run.pairs if p[1] == fold)  # a fold's test set is the same under every seed
    return frozenset(run.test(pair)["slide_id"].astype(str))


def differing_folds(a: RunResult, b: RunResult) -> list[int]:
    """Folds whose splits differ between two runs (fingerprints when both have them, else test slide ids)."""
    fa, fb = a.record.split_fingerprints, b.record.split_fingerprints
    if fa and fb:
        fa, fb = {int(k): v for k, v in fa.items()}, {int(k): v for k, v in fb.items()}
        return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    folds = set(a.folds) | set(b.folds)
    return sorted(k for k in folds if k not in a.folds or k not in b.folds or _test_ids(a, k) != _test_ids(b, k))


def check_same_splits(reference: RunResult, runs: list[RunResult], task: str) -> None:
    """DataError naming the folds that differ when a run of ``task`` was not made on the reference's splits."""
    for run in runs:
        if run is reference:
            continue
        if run.record.label_map != reference.record.label_map:
            raise DataError(f"task {task!r}: {run.run_dir} has classes {run.record.label_map}, {reference.run_dir} "
                            f"has {reference.record.label_map}: compare runs of one label map")
        bad = differing_folds(reference, run)
        if bad:
            raise DataError(
                f"task {task!r}: {run.run_dir} and {reference.run_dir} were not made on the same splits "
                f"(folds {', '.join(map(str, bad))} differ): rerun train-mil with the same --splits")


# ---------------------------------------------------------------------------------------------- statistics
def fold_aucs(run: RunResult) -> dict[Pair, float | None]:
    """(seed, fold) -> test AUC."""
    return {p: auroc(run.scores(p)[1], run.scores(p)[0], len(run.classes)) for p in run.pairs}


def pair_name(pair: Pair) -> str:
    """``"seed 0 fold 3"``: a (seed, fold) as a JSON key and in tables."""
    return f"seed {pair[0]} fold {pair[1]}"


def _aligned(run: RunResult, ref: RunResult, fold: Pair) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels [n], run probs [n, C], reference probs [n, C] on the test slides both runs scored in ``fold``."""
    a = run.test(fold).drop_duplicates("slide_id").set_index("slide_id")
    b = ref.test(fold).drop_duplicates("slide_id").set_index("slide_id")
    ids = sorted(set(a.index) & set(b.index))
    return b.loc[ids, "label"].to_numpy(dtype=int), run.probs(a.loc[ids]), ref.probs(b.loc[ids])


def paired_bootstrap_ci(run: RunResult, ref: RunResult, folds: list[Pair], n_bootstrap: int, seed: int) -> dict:
    """95% percentile CI of mean over ``folds`` of AUC(run) - AUC(reference), slides resampled per fold by class
    (every class keeps its count, so every draw has an AUC; the same draw for both runs)."""
    empty = {"low": None, "high": None, "n_bootstrap": n_bootstrap, "seed": seed}
    if not folds or n_bootstrap <= 0:
        return empty
    rng = np.random.default_rng(seed)
    total = np.zeros(n_bootstrap)
    for k in folds:
        labels, p_run, p_ref = _aligned(run, ref, k)
        members = [np.flatnonzero(labels == c) for c in range(p_run.shape[1])]
        if any(m.size == 0 for m in members):  # the slides both runs scored lack a class: no paired AUC
            return {**empty, "undefined_fold": k[1], "undefined_pair": list(k)}
        idx = np.concatenate([rng.choice(m, size=(n_bootstrap, m.size)) for m in members], axis=1)
        total += resampled_aucs(labels, p_run, idx) - resampled_aucs(labels, p_ref, idx)
    low, high = np.percentile(total / len(folds), [2.5, 97.5])
    return {"low": float(low), "high": float(high), "n_bootstrap": n_bootstrap, "seed": seed}


def wilcoxon_p(differences: list[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value; None with fewer than two non-zero differences."""
    if sum(1 for d in differences if d != 0) < 2:
        return None
    return float(wilcoxon(differences).pvalue)


def paired_comparison(run: RunResult, ref: RunResult, n_bootstrap: int, seed: int) -> dict:
    """Per-(seed, fold) AUC differences (run - reference) on the pairs both runs hold where both AUCs are
    defined, and their tests; ``n_pairs`` says how many pairs were used, ``n_unpaired`` how many were not."""
    a, b = fold_aucs(run), fold_aucs(ref)
    pairs = [p for p in b if p in a and a[p] is not None and b[p] is not None]
    diffs = {pair_name(p): a[p] - b[p] for p in pairs}
    values = list(diffs.values())
    return {
        "pairs": [list(p) for p in pairs],
        "n_pairs": len(pairs),
        "n_unpaired": len(set(a) ^ set(b)),
        "folds": sorted({k for _, k in pairs}),
        "seeds": list(dict.fromkeys(s for s, _ in pairs)),
        "differences": diffs,
        "mean_difference": float(np.mean(values)) if values else None,
        "wilcoxon_p": wilcoxon_p(values),
        "bootstrap_ci95": paired_bootstrap_ci(run, ref, pairs, n_bootstrap, seed),
    }


# ---------------------------------------------------------------------------------------------- assembly
def _row_names(runs: list[RunResult]) -> dict[Path, str]:
    """Feature-set name of each run, made unique within a task by adding the run folder's name."""
    names, seen = {}, set()
    for run in runs:
        name = feature_set_name(run.record)
        key = (name, run.record.task)
        if key in seen:
            name = f"{name} ({run.run_dir.name})"
        seen.add((name, run.record.task))
        names[run.run_dir] = name
    return names


def compute_comparison(runs: list[RunResult], reference: RunResult | None = None, *, n_bootstrap: int = 1000,
                       seed: int = 0) -> dict:
    """Every number of the comparison (JSON-ready); raises DataError for runs of one task on different splits."""
    names = _row_names(runs)
    groups: dict[str, list[RunResult]] = {}  # task -> its runs
    for run in runs:
        groups.setdefault(run.record.task, []).append(run)
    entries, comparisons, references = [], [], {}
    for task, members in groups.items():
        ref = reference if reference is not None and reference.record.task == task else members[0]
        references[task] = str(ref.run_dir)
        check_same_splits(ref, members, task)
        for run in members:
            entries.append(_entry(run, task, names[run.run_dir]))
            if run is not ref:
                comparisons.append({"task": task, "feature_set": names[run.run_dir], "run_dir": str(run.run_dir),
                                    "reference": names[ref.run_dir], "reference_run_dir": str(ref.run_dir),
                                    **paired_comparison(run, ref, n_bootstrap, seed)})
    feature_sets = list(dict.fromkeys(e["feature_set"] for e in entries))
    table = {fs: {e["task"]: e["auc"] for e in entries if e["feature_set"] == fs} for fs in feature_sets}
    curves = fraction_curves(entries, {str(r.run_dir): r.record for r in runs})
    return {"tasks": list(groups), "feature_sets": feature_sets, "references": references, "runs": entries,
            "table": table, "comparisons": comparisons, "n_bootstrap": n_bootstrap, "seed": seed,
            "fraction_curves": {t: {n: {str(f): a for f, a in v.items()} for n, v in s.items()}
                                for t, s in curves.items()},
            "notes": _notes(entries, comparisons)}


def _entry(run: RunResult, task: str, name: str) -> dict:
    """One run's numbers: AUC per (seed, fold), mean ± std over folds and over seeds, every metric's mean ± std."""
    per_pair = [{"seed": s, "fold": k, **fold_metrics(*run.scores((s, k)))} for s, k in run.pairs]
    seed_means = [mean_std([m["auc"] for m in per_pair if m["seed"] == s])["mean"] for s in run.seeds]
    return {"run_dir": str(run.run_dir), "task": task, "feature_set": name, "seeds": run.seeds,
            "fold_auc": {pair_name((m["seed"], m["fold"])): m["auc"] for m in per_pair},
            "auc": mean_std([m["auc"] for m in per_pair]), "auc_over_seeds": mean_std(seed_means),
            "metrics": {key: mean_std([m[key] for m in per_pair]) for key in METRICS},
            "metric_labels": {key: metric_label(key, len(run.classes)) for key in METRICS},
            "missing": [list(p) for p in (run.completeness.missing if run.completeness else ())],
            "partial_note": run.partial_note}


def _notes(entries: list[dict], comparisons: list[dict]) -> list[str]:
    notes = ["Cells: mean ± standard deviation (ddof=1) of the test AUC over folds (every seed's folds), and for "
             "runs of several init seeds the mean ± standard deviation over seeds of the per-seed means; paired "
             "tests are over the (seed, fold) pairs both runs hold where both have an AUC."]
    for e in entries:
        if e["partial_note"]:
            notes.append(f"{e['feature_set']} / {e['task']} ({e['run_dir']}): {e['partial_note']}")
    for c in comparisons:
        unpaired = f", {c['n_unpaired']} (seed, fold) pair(s) held by only one of them" if c["n_unpaired"] else ""
        notes.append(f"{c['feature_set']} vs {c['reference']} ({c['task']}): paired on {c['n_pairs']} (seed, fold) "
                     f"pair(s) (seeds {', '.join(map(str, c['seeds'])) or 'none'}){unpaired}.")
    for e in entries:
        if e["auc"]["n_excluded"]:
            notes.append(f"{e['feature_set']} / {e['task']}: {e['auc']['n_excluded']} fold(s) with a single-class "
                         "test set have no AUC and are excluded.")
    return notes


def cell_text(entry: dict | None) -> str:
    """A run's table cell: mean ± std over folds, over seeds (several), and a partial run's mark."""
    if entry is None:
        return "—"
    text = f"{fmt_mean_std(entry['auc'])} (n={entry['auc']['n']})"
    if len(entry["seeds"]) > 1:
        text += f"; over {len(entry['seeds'])} seeds {fmt_mean_std({**entry['auc_over_seeds'], 'over': 'seed'})}"
    if entry["missing"]:
        text += f" [partial: {len(entry['missing'])} (seed, fold) pair(s) missing]"
    return text


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for fs in result["feature_sets"]:
        cells = [next((e for e in result["runs"] if e["feature_set"] == fs and e["task"] == t), None)
                 for t in result["tasks"]]
        rows.append([fs] + [cell_text(c) for c in cells])
    return rows


def _metric_rows(result: dict) -> list[list[str]]:
    return [[e["feature_set"], e["task"]] + [fmt_mean_std(e["metrics"][key]) for key in METRICS]
            + (["partial: " + ", ".join(pair_name(tuple(p)) for p in e["missing"])] if e["missing"] else ["complete"])
            for e in result["runs"]]


def _metric_header(result: dict) -> list[str]:
    labels = {}
    for e in result["runs"]:  # "AUC (one-vs-rest macro)" when any run has more than two classes
        for key, label in e["metric_labels"].items():
            labels[key] = label if len(label) > len(labels.get(key, "")) else labels[key]
    return ["feature set", "task", *(labels[key] for key in METRICS), "folds"]


def comparison_rows(result: dict) -> list[list[str]]:
    rows = []
    for c in result["comparisons"]:
        ci = c["bootstrap_ci95"]
        ci_text = "n/a" if ci["low"] is None else f"[{ci['low']:+.3f}, {ci['high']:+.3f}]"
        mean = "n/a" if c["mean_difference"] is None else f"{c['mean_difference']:+.3f}"
        diffs = ", ".join(f"{d:+.3f}" for d in c["differences"].values()) or "n/a"
        rows.append([c["task"], c["feature_set"], c["reference"], str(c["n_pairs"]), diffs, mean, ci_text,
                     fmt(c["wilcoxon_p"])])
    return rows


COMPARISON_HEADER = ["task", "feature set", "reference", "(seed, fold) pairs", "per-pair ΔAUC", "mean ΔAUC",
                     "bootstrap 95% CI", "Wilcoxon p"]


def render_html(result: dict, images: dict[str, bytes]) -> str:
    parts = [html.heading("Test AUC per feature set and task"),
             html.table(["feature set", *result["tasks"]], table_rows(result)),
             html.heading("Every metric per run (mean ± std over folds)"),
             html.table(_metric_header(result), _metric_rows(result)),
             html.heading("Paired differences against the reference")]
    if result["comparisons"]:
        parts.append(html.table(COMPARISON_HEADER, comparison_rows(result)))
    else:
        parts.append(html.paragraph("No pairs: every task has a single run."))
    parts += [html.paragraph(n, "note") for n in result["notes"]]
    parts.append(html.paragraph(f"Bootstrap: {result['n_bootstrap']} resamples, seed {result['seed']}, slides "
                                "resampled within each fold's test set, stratified by class."))
    for name, png in images.items():
        what = "Label efficiency (mean test AUC against the training fraction)" if name.startswith("fraction_") \
            else "Per-fold test AUC"
        parts += [html.heading(f"{what}: {name}", 3), html.image(png, f"{what} {name}")]
    return html.page("Feature-set comparison", parts)


def render_markdown(result: dict, images: dict[str, bytes]) -> str:
    lines = ["# Feature-set comparison", "", "## Test AUC per feature set and task", "",
             html.markdown_table(["feature set", *result["tasks"]], table_rows(result)), "",
             "## Every metric per run (mean ± std over folds)", "",
             html.markdown_table(_metric_header(result), _metric_rows(result)), "",
             "## Paired differences against the reference", ""]
    lines.append(html.markdown_table(COMPARISON_HEADER, comparison_rows(result)) if result["comparisons"]
                 else "No pairs: every task has a single run.")
    lines += [""] + [f"> {n}" for n in result["notes"]] + [""]
    lines += [f"![per-fold AUC {name}]({name})" for name in images] + [""]
    return "\n".join(lines)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "task"


def build_comparison(run_dirs: list[str | Path], out_dir: str | Path, reference: str | Path | None = None, *,
                     n_bootstrap: int = 1000, seed: int = 0, allow_partial: bool = False) -> dict:
    """Write compare.html (and the same page as index.html), compare.md, compare.json, per-task per-fold PNGs.

    Returns compare.json's dict, with ``files`` (name -> path).
    """
    runs = [load_run(d, allow_partial) for d in run_dirs]
    if not runs:
        raise DataError("no run directories to compare: pass at least one RUN_DIR")
    ref = None
    if reference is not None:
        ref_path = Path(reference).resolve()
        ref = next((r for r in runs if r.run_dir.resolve() == ref_path), None) or load_run(reference, allow_partial)
        if not any(r is ref for r in runs):
            runs = [ref, *runs]
    result = compute_comparison(runs, ref, n_bootstrap=n_bootstrap, seed=seed)
    out = Path(out_dir)
    images = {}
    for task in result["tasks"]:
        series = {}
        for e in (e for e in result["runs"] if e["task"] == task):
            for s in e["seeds"]:
                name = e["feature_set"] + (f" (seed {s})" if len(e["seeds"]) > 1 else "")
                series[name] = {int(key.split()[3]): v for key, v in e["fold_auc"].items()
                                if key.startswith(f"seed {s} ")}
        images[f"fold_auc_{_safe(task)}.png"] = plots.fold_auc_figure(series, f"test AUC per fold: {task}")
    for task, curves in result["fraction_curves"].items():
        numeric = {n: {float(f): a for f, a in v.items()} for n, v in curves.items()}
        images[f"fraction_auc_{_safe(task)}.png"] = plots.fraction_figure(numeric, f"label efficiency: {task}")
    files = {name: out / name for name in images}
    for name, png in images.items():
        plots.write_png(files[name], png)
    page = render_html(result, images)
    for name in ("compare.html", "index.html"):
        files[name] = write_text(out / name, page)
    files["compare.md"] = write_text(out / "compare.md", render_markdown(result, images))
    files["compare.json"] = out / "compare.json"
    result["files"] = {k: str(v) for k, v in files.items()}
    write_json_atomic(files["compare.json"], result)
    return result
