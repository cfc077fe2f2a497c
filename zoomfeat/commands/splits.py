"""``zoomfeat splits hipt|simil|make|audit``: import, generate and audit cross-validation splits."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "import (HIPT, SI-MIL), generate (patient-grouped, stratified) and audit cross-validation splits"


def _add_hipt(sub) -> None:
    p = sub.add_parser("hipt", help="normalise HIPT/CLAM split files and keep labelled slides")
    p.add_argument("--splits-dir", required=True, help="folder with splits_<k>.csv (or splits_<k>_bool.csv)")
    p.add_argument("--labels", required=True, help="HIPT dataset CSV, or its zip (read in memory)")
    p.add_argument("--out", required=True, help="output folder: splits_<k>.csv, splits.json, labels.csv")
    p.add_argument("--label-col", default="oncotree_code", help="label column (default: oncotree_code)")
    p.add_argument("--classes", default="IDC,ILC", help="labels to keep, comma-separated (default: IDC,ILC)")


def _add_simil(sub) -> None:
    p = sub.add_parser("simil", help="SI-MIL protocol: fixed test set, k folds of train/val on the rest")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help="label CSV (case_id,slide_id,label): draw the test set here")
    src.add_argument("--from-json", help="SI-MIL split JSON {train_dict, test_dict}: keep its test set")
    p.add_argument("--case-labels", help="with --from-json: label CSV giving case_id per slide")
    p.add_argument("--out", required=True)
    p.add_argument("--test-frac", type=float, default=0.2)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group", default="case_id", help="patient column (slide_id: no grouping)")


def _add_make(sub) -> None:
    p = sub.add_parser("make", help="patient-grouped, stratified k-fold or repeated (CLAM-style) splits")
    p.add_argument("--labels", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--test-frac", type=float, default=None, help="repeated mode only (default 0.1)")
    p.add_argument("--mode", choices=("kfold", "repeated"), default="kfold",
                   help="kfold: test sets partition the patients; repeated: independent draws per fold")
    p.add_argument("--group", default="case_id", help="patient column (slide_id: no grouping)")
    p.add_argument("--seed", type=int, default=0)


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help="leaks across patients, class counts, test overlap, missing labels/features")
    p.add_argument("dir", help="split folder (splits_<k>.csv)")
    p.add_argument("--labels", required=True, help="label CSV or zip")
    p.add_argument("--label-col", default="label")
    p.add_argument("--features", help="feature folder with <slide_id>.h5 files")
    p.add_argument("--strict", action="store_true", help="exit 1 when there are warnings")
    p.add_argument("--json", help="also write the findings as JSON here")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="splits_command", metavar="{hipt,simil,make,audit}", required=True)
    for add in (_add_hipt, _add_simil, _add_make, _add_audit):
        add(sub)


def _command_line() -> str:
    return " ".join(["zoomfeat", *sys.argv[1:]])


def _run_hipt(args) -> int:
    from splits.hipt import import_hipt, write_hipt

    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    result = import_hipt(args.splits_dir, args.labels, classes=classes, label_col=args.label_col)
    write_hipt(result, args.out, source=f"hipt: {args.splits_dir} + {args.labels}", command=_command_line())
    print("\n".join(result.summary()))
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
    from splits.labels import read_labels, write_labels
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
    from splits.labels import read_labels

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
    from splits.labels import read_labels
    from zoomfeat.config import write_json_atomic
    from zoomfeat.errors import ConfigError

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
