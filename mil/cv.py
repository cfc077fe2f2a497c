"""The cross-validation run: every fold of a split folder, once per init seed, resumable per (seed, fold), with a
typed record of its inputs.

RUN_DIR holds the run record ``config.json`` (:mod:`mil.record`), ``summary.csv`` (:func:`write_summary`) and a
folder per (seed, fold) (``mil.record.fold_dir``: ``fold_<k>/``, or ``seed_<s>/fold_<k>/`` in a run of several
``--seeds``) with
    predictions.csv   slide_id,case_id,label,prob,split,prob_<class>...: val and test rows; label = class index
                      (record label_map); prob_<class> = P(class) for every class; prob = P(class 1), written
                      for binary tasks only
    metrics.json      val_/test_ auc, balanced_accuracy, accuracy, macro_f1 (mil.metrics, from the predictions),
                      losses, sizes, epochs_trained, best_epoch (1-based), seed; written last: the fold is done
    model.ckpt        state_dict + model name/kwargs + feature spec + label map + seed (torch.save)
A (seed, fold) whose metrics.json exists is skipped (:func:`run_cv`). Every file is written through
:func:`zoomfeat.store.atomic_write` (a crash or Ctrl-C leaves no partial or temp file).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from torch import nn

from mil.augment import AugmentedStore, plan_cohort, usable_copies
from mil.bags import BagStore, FeatureSpec, MILDataWarning, read_extractor, scan_bags
from mil.config import MILConfig, describe_plan_rows, effective_model_kwargs, plan_rows
from mil.metrics import METRICS, check_finite, classification_metrics, fmt, mean_std, metric_label
from mil.record import (RECORD_NAME, RunRecord, check_resume, finished_pairs, fold_dir, input_fingerprints,
                        read_record, split_fingerprint, write_record)
from mil.registry import build_model
from mil.tasks import LabelledCohort, apply_task
from mil.train import FoldData, epoch_order, resolve_device, run_folds
from splits.audit import trainability_problems
from splits.io import PARTS, SplitFold, read_splits_dir
from zoomfeat.labels import read_labels
from zoomfeat import __version__
from zoomfeat.errors import CheckpointError, ConfigError, DataError, one_line
from zoomfeat.fitting import load_checkpoint
from zoomfeat.log import note
from zoomfeat.runtime import check_devices
from zoomfeat.store import Claim, atomic_write, save_torch, write_json_atomic

CHECKPOINT_FORMAT = "zoomfeat-mil"
CHECKPOINT_VERSION = 1


def _select_folds(folds: list[SplitFold], wanted: tuple[int, ...] | None, source: str) -> list[SplitFold]:
    if wanted is None:
        return folds
    known = {f.index: f for f in folds}
    missing = [k for k in wanted if k not in known]
    if missing:
        raise ConfigError(f"--folds {','.join(map(str, missing))} not in {source} (folds there: "
                          f"{','.join(map(str, sorted(known)))})")
    return [known[k] for k in wanted]


def _report_unlabelled(folds: list[SplitFold], cohort: LabelledCohort) -> set[str]:
    named = {s for f in folds for s in f.all_slides()}
    labelled = set(cohort.table["slide_id"])
    unlabelled = sorted(named - labelled)
    if unlabelled:
        warnings.warn(f"{len(unlabelled)} slide(s) named in the splits have no usable label (left out), "
                      f"e.g. {', '.join(unlabelled[:3])}", MILDataWarning, stacklevel=3)
    return named & labelled


def _fold_data(fold: SplitFold, usable: set[str], cohort: LabelledCohort) -> FoldData:
    table = cohort.table.set_index("slide_id")
    parts = {p: [s for s in fold.part(p) if s in usable] for p in PARTS}
    ids = [s for p in PARTS for s in parts[p]]
    return FoldData(parts, {s: int(table.at[s, "target"]) for s in ids},
                    {s: str(table.at[s, "case_id"]) for s in ids})


def check_trainable(folds: dict[int, FoldData], label_map: dict[str, int], source: str) -> None:
    """DataError, before any training, for a fold with no training or test slide or a one-class training part."""
    names = {v: k for k, v in label_map.items()}
    problems = [p for k, data in folds.items() for p in trainability_problems(
        k, {part: len(ids) for part, ids in data.parts.items()}, {names[data.target[s]] for s in data.parts["train"]})]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{source}: {problems[0]}{more}; `zoomfeat splits audit` lists every problem")


def check_model_kwargs(cfg: MILConfig, in_dim: int, n_classes: int) -> None:
    """Build the head once with ``--model-kwargs`` so a bad value is a one-line error before any work."""
    try:
        build_model(cfg.model, in_dim, n_classes, **effective_model_kwargs(cfg))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"--model-kwargs {json.dumps(cfg.model_kwargs)} does not make a {cfg.model} head "
                          f"({one_line(exc)}); see the head's arguments in mil/heads/") from exc


def _augmentation(cfg: MILConfig, spec: FeatureSpec, all_folds: list[SplitFold], usable: set[str],
                  cohort: LabelledCohort, dim: int):
    """The plan of ``--augment`` / ``--train-fraction`` over every fold of the split folder for the init seed
    ``cfg.seed`` (the training fraction's patients are drawn per seed) (None without them)."""
    if cfg.augment is None and float(cfg.train_fraction) == 1.0:
        return None
    table = cohort.table
    case_of = dict(zip(table["slide_id"], table["case_id"].astype(str)))
    label_of = dict(zip(table["slide_id"], table["target"].astype(int)))
    aug_spec, available = None, ()
    if cfg.augment is not None:
        aug_spec = FeatureSpec(Path(cfg.augment), spec.mags)
        candidates = usable_copies(cfg.augment, spec, usable)  # refused unless made from this feature set
        scan = scan_bags(aug_spec, candidates)
        if scan.dim != dim:
            raise DataError(f"--augment {cfg.augment}: {scan.dim}-d bags, but {spec} gives {dim}-d: make the "
                            "copies from the same feature set")
        available = scan.usable
    every = {f.index: _fold_data(f, usable, cohort) for f in all_folds}
    return plan_cohort(every, case_of, label_of, fraction=float(cfg.train_fraction), seed=cfg.seed,
                       augment_spec=aug_spec, available=available)


def _record(cfg: MILConfig, spec: FeatureSpec, cohort: LabelledCohort, dim: int, folds: list[SplitFold],
            usable: tuple[str, ...], left_out: dict[str, int], extra_files: dict | None = None) -> RunRecord:
    extractor, extractor_config = read_extractor(spec, usable[0])
    plan = [{"setting": k, "value": v, "source": src} for k, v, src in plan_rows(cfg)]
    return RunRecord(
        config=cfg.to_json(), task=cfg.task, label_map=cohort.label_map, feature_spec=spec,
        seeds=tuple(cfg.seeds), folds=tuple(cfg.folds or ()), plan=plan,
        feature_dim=dim, split_source=str(Path(cfg.splits).resolve()),
        split_fingerprints={str(f.index): split_fingerprint({p: f.part(p) for p in PARTS}) for f in folds},
        inputs=input_fingerprints(cfg.labels, {**{s: spec.path(s) for s in usable}, **(extra_files or {})}),
        extractor=extractor, extractor_config=extractor_config, left_out=left_out,
        labels_dropped=dict(cohort.dropped), zoomfeat_version=__version__)


def _class_columns(frame: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """``prob_0 .. prob_{C-1}`` of mil.train renamed ``prob_<class name>``; ``prob`` kept for two classes only."""
    frame = frame.rename(columns={f"prob_{i}": f"prob_{name}" for i, name in enumerate(classes)})
    if len(classes) != 2:
        frame = frame.drop(columns=["prob"], errors="ignore")
    return frame


def fold_metrics(predictions: pd.DataFrame, classes: list[str]) -> dict:
    """``val_<m>`` and ``test_<m>`` for every metric of mil.metrics.METRICS, from a fold's predictions table."""
    out = {}
    for split in ("val", "test"):
        rows = predictions[predictions["split"] == split]
        probs = rows[[f"prob_{c}" for c in classes]].to_numpy(dtype=float).reshape(len(rows), len(classes))
        values = classification_metrics(probs, rows["label"].to_numpy(dtype=int), len(classes))
        out.update({f"{split}_{m}": values[m] for m in METRICS})
    return out


def _write_fold(fold_dir: Path, result, cfg: MILConfig, cohort: LabelledCohort, dim: int) -> dict:
    """Write a fold's checkpoint, predictions and (last, marking it done) metrics; returns the metrics."""
    classes = [n for n, _ in sorted(cohort.label_map.items(), key=lambda kv: kv[1])]
    predictions = _class_columns(result.predictions, classes)
    check_finite(predictions[[f"prob_{c}" for c in classes]].to_numpy(dtype=float),
                 f"fold {result.metrics['fold']} (seed {cfg.seed}) predictions")
    metrics = {k: v for k, v in result.metrics.items()
               if not k.startswith(("val_", "test_")) or k in ("val_loss", "test_loss")}
    metrics = {**metrics, "seed": cfg.seed, **fold_metrics(predictions, classes)}
    ckpt = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "model": cfg.model,
            "model_kwargs": {**effective_model_kwargs(cfg), "in_dim": dim, "n_classes": len(cohort.label_map)},
            "features": str(cfg.features), "label_map": cohort.label_map, "task": cfg.task, "seed": cfg.seed,
            **result.checkpoint}
    save_torch(ckpt, fold_dir / "model.ckpt")
    with atomic_write(fold_dir / "predictions.csv") as tmp:
        predictions.to_csv(tmp, index=False)
    write_json_atomic(fold_dir / "metrics.json", metrics)  # last: marks the fold done
    return metrics


def _check_out(run: Path) -> None:
    """``--out`` must be a new folder or a train-mil run: its config.json is never overwritten otherwise."""
    if (run / RECORD_NAME).is_file():
        try:
            read_record(run)
        except DataError as exc:
            raise ConfigError(f"--out {run} is not a train-mil run folder ({exc}); pass another --out") from exc


STALE_TEMP_S = 600.0  # a temporary file this old is a writer's that died (a fold's files take seconds to write)


def remove_stale_temps(run: Path, now: float | None = None) -> list[Path]:
    """Delete the temporary files (``.<name>.tmp<pid>``, zoomfeat.store.temp_path) that a killed run left in
    ``run``; a write in progress is never that old. Returns what was removed."""
    now = time.time() if now is None else now
    stale = [p for p in run.glob("**/.*.tmp*") if p.is_file() and now - p.stat().st_mtime > STALE_TEMP_S]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _check_resumed_heads(run: Path, cfg: MILConfig, record: RunRecord, done: list[tuple[int, int]], dim: int,
                         n_classes: int) -> None:
    """ConfigError when a finished fold's head was built with other arguments than this run would use: the
    record keeps the arguments as given, and what a task implies (e.g. DSMIL's one positive stream under
    ``--task hrd``, new in a later zoomfeat) could otherwise mix two kinds of head in one run."""
    want = {**effective_model_kwargs(cfg), "in_dim": dim, "n_classes": n_classes}
    for seed, k in done:
        path = fold_dir(run, record.seeds, seed, k) / "model.ckpt"
        if not path.is_file():
            continue  # a finished fold without its checkpoint is reported where the checkpoint is read
        have = _load_checkpoint(path).get("model_kwargs")
        if have is not None and have != want:
            which = f"fold {k}" if len(record.seeds) == 1 else f"seed {seed} fold {k}"
            raise ConfigError(f"{run}: {which} was trained with head arguments "
                              f"{json.dumps(have, sort_keys=True)}, this run would build "
                              f"{json.dumps(want, sort_keys=True)}; use a new --out, or delete the folder to "
                              "start over")


SUMMARY_COLUMNS: tuple[str, ...] = ("seed", "fold", *(f"test_{m}" for m in METRICS))


def write_summary(run: Path, record: RunRecord) -> pd.DataFrame:
    """summary.csv from every finished (seed, fold)'s metrics.json: seed,fold,test_<metric> (mil.metrics.METRICS),
    a row per (seed, fold); per seed the rows fold ``mean`` and ``std`` over its folds (ddof=1); then the rows
    seed ``mean`` and ``std``, fold ``mean``: over seeds of the per-seed means (the spread over init seeds)."""
    columns = [f"test_{m}" for m in METRICS]
    rows, per_seed = [], []
    for seed in record.seeds:
        folds = [k for s, k in finished_pairs(run, record) if s == seed]
        metrics = [json.loads((fold_dir(run, record.seeds, seed, k) / "metrics.json").read_text()) for k in folds]
        rows += [{"seed": str(seed), "fold": str(k), **{c: m.get(c) for c in columns}} for k, m in zip(folds, metrics)]
        if not folds:
            continue
        stats = {c: mean_std([m.get(c) for m in metrics]) for c in columns}
        mean = {"seed": str(seed), "fold": "mean", **{c: stats[c]["mean"] for c in columns}}
        rows += [mean, {"seed": str(seed), "fold": "std", **{c: stats[c]["std"] for c in columns}}]
        per_seed.append(mean)
    over = {c: mean_std([m[c] for m in per_seed]) for c in columns}
    rows += [{"seed": "mean", "fold": "mean", **{c: over[c]["mean"] for c in columns}},
             {"seed": "std", "fold": "mean", **{c: over[c]["std"] for c in columns}}]
    frame = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    with atomic_write(run / "summary.csv") as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def _fold_line(fold: int, n_folds: int, seed: int, metrics: dict, seconds: float, n_classes: int) -> str:
    """``fold 2/5 (seed 0): val AUC 0.91, test AUC 0.88, 41 s`` (AUC as labelled by mil.metrics)."""
    auc = metric_label("auc", n_classes)
    return (f"fold {fold}/{n_folds} (seed {seed}): val {auc} {fmt(metrics.get('val_auc'), 2)}, "
            f"test {auc} {fmt(metrics.get('test_auc'), 2)}, {seconds:.0f} s")


@dataclass(frozen=True)
class _Cohort:
    """What every seed of a run trains on, checked once before any training."""

    cohort: LabelledCohort
    all_folds: list[SplitFold]
    data: dict[int, FoldData]  # selected fold -> its usable slides
    usable: set[str]
    named: set[str]
    dim: int


def run_cv(cfg: MILConfig, on_fold=None) -> pd.DataFrame:
    """Train and evaluate every selected fold once per seed of ``cfg.seeds`` (skipping finished (seed, fold)
    pairs); returns the summary table. ``on_fold(seed, fold, metrics)`` is called after each fold is written.

    Everything that can be checked is checked before the first fold trains: labels, splits, feature files,
    trainable folds (under every seed's training fraction), model arguments, device settings, and that a
    resumed run has the same inputs and seeds.
    """
    spec = cfg.features
    cohort = apply_task(read_labels(cfg.labels, label_col=cfg.label_col), cfg.task, cfg.label_col,
                        cfg.hrd_threshold, cfg.classes)
    all_folds = read_splits_dir(cfg.splits)
    folds = _select_folds(all_folds, cfg.folds, cfg.splits)
    named = _report_unlabelled(folds, cohort)
    scan = scan_bags(spec, named)
    usable = set(scan.usable)
    data = {f.index: _fold_data(f, usable, cohort) for f in folds}
    check_trainable(data, cohort.label_map, cfg.splits)
    n_classes = len(cohort.label_map)
    check_model_kwargs(cfg, scan.dim, n_classes)
    check_devices(cfg.devices, "cuda" if cfg.accelerator in ("gpu", "cuda") else "cpu")
    left_out = {"no_label": len({s for f in folds for s in f.all_slides()} - named),
                "no_features": len(scan.missing), "empty_bag": len(scan.empty)}
    augmentations = {s: _augmentation(cfg.for_seed(s), spec, all_folds, usable, cohort, scan.dim) for s in cfg.seeds}
    extra_files = {}
    for augmentation in augmentations.values():
        if augmentation is not None:
            check_trainable({k: augmentation.fold_data(k, d) for k, d in data.items()}, cohort.label_map, cfg.splits)
            if augmentation.spec is not None:
                extra_files.update({s: augmentation.spec.path(s) for s in augmentation.available})
    run = Path(cfg.out)
    record = _record(cfg, spec, cohort, scan.dim, all_folds, scan.usable, left_out, extra_files)
    _check_out(run)
    done = finished_pairs(run, record) if (run / RECORD_NAME).is_file() else []
    record = check_resume(run, record, done)
    _check_resumed_heads(run, cfg, record, done, scan.dim, n_classes)
    write_record(run, record)
    remove_stale_temps(run)
    note(describe_plan_rows(plan_rows(cfg, resolve_device(cfg.accelerator)), cfg.model, cfg.protocol.name))
    # every bag is checked for NaN/Inf as it is loaded; mil.train keeps the bags (one contiguous tensor)
    store = BagStore(spec, cache=False)
    inputs = _Cohort(cohort, all_folds, data, usable, named, scan.dim)
    for seed in cfg.seeds:
        _train_pending(cfg.for_seed(seed), run, record, inputs, store, augmentations[seed], on_fold)
    return write_summary(run, record)


@contextlib.contextmanager
def fold_claims(run: Path, record: RunRecord, seed: int, pending: dict[int, FoldData]):
    """The pending folds of ``seed`` this process may train: each claimed (``RUN_DIR/.claims/fold_<k>.lock``,
    ``seed_<s>_fold_<k>.lock`` in a run of several seeds; zoomfeat.store.Claim) so that another train-mil on
    the same folder leaves it alone; claims are released when the block ends, and a fold finished meanwhile by
    another process is dropped."""
    prefix = "" if len(record.seeds) == 1 else f"seed_{seed}_"
    claims = {k: Claim(run, f"{prefix}fold_{k}") for k in pending}
    try:
        held = [k for k in pending if claims[k].acquire()]
        mine = {k: pending[k] for k in held
                if not (fold_dir(run, record.seeds, seed, k) / "metrics.json").is_file()}
        others = sorted(set(pending) - set(held))
        if others:
            note(f"fold(s) {', '.join(map(str, others))} (seed {seed}) claimed by another train-mil on {run}: "
                 "left to it")
        yield mine
    finally:
        for claim in claims.values():
            claim.release()


def _train_pending(cfg: MILConfig, run: Path, record: RunRecord, inputs: _Cohort, store, augmentation=None,
                   on_fold=None) -> None:
    """Train the folds of the init seed ``cfg.seed`` not done yet (mil.train.run_folds, one by one); the epoch
    order runs over the training slides of every fold of the split folder (``inputs.usable``: the checked slides of the selected folds, ``inputs.named``: every slide those folds
    name). A line per fold is printed as its result comes back."""
    cohort, spec, seed = inputs.cohort, cfg.features, cfg.seed
    data = inputs.data
    if augmentation is not None:
        data = {k: augmentation.fold_data(k, d) for k, d in data.items()}
    pending = {k: d for k, d in data.items() if not (fold_dir(run, record.seeds, seed, k) / "metrics.json").is_file()}
    targets = dict(zip(cohort.table["slide_id"], cohort.table["target"].astype(int)))
    parts = [f.part("train") for f in inputs.all_folds]
    available: set[str] = set()
    if augmentation is not None:  # the plans' training slides (fraction, synthetic copies) of every fold
        parts, targets = augmentation.train_parts(), augmentation.targets(targets)
        available = set(augmentation.available)
        if augmentation.spec is not None:
            store = AugmentedStore(store, BagStore(augmentation.spec, cache=False))
    usable, named = inputs.usable, inputs.named
    order = epoch_order(parts, targets,
                        lambda s: s in usable or s in available or (s not in named and spec.path(s).is_file()))
    clock = [time.monotonic()]

    def write(k: int, result) -> None:
        if augmentation is not None:
            result.metrics["augmentation"] = augmentation.plans[k].record()
        metrics = _write_fold(fold_dir(run, record.seeds, seed, k), result, cfg, cohort, inputs.dim)
        now = time.monotonic()
        note(_fold_line(k, len(record.planned_folds), seed, metrics, now - clock[0], record.n_classes))
        clock[0] = now
        if on_fold is not None:
            on_fold(seed, k, metrics)

    with fold_claims(run, record, seed, pending) as mine:  # concurrent runs into one folder share the folds
        run_folds(cfg, mine, order, store, inputs.dim, len(cohort.label_map), write)


def _load_checkpoint(path: Path) -> dict:
    ckpt = load_checkpoint(path, "retrain this fold with `zoomfeat train-mil` (delete its fold folder first)")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a zoomfeat MIL checkpoint (format {ckpt.get('format')!r}); pass a "
                              "train-mil run")
    return ckpt


