"""``zoomfeat train-mil``: cross-validated MIL training over every fold of a split folder."""

from __future__ import annotations

import argparse
import json

# the names of mil.models.MIL_MODELS (kept here so `zoomfeat --help` needs no torch; a test checks they agree)
MODEL_CHOICES: tuple[str, ...] = ("abmil", "clam_mb", "clam_sb", "dsmil", "max", "mean")
HELP = "train a MIL head (ABMIL, CLAM, DSMIL, ...) on every fold of a split folder (resumable per fold)"


def _folds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--folds takes numbers like 0,1,2, got {text!r}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, help="feature set DIR@MAG or DIR@20x+5x")
    parser.add_argument("--labels", required=True, help="labels CSV (case_id,slide_id,<label column>)")
    parser.add_argument("--splits", required=True, help="folder of splits_<k>.csv files")
    parser.add_argument("--out", required=True, help="run folder (config.json, fold_<k>/, summary.csv)")
    # names are checked by MILConfig / make_protocol (a one-line error), not by argparse choices (usage dump)
    parser.add_argument("--task", default="subtyping", help="subtyping (default), hrd or custom")
    parser.add_argument("--label-col", default=None, help="label column (default: label; HIPT: oncotree_code)")
    parser.add_argument("--hrd-threshold", type=float, default=None, help="HRD score >= this is HRD (e.g. 42)")
    parser.add_argument("--classes", default=None, help="custom task: class names in index order, A,B")
    parser.add_argument("--model", default="abmil", help=f"one of {', '.join(MODEL_CHOICES)} (default abmil)")
    parser.add_argument("--model-kwargs", default="{}", help='JSON object, e.g. \'{"hidden": 256}\'')
    parser.add_argument("--protocol", default="hipt", help="hipt (default), clam or simil")
    parser.add_argument("--epochs", type=int, default=None, help="(maximum) epochs; preset by --protocol")
    parser.add_argument("--min-epochs", type=int, default=None)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--selection", choices=("last", "val_loss", "val_auc"), default=None)
    parser.add_argument("--balanced", action="store_true", help="class-balanced sampling of training bags")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=_folds, default=None, help="only these folds, e.g. 0,1")
    parser.add_argument("--accelerator", default="cpu", help="cpu (default), gpu, mps or auto")
    parser.add_argument("--devices", default="1")
    parser.add_argument("--no-cache", action="store_true", help="do not keep bags in memory between epochs")


def _model_kwargs(text: str) -> dict:
    from zoomfeat.errors import ConfigError
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-kwargs is not valid JSON ({exc}); write e.g. '{{\"hidden\": 256}}'") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object, got {text!r}")
    return value


def build_config(args: argparse.Namespace):
    from mil.config import MILConfig, make_protocol
    from mil.tasks import default_label_col
    from splits.labels import read_table

    label_col = args.label_col or default_label_col(args.task, list(read_table(args.labels).columns))
    protocol = make_protocol(args.protocol, epochs=args.epochs, min_epochs=args.min_epochs, patience=args.patience,
                             lr=args.lr, weight_decay=args.weight_decay, selection=args.selection)
    classes = tuple(c.strip() for c in args.classes.split(",")) if args.classes else None
    return MILConfig(features=args.features, labels=args.labels, splits=args.splits, out=args.out, task=args.task,
                     label_col=label_col, hrd_threshold=args.hrd_threshold, classes=classes, model=args.model,
                     model_kwargs=_model_kwargs(args.model_kwargs), protocol=protocol, balanced=args.balanced,
                     seed=args.seed, folds=args.folds, accelerator=args.accelerator, devices=args.devices,
                     cache=not args.no_cache)


def run(args: argparse.Namespace) -> int:
    import sys
    import warnings

    from mil.cv import run_cv

    cfg = build_config(args)
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *rest, **kw: print(f"warning: {message}", file=sys.stderr)
        summary = run_cv(cfg, progress=sys.stderr.isatty())
    print(summary.to_string(index=False))
    print(f"wrote {cfg.out}/summary.csv")
    return 0
