"""``zoomfeat compare RUN_DIR... --out DIR``: feature-set x task AUC table with paired per-fold tests."""

from __future__ import annotations

import argparse

HELP = "compare train-mil runs: mean +- std AUC per feature set and task, paired Wilcoxon and bootstrap vs a reference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="train-mil run folders (one or more)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", required=True,
                        help="folder for compare.html (= index.html), compare.md, compare.json, PNGs; required")
    stats = parser.add_argument_group("statistics")
    stats.add_argument("--reference", metavar="RUN_DIR", default=None,
                       help="run the others of its task are paired with (default: each task's first run)")
    stats.add_argument("--n-bootstrap", type=int, default=1000,
                       help="paired bootstrap resamples of the mean AUC difference, 0 = no CI (default 1000)")
    stats.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")


def run(args: argparse.Namespace) -> int:
    from mil.compare import build_comparison
    from mil.html import markdown_table
    from mil.report import fmt_mean_std
    from zoomfeat.errors import ConfigError

    if args.n_bootstrap < 0:
        raise ConfigError(f"--n-bootstrap {args.n_bootstrap} is negative: use 0 (no CI) or more")
    result = build_comparison(args.run_dirs, args.out, reference=args.reference, n_bootstrap=args.n_bootstrap,
                              seed=args.seed)
    rows = [[fs] + [fmt_mean_std(result["table"][fs][t]) if t in result["table"][fs] else "-"
                    for t in result["tasks"]] for fs in result["feature_sets"]]
    print(markdown_table(["feature set", *result["tasks"]], rows))
    print(f"wrote {result['files']['compare.html']}")
    return 0
