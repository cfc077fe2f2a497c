"""The cross-validation run: every fold of a split folder, resumable, with a typed record of its inputs.

Layout of RUN_DIR:
    config.json                the run record (mil.record: config, label map, feature spec, feature dim, split
                               fingerprints, input fingerprints, extractor provenance, schema version)
    fold_<k>/predictions.csv   slide_id,case_id,label,prob,split,prob_<class>...: val and test rows; label =
                               class index (record label_map); prob_<class> = P(class) for every class; prob =
                               P(class 1), written for binary tasks only
    fold_<k>/metrics.json      test/val metrics, sizes, epochs_trained, best_epoch (1-based)
    fold_<k>/model.ckpt        state_dict + model name/kwargs + feature spec + label map (torch.save)
    summary.csv                fold,test_auc per fold, then rows "mean" and "std" (ddof=1)
A fold whose metrics.json exists is skipped, and only when the run's record matches the new invocation's
(settings, labels file content, feature files, splits); every check runs before any training. Every file is
written through :func:`zoomfeat.store.atomic_write` (a crash or Ctrl-C leaves no partial or temp file).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from mil.bags import BagStore, FeatureSpec, MILDataWarning, read_extractor, scan_bags
from mil.config import MILConfig, effective_model_kwargs
from mil.metrics import check_finite
from mil.registry import build_model
from mil.record import RECORD_NAME, RunRecord, check_resume, input_fingerprints, split_fingerprint, write_record
from mil.tasks import LabelledCohort, apply_task
from mil.train import FoldData, epoch_order, run_folds
from splits.audit import trainability_problems
from splits.io import PARTS, SplitFold, read_splits_dir
from splits.labels import read_labels
from zoomfeat.errors import CheckpointError, ConfigError, DataError, one_line
from zoomfeat.serial import to_jsonable
from zoomfeat.store import write_json_atomic

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
        reason = one_line(exc)
        raise ConfigError(f"--model-kwargs {json.dumps(cfg.model_kwargs)} does not make a {cfg.model} head "
                          f"({reason}); see the head's arguments in mil/heads/") from exc


def _augmentation(cfg: MILConfig, spec: FeatureSpec, all_folds: list[SplitFold], usable: set[str],
                  cohort: LabelledCohort, dim: int):
    """The plan of ``--augment`` / ``--train-fraction`` over every fold of the split folder (None without them)."""
    if cfg.augment is None and float(cfg.train_fraction) == 1.0:
        return None
    from mil.augment import plan_cohort, source_of, synthetic_ids

    table = cohort.table
    case_of = dict(zip(table["slide_id"], table["case_id"].astype(str)))
    label_of = dict(zip(table["slide_id"], table["target"].astype(int)))
    aug_spec, available = None, ()
    if cfg.augment is not None:
        aug_spec = FeatureSpec(Path(cfg.augment), spec.mags)
        candidates = [s for s in synthetic_ids(cfg.augment) if source_of(s) in usable]
        if not candidates:
            raise DataError(f"--augment {cfg.augment}: no synthetic copy of a slide of this run")
        scan = scan_bags(aug_spec, candidates)
        if scan.dim != dim:
            raise DataError(f"--augment {cfg.augment}: {scan.dim}-d bags, but {spec} gives {dim}-d: synthesize "
                            "from the same feature set")
        available = scan.usable
    every = {f.index: _fold_data(f, usable, cohort) for f in all_folds}
    return plan_cohort(every, case_of, label_of, fraction=float(cfg.train_fraction), seed=cfg.seed,
                       augment_spec=aug_spec, available=available)


def _record(cfg: MILConfig, spec: FeatureSpec, cohort: LabelledCohort, dim: int, folds: list[SplitFold],
            usable: tuple[str, ...], left_out: dict[str, int], extra_files: dict | None = None) -> RunRecord:
    from zoomfeat import __version__

    extractor, extractor_config = read_extractor(spec, usable[0])
    return RunRecord(
        config=to_jsonable(cfg), task=cfg.task, label_map=cohort.label_map, feature_spec=str(spec),
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


def _write_fold(fold_dir: Path, result, cfg: MILConfig, cohort: LabelledCohort, dim: int) -> None:
    from zoomfeat.store import atomic_write

    classes = [n for n, _ in sorted(cohort.label_map.items(), key=lambda kv: kv[1])]
    predictions = _class_columns(result.predictions, classes)
    check_finite(predictions[[f"prob_{c}" for c in classes]].to_numpy(dtype=float),
                 f"fold {result.metrics['fold']} predictions")
    ckpt = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "model": cfg.model,
            "model_kwargs": {**effective_model_kwargs(cfg), "in_dim": dim, "n_classes": len(cohort.label_map)},
            "features": cfg.features, "label_map": cohort.label_map, "task": cfg.task, **result.checkpoint}
    with atomic_write(fold_dir / "model.ckpt") as tmp:
        torch.save(ckpt, tmp)
    with atomic_write(fold_dir / "predictions.csv") as tmp:
        predictions.to_csv(tmp, index=False)
    write_json_atomic(fold_dir / "metrics.json", result.metrics)  # last: marks the fold done


def _check_out(run: Path) -> None:
    """``--out`` must be a new folder or a train-mil run: its config.json is never overwritten otherwise."""
    from mil.record import read_record

    if (run / RECORD_NAME).is_file():
        try:
            read_record(run)
        except DataError as exc:
            raise ConfigError(f"--out {run} is not a train-mil run folder ({exc}); pass another --out") from exc


STALE_TEMP_S = 600.0  # a temporary file this old is a writer's that died (a fold's files take seconds to write)


def remove_stale_temps(run: Path, now: float | None = None) -> list[Path]:
    """Delete the temporary files (``.<name>.tmp<pid>``, zoomfeat.store.temp_path) that a killed run left in
    ``run``; a write in progress is never that old. Returns what was removed."""
    import time

    now = time.time() if now is None else now
    stale = [p for p in run.glob("**/.*.tmp*") if p.is_file() and now - p.stat().st_mtime > STALE_TEMP_S]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def done_folds(run: Path) -> list[int]:
    """Folds of ``run`` whose metrics.json exists (finished)."""
    return sorted(int(p.parent.name.split("_")[1]) for p in run.glob("fold_*/metrics.json")
                  if p.parent.name.split("_")[1].isdigit())


def _check_resumed_heads(run: Path, cfg: MILConfig, done: list[int], dim: int, n_classes: int) -> None:
    """ConfigError when a finished fold's head was built with other arguments than this run would use: the
    record keeps the arguments as given, and what a task implies (e.g. DSMIL's one positive stream under
    ``--task hrd``, new in a later zoomfeat) could otherwise mix two kinds of head in one run."""
    want = {**effective_model_kwargs(cfg), "in_dim": dim, "n_classes": n_classes}
    for k in done:
        path = run / f"fold_{k}" / "model.ckpt"
        if not path.is_file():
            continue  # a finished fold without its checkpoint is reported where the checkpoint is read
        have = torch.load(path, map_location="cpu", weights_only=True).get("model_kwargs")
        if have is not None and have != want:
            raise ConfigError(f"{run}: fold {k} was trained with head arguments {json.dumps(have, sort_keys=True)}, "
                              f"this run would build {json.dumps(want, sort_keys=True)}; use a new --out, or "
                              "delete the folder to start over")


def write_summary(run: Path) -> pd.DataFrame:
    """summary.csv from every fold_<k>/metrics.json: fold,test_auc rows, then mean and std (ddof=1)."""
    from zoomfeat.store import atomic_write

    rows = [{"fold": str(k), "test_auc": json.loads((run / f"fold_{k}" / "metrics.json").read_text())["test_auc"]}
            for k in done_folds(run)]
    frame = pd.DataFrame(rows, columns=["fold", "test_auc"])
    aucs = pd.to_numeric(frame["test_auc"], errors="coerce").dropna().to_numpy(dtype=float)
    mean = float(aucs.mean()) if len(aucs) else None
    std = float(aucs.std(ddof=1)) if len(aucs) > 1 else None
    frame = pd.concat([frame, pd.DataFrame([{"fold": "mean", "test_auc": mean},
                                            {"fold": "std", "test_auc": std}])], ignore_index=True)
    with atomic_write(run / "summary.csv") as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def run_cv(cfg: MILConfig, progress: bool = False) -> pd.DataFrame:
    """Train and evaluate every selected fold (skipping done ones); returns the summary table.

    Everything that can be checked is checked before the first fold trains: labels, splits, feature files,
    trainable folds, model arguments, device settings, and that a resumed run has the same inputs.
    """
    from zoomfeat.runtime import check_devices

    spec = FeatureSpec.parse(cfg.features)
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
    augmentation = _augmentation(cfg, spec, all_folds, usable, cohort, scan.dim)
    extra_files = {}
    if augmentation is not None:
        data = {k: augmentation.fold_data(k, d) for k, d in data.items()}
        check_trainable(data, cohort.label_map, cfg.splits)
        if augmentation.spec is not None:
            extra_files = {s: augmentation.spec.path(s) for s in augmentation.available}
    run = Path(cfg.out)
    record = _record(cfg, spec, cohort, scan.dim, all_folds, scan.usable, left_out, extra_files)
    _check_out(run)
    done = done_folds(run)
    check_resume(run, record, done)
    _check_resumed_heads(run, cfg, done, scan.dim, n_classes)
    write_record(run, record)
    remove_stale_temps(run)
    # every bag is checked for NaN/Inf as it is loaded; mil.train keeps the bags (one contiguous tensor)
    store = BagStore(spec, cache=False)
    _train_pending(cfg, run, all_folds, data, cohort, spec, usable, named, scan.dim, store, progress, augmentation)
    return write_summary(run)


@contextlib.contextmanager
def fold_claims(run: Path, pending: dict[int, FoldData]):
    """The pending folds this process may train: each claimed (``RUN_DIR/.claims/fold_<k>.lock``, see
    zoomfeat.store.Claim) so that another train-mil on the same folder leaves it alone; claims are released
    when the block ends, and a fold finished meanwhile by another process is dropped."""
    from zoomfeat.log import note
    from zoomfeat.store import Claim

    claims = {k: Claim(run, f"fold_{k}") for k in pending}
    try:
        held = [k for k in pending if claims[k].acquire()]
        mine = {k: pending[k] for k in held if not (run / f"fold_{k}" / "metrics.json").is_file()}
        others = sorted(set(pending) - set(held))
        if others:
            note(f"fold(s) {', '.join(map(str, others))} claimed by another train-mil on {run}: left to it")
        yield mine
    finally:
        for claim in claims.values():
            claim.release()


def _train_pending(cfg: MILConfig, run: Path, all_folds: list[SplitFold], data: dict[int, FoldData],
                   cohort: LabelledCohort, spec: FeatureSpec, usable: set[str], named: set[str], dim: int,
                   store, progress: bool, augmentation=None) -> None:
    """Train the folds not done yet (mil.train.run_folds); the
    epoch order runs over the training slides of every fold of the split folder (``usable``: the checked
    slides of the selected folds, ``named``: every slide those folds name)."""
    pending = {k: d for k, d in data.items() if not (run / f"fold_{k}" / "metrics.json").is_file()}
    targets = dict(zip(cohort.table["slide_id"], cohort.table["target"].astype(int)))
    parts = [f.part("train") for f in all_folds]
    available: set[str] = set()
    if augmentation is not None:  # the plans' training slides (fraction, synthetic copies) of every fold
        from mil.augment import AugmentedStore

        parts, targets = augmentation.train_parts(), augmentation.targets(targets)
        available = set(augmentation.available)
        if augmentation.spec is not None:
            store = AugmentedStore(store, BagStore(augmentation.spec, cache=False))
    order = epoch_order(parts, targets,
                        lambda s: s in usable or s in available or (s not in named and spec.path(s).is_file()))

    def write(k: int, result) -> None:
        if augmentation is not None:
            result.metrics["augmentation"] = augmentation.plans[k].record()
        _write_fold(run / f"fold_{k}", result, cfg, cohort, dim)

    with fold_claims(run, pending) as mine:  # concurrent runs into one folder share the folds
        run_folds(cfg, mine, order, store, dim, len(cohort.label_map), write, progress)


def _load_checkpoint(path: Path) -> dict:
    from zoomfeat.fitting import load_checkpoint

    ckpt = load_checkpoint(path, "retrain this fold with `zoomfeat train-mil` (delete its fold folder first)")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a zoomfeat MIL checkpoint (format {ckpt.get('format')!r}); pass a "
                              "train-mil run")
    return ckpt


def load_fold_model(run_dir: str | Path, fold: int) -> tuple[nn.Module, RunRecord]:
    """The trained head of ``fold`` in eval mode and the run's record; CheckpointError for a missing,
    unreadable or foreign checkpoint, or one whose weights do not fit its own architecture."""
    from mil.record import read_record

    run = Path(run_dir)
    record = read_record(run)
    path = run / f"fold_{fold}" / "model.ckpt"
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
    if FeatureSpec.parse(str(ckpt.get("features", record.feature_spec))).mags != \
            FeatureSpec.parse(record.feature_spec).mags:
        raise CheckpointError(f"{path}: trained on {ckpt.get('features')}, but {run}/{RECORD_NAME} says "
                              f"{record.feature_spec}; the fold belongs to another run")
    return model, record