def load_fold_model(run_dir: str | Path, fold: int, seed: int | None = None) -> tuple[nn.Module, RunRecord]:
    """The trained head of (``seed``, ``fold``) in eval mode and the run's record; ``seed`` None is the run's
    first recorded seed (its only one in a one-seed run; callers of a several-seed run say which they drew).
    CheckpointError for a missing, unreadable or foreign checkpoint, or one whose weights do not fit its own
    architecture."""
    run = Path(run_dir)
    record = read_record(run)
    if seed is not None and seed not in record.seeds:
        raise ConfigError(f"--seed {seed}: {run} was trained with seeds {','.join(map(str, record.seeds))}; "
                          "pass one of them")
    seed = record.seeds[0] if seed is None else seed
    path = fold_dir(run, record.seeds, seed, fold) / "model.ckpt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint for fold {fold}; train it with `zoomfeat train-mil`")
    ckpt = _load_checkpoint(path)
    try:
        kwargs = dict(ckpt["model_kwargs"])
        model = build_model(ckpt["model"], kwargs.pop("in_dim"), kwargs.pop("n_classes"), **kwargs)
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        reason = one_line(exc, 160)
        raise CheckpointError(f"{path}: checkpoint does not rebuild its head ({reason}); retrain this fold") \
            from exc
    model.eval()
    trained = ckpt.get("features")
    if trained is not None and FeatureSpec.parse(str(trained)).mags != record.feature_spec.mags:
        raise CheckpointError(f"{path}: trained on {ckpt.get('features')}, but {run}/{RECORD_NAME} says "
                              f"{record.feature_spec}; the fold belongs to another run")
    return model, record
