"""``zoomfeat train-mil``: cross-validated MIL training over every fold of a split folder."""

from __future__ import annotations

import argparse
import json

from mil.heads import head_help, head_names  # the registry's list of heads, torch-free

MODEL_CHOICES: tuple[str, ...] = tuple(head_names())
HELP = "train a MIL head (ABMIL, CLAM, DSMIL, ...) on every fold of a split folder (resumable per fold)"


def _folds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--folds takes numbers like 0,1,2, got {text!r}") from exc


def _seeds(text: str) -> tuple[int, ...]:
    from zoomfeat.errors import ConfigError

    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ConfigError(f"--seeds takes numbers like 0,1,2, got {text!r}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # names are checked by MILConfig / make_protocol (a one-line error), not by argparse choices (usage dump)
    data = parser.add_argument_group("data")
    data.add_argument("--features", required=True, metavar="DIR@MAGS",
                      help="feature set: a folder of <slide_id>.h5 files and its magnification(s), finest first, "
                           "e.g. features/zoomldm@20x or features/zoomldm@20x+5x (fused); required")
    data.add_argument("--labels", required=True, metavar="CSV",
                      help="labels table with case_id, slide_id and the label column; required")
    data.add_argument("--splits", required=True, metavar="DIR",
                      help="folder of splits_<k>.csv files (columns train,val,test); required")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, metavar="DIR",
                        help="run folder: config.json (run record), fold_<k>/ (seed_<s>/fold_<k>/ for several "
                             "--seeds), summary.csv; rerunning into it resumes per (seed, fold), only when inputs, "
                             "settings and seeds match; required")
    task = parser.add_argument_group("task")
    task.add_argument("--task", default="subtyping",
                      help="subtyping (IDC vs ILC), hrd (binary or thresholded score) or custom (default subtyping)")
    task.add_argument("--label-col", default=None,
                      help="label column (default: label; HIPT tables without it: oncotree_code)")
    task.add_argument("--hrd-threshold", type=float, default=None,
                      help="--task hrd on a score column: score >= this is HRD, e.g. 42 (default: none, the column "
                           "is binary)")
    task.add_argument("--classes", default=None, metavar="A,B",
                      help="--task custom: class names in index order (default: the sorted distinct labels)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="abmil",
                       help=f"MIL head (default abmil): {head_help()}")
    model.add_argument("--model-kwargs", default="{}", metavar="JSON",
                       help='head arguments as a JSON object, e.g. \'{"hidden": 256}\' (default {}: the head\'s '
                            "defaults)")
    schedule = parser.add_argument_group("protocol")
    schedule.add_argument("--protocol", default="hipt",
                          help="training preset, faithful to the code it names: hipt (20 epochs, the last epoch), clam "
                               "(CLAM's early stopping on the val loss, at most 200 epochs) or simil (SI-MIL: 40 "
                               "epochs, best (val AUC + accuracy) / 2); the run plan names the source of every "
                               "setting, and the options below are the departures (default hipt)")
    schedule.add_argument("--epochs", type=int, default=None,
                          help="(maximum) epochs over the training bags (default: the protocol's)")
    schedule.add_argument("--min-epochs", type=int, default=None,
                          help="epochs before early stopping may stop (default: the protocol's)")
    schedule.add_argument("--patience", type=int, default=None,
                          help="early-stopping patience in epochs without a better val loss (default: the "
                               "protocol's; none for hipt/simil)")
    schedule.add_argument("--lr", type=float, default=None,
                          help="learning rate (default: the head's recipe, mil/config.py: e.g. 2e-4)")
    schedule.add_argument("--weight-decay", type=float, default=None,
                          help="weight decay (L2), >= 0 (default: the head's recipe, e.g. 1e-5)")
    schedule.add_argument("--selection", choices=("last", "val_loss", "val_auc"), default=None,
                          help="which epoch's weights are evaluated (default: the protocol's)")
    schedule.add_argument("--balanced", action="store_true",
                          help="draw training bags class-balanced, with replacement (default: a seeded shuffle)")
    schedule.add_argument("--seeds", default=None, metavar="S,S",
                          help="init seeds: the cross-validation runs once per seed into the run folder "
                               "(seed_<s>/fold_<k>/ for several), summary.csv gives the mean over folds per seed "
                               "and the mean and std over seeds; a seed sets the initial weights (every fold "
                               "starts from the same ones), dropout and bag order (default 0: one seed)")
    schedule.add_argument("--seed", type=int, default=None,
                          help="one init seed: the same as --seeds S (default 0)")
    schedule.add_argument("--folds", type=_folds, default=None, metavar="K,K",
                          help="train only these folds, e.g. 0,1 (default: every fold of --splits)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, mps or auto "
                                                              "(default cpu)")
    runtime.add_argument("--devices", default="1",
                         help="Lightning devices: a count (1) or a list (0,1) (default 1)")
    runtime.add_argument("--no-cache", action="store_true",
                         help="read bags from disk every epoch instead of keeping them in memory (default: cache)")
    augmentation = parser.add_argument_group("augmentation")  # mil.augment (issue 17)
    augmentation.add_argument("--augment", metavar="DIR", default=None,
                              help="synthetic copies from `zoomfeat feature-copies` (<slide_id>~syn<k>.h5, the same "
                                   "extractor and magnifications): those of each fold's training slides join its "
                                   "training set, never validation or test, never a held-out patient's (default: none)")
    augmentation.add_argument("--train-fraction", type=float, default=1.0, metavar="F",
                              help="train on this fraction of each fold's training patients: stratified, seeded, "
                                   "nested across fractions; validation and test untouched (default 1.0)")
    augmentation.add_argument("--instance-sample", type=float, default=1.0, metavar="F",
                              help="each training step sees a random share F of each bag's instances, a new draw "
                                   "per slide and epoch (seeded); evaluation always sees whole bags (default 1.0: "
                                   "all instances)")
    speed = parser.add_argument_group("speed")  # mil.train (issue 20)
    speed.add_argument("--bags-per-step", type=int, default=None, metavar="B",
                       help="bags per optimiser step, padded and masked (TransMIL and DTFD run them one by one; default: "
                            "the head's recipe, 1): fewer steps, but on a CPU in fp32 not faster "
                            "(benchmarks/RESULTS.md)")
    speed.add_argument("--precision", default="auto",
                       help="auto (bf16 autocast on a GPU, fp32 on the CPU), fp32 or bf16 (default auto); bf16 "
                            "on a CPU with AMX/AVX-512 BF16 (benchmarks/RESULTS.md)")

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
    from zoomfeat.errors import ConfigError
    from zoomfeat.features import FeatureSpec

    label_col = args.label_col or default_label_col(args.task, list(read_table(args.labels).columns))
    protocol = make_protocol(args.protocol, epochs=args.epochs, min_epochs=args.min_epochs, patience=args.patience,
                             lr=args.lr, weight_decay=args.weight_decay, selection=args.selection)
    classes = tuple(c.strip() for c in args.classes.split(",")) if args.classes else None
    if args.seed is not None and args.seeds is not None:
        raise ConfigError(f"--seed {args.seed} and --seeds {args.seeds}: give one of them "
                          "(--seed S is --seeds S)")
    seeds = _seeds(args.seeds) if args.seeds is not None else (args.seed if args.seed is not None else 0,)
    return MILConfig(features=FeatureSpec.parse(args.features), labels=args.labels, splits=args.splits,
                     out=args.out, task=args.task, label_col=label_col, hrd_threshold=args.hrd_threshold,
                     classes=classes, model=args.model,
                     model_kwargs=_model_kwargs(args.model_kwargs), protocol=protocol, balanced=args.balanced,
                     seeds=seeds, folds=args.folds, accelerator=args.accelerator, devices=args.devices,
                     cache=not args.no_cache, bags_per_step=args.bags_per_step,
                     precision=args.precision, augment=args.augment, train_fraction=args.train_fraction,
                     instance_sample=args.instance_sample)


def run(args: argparse.Namespace) -> int:
    from mil.cv import run_cv

    cfg = build_config(args)
    summary = run_cv(cfg)  # warnings go through the zoomfeat logger
    print(summary.to_string(index=False))
    if len(cfg.seeds) > 1:
        row = summary[summary.fold == "mean"].set_index("seed")
        mean, std = row.at["mean", "test_auc"], row.at["std", "test_auc"]
        if mean is not None and mean == mean:
            spread = "" if std is None or std != std else f" ± {std:.3f}"
            print(f"test AUC over {len(cfg.seeds)} seeds (mean ± std of the per-seed means over folds): "
                  f"{mean:.3f}{spread}")
    print(f"wrote {cfg.out}/summary.csv")
    return 0
