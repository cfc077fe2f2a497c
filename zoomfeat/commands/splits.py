"""``zoomfeat splits hipt|simil|make|audit``: import, generate and audit cross-validation splits."""

from __future__ import annotations

import argparse
import os
import sys

from zoomfeat.errors import ConfigError
from zoomfeat.store import write_json_atomic

HELP = "import (HIPT, SI-MIL), generate (patient-grouped, stratified) and audit cross-validation splits"


def _subcommand(sub, name: str, text: str) -> argparse.ArgumentParser:
    """A ``splits`` subcommand whose one-line help is also its description (``splits NAME --help``)."""
    return sub.add_parser(name, help=text, description=text)


def _add_hipt(sub) -> None:
    p = _subcommand(sub, "hipt", "normalise HIPT/CLAM split files and keep labelled slides")
    data = p.add_argument_group("data")
    data.add_argument("--splits-dir", required=True, metavar="DIR",
                      help="folder with splits_<k>.csv (or splits_<k>_bool.csv); required")
    data.add_argument("--labels", required=True, metavar="CSV",
                      help="HIPT dataset CSV, or its zip (read in memory); required")
    data.add_argument("--label-col", default="oncotree_code", help="label column (default oncotree_code)")
    data.add_argument("--classes", default="IDC,ILC", metavar="A,B",
                      help="labels to keep, comma-separated; each must occur in the table (default IDC,ILC)")
    output = p.add_argument_group("output")
    output.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: splits_<k>.csv, splits.json, labels.csv; required")


def _add_simil(sub) -> None:
    p = _subcommand(sub, "simil", "SI-MIL protocol: fixed test set, k folds of train/val on the rest")
    data = p.add_argument_group("data")
    src = data.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", metavar="CSV",
                     help="label CSV (case_id,slide_id,label): draw the test set here (required, or --from-json)")
    src.add_argument("--from-json", metavar="JSON",
                     help="SI-MIL split JSON {train_dict, test_dict}: keep its test set (required, or --labels)")
    data.add_argument("--case-labels", metavar="CSV",
                      help="with --from-json: label CSV giving case_id per slide (default: TCGA barcodes)")
    output = p.add_argument_group("output")
    output.add_argument("--out", required=True, metavar="DIR", help="output folder: splits_<k>.csv, splits.json, "
                                                                    "labels.csv; required")
    split = p.add_argument_group("split")
    split.add_argument("--test-frac", type=float, default=0.2,
                       help="fraction (0-1) of patients in the fixed test set (default 0.2)")
    split.add_argument("--folds", type=int, default=5, help="train/val folds on the rest (default 5)")
    split.add_argument("--seed", type=int, default=0, help="seed of the patient draw (default 0)")
    split.add_argument("--group", default="case_id",
                       help="patient column; slide_id = no grouping (default case_id)")


def _add_make(sub) -> None:
    p = _subcommand(sub, "make", "patient-grouped, stratified k-fold or repeated (CLAM-style) splits")
    data = p.add_argument_group("data")
    data.add_argument("--labels", required=True, metavar="CSV", help="label CSV (case_id,slide_id,label); required")
    output = p.add_argument_group("output")
    output.add_argument("--out", required=True, metavar="DIR", help="output folder: splits_<k>.csv, splits.json; "
                                                                    "required")
    split = p.add_argument_group("split")
    split.add_argument("--folds", type=int, default=10, help="number of folds (default 10)")
    split.add_argument("--val-frac", type=float, default=0.1,
                       help="fraction (0-1) of the non-test patients held out for validation (default 0.1)")
    split.add_argument("--test-frac", type=float, default=None,
                       help="repeated mode only: fraction (0-1) of patients in each test set (default 0.1)")
    split.add_argument("--mode", choices=("kfold", "repeated"), default="kfold",
                       help="kfold: test sets partition the patients; repeated: independent draws per fold "
                            "(default kfold)")
    split.add_argument("--group", default="case_id", help="patient column; slide_id = no grouping (default case_id)")
    split.add_argument("--seed", type=int, default=0, help="seed of the patient assignment (default 0)")


