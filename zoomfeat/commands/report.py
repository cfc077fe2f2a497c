"""``zoomfeat report RUN_DIR``: cross-validation report of one train-mil run (HTML, Markdown, JSON, PNG)."""

from __future__ import annotations

import argparse

HELP = "cross-validation report of a train-mil run: per-fold test metrics, pooled AUC CI, ROC, confusion matrix"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a train-mil run folder (its --out)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", default=None,
                        help="folder for report.html/.md/.json and the PNG plots (default RUN_DIR/report)")
    stats = parser.add_argument_group("statistics")
    stats.add_argument("--n-bootstrap", type=int, default=1000,
                       help="resamples of slides for the pooled-AUC 95%% CI, 0 = no CI (default 1000)")
    stats.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="report a run missing recorded folds (default: refused); every table and page then "
                             "names the missing folds")


def run(args: argparse.Namespace) -> int:
    from mil.report import build_report, fmt, fmt_mean_std
    from zoomfeat.errors import ConfigError

    if args.n_bootstrap < 0:
        raise ConfigError(f"--n-bootstrap {args.n_bootstrap} is negative: use 0 (no CI) or more")
    result = build_report(args.run_dir, args.out, n_bootstrap=args.n_bootstrap, seed=args.seed,
                          allow_partial=args.allow_partial)
    auc = result["metric_labels"]["auc"]
    if result["missing"]:
        print(result["notes"][0])
    for s in result["seeds"]:
        folds = result["spread"]["auc"]["folds"][str(s)]
        seed = f" (seed {s})" if len(result["seeds"]) > 1 else ""
        print(f"{folds['n']} folds{seed}: test {auc} {fmt_mean_std(folds)} over folds")
    if len(result["seeds"]) > 1:
        print(f"{len(result['seeds'])} seeds: test {auc} {fmt_mean_std(result['spread']['auc']['seeds'])} over seeds "
              "(of the per-seed means)")
    for pooled in result["pooled_by_seed"]:
        ci = pooled["auc_ci95"]
        ci_text = "n/a" if ci["low"] is None else f"[{ci['low']:.3f}, {ci['high']:.3f}]"
        seed = f" (seed {pooled['seed']})" if len(result["seeds"]) > 1 else ""
        print(f"pooled {auc}{seed} {fmt(pooled['auc'])} 95% CI {ci_text}")
    print(f"wrote {result['files']['report.html']}")
    return 0
