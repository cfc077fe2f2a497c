"""The cross-validation run: every fold of a split folder, resumable, with provenance.

Layout of RUN_DIR:
    config.json            validated config, label map, feature dim, split fingerprints, extractor info
    fold_<k>/predictions.csv   slide_id,case_id,label,prob,split: val and test rows; label = class index
                               (config.json label_map), prob = P(class 1)
    fold_<k>/metrics.json      test/val metrics, sizes, epochs_trained, best_epoch (1-based)
    fold_<k>/model.ckpt        state_dict + model name/kwargs + feature spec + label map (torch.save)
    summary.csv                fold,test_auc per fold, then rows "mean" and "std" (ddof=1)
A fold whose metrics.json exists is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from mil.bags import BagStore, FeatureSpec, MILDataWarning, read_extractor, scan_bags
from mil.config import MILConfig, effective_model_kwargs
from mil.models import build_model
from mil.tasks import LabelledCohort, apply_task
from mil.train import FoldData, train_fold
from splits.io import PARTS, SplitFold, read_splits_dir
from splits.labels import read_labels
from zoomfeat.config import to_jsonable, write_json_atomic
from zoomfeat.errors import CheckpointError, ConfigError

CHECKPOINT_FORMAT = "zoomfeat-mil"
CHECKPOINT_VERSION = 1
_RESUME_IGNORED = ("folds", "devices", "accelerator")


def split_fingerprint(fold: SplitFold) -> str:
    """sha256 of the fold's sorted train/val/test slide ids (as read from the split file)."""
    text = json.dumps({p: sorted(fold.part(p)) for p in PARTS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


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


def _config_record(cfg: MILConfig, cohort: LabelledCohort, dim: int, folds: list[SplitFold], spec: FeatureSpec,
                   first_slide: str, left_out: dict[str, int]) -> dict:
    extractor, extractor_config = read_extractor(spec, first_slide)
    return {"config": to_jsonable(cfg), "label_map": cohort.label_map, "feature_dim": dim,
            "split_source": str(Path(cfg.splits).resolve()),
            "split_fingerprints": {str(f.index): split_fingerprint(f) for f in folds},
            "extractor": extractor, "extractor_config": extractor_config,
            "left_out": left_out, "labels_dropped": cohort.dropped}


def _check_resume(path: Path, record: dict) -> None:
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    strip = lambda c: {k: v for k, v in c.items() if k not in _RESUME_IGNORED}  # noqa: E731
    same = strip(old.get("config", {})) == strip(record["config"])
    for key in ("label_map", "feature_dim", "split_fingerprints"):
        same = same and old.get(key) == record[key]
    if not same:
        raise ConfigError(f"{path.parent} holds a run with another config or other splits; "
                          "use a new --out or delete that folder")


def _write_fold(fold_dir: Path, result, cfg: MILConfig, cohort: LabelledCohort, dim: int) -> None:
    fold_dir.mkdir(parents=True, exist_ok=True)
    ckpt = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "model": cfg.model,
            "model_kwargs": {**effective_model_kwargs(cfg), "in_dim": dim, "n_classes": len(cohort.label_map)},
            "features": cfg.features, "label_map": cohort.label_map, "task": cfg.task, **result.checkpoint}
    tmp = fold_dir / f".model.ckpt.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, fold_dir / "model.ckpt")
    tmp = fold_dir / f".predictions.csv.tmp{os.getpid()}"
    result.predictions.to_csv(tmp, index=False)
    os.replace(tmp, fold_dir / "predictions.csv")
    write_json_atomic(fold_dir / "metrics.json", result.metrics)  # last: marks the fold done


def write_summary(run: Path) -> pd.DataFrame:
    """summary.csv from every fold_<k>/metrics.json: fold,test_auc rows, then mean and std (ddof=1)."""
    rows = []
    for path in sorted(run.glob("fold_*/metrics.json"), key=lambda p: int(p.parent.name.split("_")[1])):
        m = json.loads(path.read_text())
        rows.append({"fold": str(m["fold"]), "test_auc": m["test_auc"]})
    frame = pd.DataFrame(rows, columns=["fold", "test_auc"])
    aucs = pd.to_numeric(frame["test_auc"], errors="coerce").dropna().to_numpy(dtype=float)
    mean = float(aucs.mean()) if len(aucs) else None
    std = float(aucs.std(ddof=1)) if len(aucs) > 1 else None
    frame = pd.concat([frame, pd.DataFrame([{"fold": "mean", "test_auc": mean},
                                            {"fold": "std", "test_auc": std}])], ignore_index=True)
    frame.to_csv(run / "summary.csv", index=False)
    return frame


def run_cv(cfg: MILConfig, progress: bool = False) -> pd.DataFrame:
    """Train and evaluate every selected fold (skipping done ones); returns the summary table."""
    spec = FeatureSpec.parse(cfg.features)
    cohort = apply_task(read_labels(cfg.labels, label_col=cfg.label_col), cfg.task, cfg.label_col,
                        cfg.hrd_threshold, cfg.classes)
    all_folds = read_splits_dir(cfg.splits)
    folds = _select_folds(all_folds, cfg.folds, cfg.splits)
    named = _report_unlabelled(folds, cohort)
    scan = scan_bags(spec, named)
    usable = set(scan.usable)
    left_out = {"no_label": len({s for f in folds for s in f.all_slides()} - named),
                "no_features": len(scan.missing), "empty_bag": len(scan.empty)}
    run = Path(cfg.out)
    record = _config_record(cfg, cohort, scan.dim, all_folds, spec, scan.usable[0], left_out)
    _check_resume(run / "config.json", record)
    write_json_atomic(run / "config.json", record)
    store = BagStore(spec, cache=cfg.cache)
    for fold in folds:
        fold_dir = run / f"fold_{fold.index}"
        if (fold_dir / "metrics.json").is_file():
            continue
        data = _fold_data(fold, usable, cohort)
        result = train_fold(cfg, fold.index, data, store, scan.dim, len(cohort.label_map), progress)
        _write_fold(fold_dir, result, cfg, cohort, scan.dim)
    return write_summary(run)


def load_fold_model(run_dir: str | Path, fold: int) -> tuple[nn.Module, dict]:
    """The trained head of ``fold`` in eval mode, and the run's config.json record (plus ``checkpoint``:
    the checkpoint's metadata without weights: model, model_kwargs, features, label_map, best_epoch)."""
    run = Path(run_dir)
    path = run / f"fold_{fold}" / "model.ckpt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint for fold {fold}; train it with `zoomfeat train-mil`")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a zoomfeat MIL checkpoint (format {ckpt.get('format')!r})")
    kwargs = dict(ckpt["model_kwargs"])
    model = build_model(ckpt["model"], kwargs.pop("in_dim"), kwargs.pop("n_classes"), **kwargs)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    config_path = run / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["checkpoint"] = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, config