def _add_audit(sub) -> None:
    p = _subcommand(sub, "audit", "leaks across patients, class counts, test overlap, missing labels/features, "
                                     "folds that cannot be trained")
    data = p.add_argument_group("data")
    data.add_argument("dir", help="split folder (splits_<k>.csv)")
    data.add_argument("--labels", required=True, metavar="CSV", help="label CSV or zip; required")
    data.add_argument("--label-col", default="label", help="label column (default label)")
    data.add_argument("--features", metavar="DIR",
                      help="feature folder with <slide_id>.h5 files (default: features not checked)")
    output = p.add_argument_group("output")
    output.add_argument("--strict", action="store_true",
                        help="exit 1 when there is any warning, e.g. an empty test part or a one-class training "
                             "part (default: exit 0, warnings printed)")
    output.add_argument("--json", metavar="FILE", help="also write the findings as JSON here (default: none)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="splits_command", metavar="{hipt,simil,make,audit}", required=True)
    for add in (_add_hipt, _add_simil, _add_make, _add_audit):
        add(sub)


def _command_line() -> str:
    return " ".join(["zoomfeat", *sys.argv[1:]])


def _run_hipt(args) -> int:
    from splits.hipt import import_hipt, write_hipt

    from zoomfeat.log import warn

    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    result = import_hipt(args.splits_dir, args.labels, classes=classes, label_col=args.label_col)
    write_hipt(result, args.out, source=f"hipt: {args.splits_dir} + {args.labels}", command=_command_line())
    print("\n".join(result.summary()))
    for problem in result.problems():
        warn(f"{problem} (the files are written; `train-mil` refuses such folds)")
    print(f"wrote {len(result.folds)} folds and labels.csv to {args.out}")
    return 0


def _report_folds(folds, labels, out, patients_note: str = "") -> None:
    from splits.generate import patients_from_labels

    mixed = patients_from_labels(labels).mixed if "case_id" in labels.columns else ()
    if mixed:
        print(f"{len(mixed)} patient(s) have slides of different labels; stratified by their majority label "
              f"(e.g. {mixed[0]})")
    if patients_note:
        print(f"patient ids: {patients_note}")
    for f in folds:
        print(f"fold {f.index}: train/val/test " + "/".join(str(n) for n in f.sizes()))
    print(f"wrote {len(folds)} folds to {out}")


def _run_simil(args) -> int:
    from splits.io import write_splits_dir
    from zoomfeat.labels import read_labels, write_labels
    from splits.simil import SimilConfig, simil_from_json, simil_splits

    config = SimilConfig(test_frac=args.test_frac, folds=args.folds, seed=args.seed, group=args.group)
    note = ""
    if args.from_json:
        extra_labels = read_labels(args.case_labels) if args.case_labels else None
        labels, folds, note = simil_from_json(args.from_json, extra_labels, config)
        source = f"simil json: {args.from_json}"
    else:
        labels = read_labels(args.labels)
        folds = simil_splits(labels, config)
        source = f"simil: {args.labels}"
    write_splits_dir(folds, args.out, source=source, seed=config.seed, command=_command_line(),
                     extra={"config": config, "protocol": "simil", "patient_ids": note or "label table"})
    write_labels(labels, os.path.join(args.out, "labels.csv"))
    _report_folds(folds, labels, args.out, note)
    return 0


def _run_make(args) -> int:
    from splits.generate import MakeConfig, make_splits
    from splits.io import write_splits_dir
    from zoomfeat.labels import read_labels

    config = MakeConfig(folds=args.folds, mode=args.mode, val_frac=args.val_frac, test_frac=args.test_frac,
                        group=args.group, seed=args.seed)
    labels = read_labels(args.labels)
    folds = make_splits(labels, config)
    write_splits_dir(folds, args.out, source=f"make: {args.labels}", seed=config.seed, command=_command_line(),
                     extra={"config": config, "protocol": config.mode})
    _report_folds(folds, labels, args.out)
    return 0


def _run_audit(args) -> int:
    from splits.audit import audit_splits, format_audit
    from splits.io import read_splits_dir
    from zoomfeat.labels import read_labels

    if args.features and not os.path.isdir(args.features):
        raise ConfigError(f"--features {args.features}: not a folder; pass the folder of <slide_id>.h5 files")
    audit = audit_splits(read_splits_dir(args.dir), read_labels(args.labels, label_col=args.label_col),
                         args.features)
    print(format_audit(audit))
    if args.json:
        write_json_atomic(args.json, {"audit": audit, "test_sets_partition": audit.test_sets_partition})
    return 1 if args.strict and audit.warnings else 0


def run(args: argparse.Namespace) -> int:
    runners = {"hipt": _run_hipt, "simil": _run_simil, "make": _run_make, "audit": _run_audit}
    return runners[args.splits_command](args)
