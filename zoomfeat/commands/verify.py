"""``zoomfeat verify``: check every tile/feature file in a folder; exit 1 when any has a problem."""

from __future__ import annotations

import argparse

HELP = "check tile/feature files: complete, readable, consistent, finite features, exact parent links"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="output folder of `zoomfeat tile` or `zoomfeat extract`")


def run(args: argparse.Namespace) -> int:
    import sys

    from zoomfeat.store import verify_dir

    report = verify_dir(args.folder)
    if not report:
        print(f"error: {args.folder}: no .h5 files to verify", file=sys.stderr)
        return 1
    bad = 0
    for path, problems in report.items():
        for problem in problems:
            print(f"error: {path}: {problem}", file=sys.stderr)
        bad += bool(problems)
    print(f"verify: {len(report) - bad} ok, {bad} with problems")
    return 1 if bad else 0
