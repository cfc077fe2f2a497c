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
    parser.add_argument("--allow-partial", action="store_true",
                        help="compare runs missing recorded folds (default: refused); the tables and notes then "
                             "name the missing folds")


def run(args: argparse.Namespace) -> int:
    from mil.compare import build_comparison, cell_text
    from mil.html import markdown_table
    from zoomfeat.errors import ConfigError

    if args.n_bootstrap < 0:
        raise ConfigError(f"--n-bootstrap {args.n_bootstrap} is negative: use 0 (no CI) or more")
    result = build_comparison(args.run_dirs, args.out, reference=args.reference, n_bootstrap=args.n_bootstrap,
                              seed=args.seed, allow_partial=args.allow_partial)
    rows = [[fs] + [cell_text(next((e for e in result["runs"] if e["feature_set"] == fs and e["task"] == t), None))
                    for t in result["tasks"]] for fs in result["feature_sets"]]
    print(markdown_table(["feature set (test AUC)", *result["tasks"]], rows))
    for c in result["comparisons"]:
        print(f"{c['feature_set']} vs {c['reference']} ({c['task']}): mean ΔAUC "
              f"{'n/a' if c['mean_difference'] is None else format(c['mean_difference'], '+.3f')} over "
              f"{c['n_pairs']} (seed, fold) pairs")
    for e in result["runs"]:
        if e["partial_note"]:
            print(f"{e['run_dir']}: {e['partial_note']}")
    print(f"wrote {result['files']['compare.html']}")
    return 0
