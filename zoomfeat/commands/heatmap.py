"""``zoomfeat heatmap``: a fold model's attention drawn over a slide thumbnail, plus its top-attended patches."""

from __future__ import annotations

import argparse

HELP = "attention heatmap of a train-mil fold model on one slide, and a montage of its top-attended patches"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_pos", nargs="?", metavar="RUN_DIR", help="a train-mil run directory")
    parser.add_argument("slide_pos", nargs="?", metavar="SLIDE", help="slide file (its slide_id is the stem); it "
                        "must be the file the features were extracted from (checked by fingerprint)")
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--run", metavar="RUN_DIR", help="the run directory (same as the first argument)")
    inputs.add_argument("--slide", metavar="SLIDE", help="the slide file (same as the second argument)")
    inputs.add_argument("--fold", type=int, default=0, metavar="K", help="fold whose model is used (default 0)")
    inputs.add_argument("--seed", type=int, default=None, metavar="S",
                        help="init seed whose fold model is used, in a run of several seeds (`train-mil --seeds`; "
                             "default: the run's first seed)")
    inputs.add_argument("--features", metavar="SPEC", help="feature set, e.g. feats/zoomldm@20x+5x (default: the one "
                        "the fold was trained on); the scale comes from its files, no --base-mag needed")
    inputs.add_argument("--allow-partial", action="store_true",
                        help="draw from a run missing recorded folds (default: refused); the missing folds are "
                             "then named")
    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="PNG", help="heatmap PNG (default <run>/heatmaps/<slide_id>_fold<K>.png, "
                        "<slide_id>_seed<S>_fold<K>.png in a run of several seeds); <stem>_top.png goes beside it")
    output.add_argument("--top", type=int, default=16, help="number of top-attended patches in the montage "
                        "(default 16)")
    output.add_argument("--max-size", type=int, default=2048, help="longest side of the thumbnail in px "
                        "(default 2048)")
    output.add_argument("--alpha", type=float, default=0.5, help="opacity of the attention colours, 0-1 "
                        "(default 0.5)")


def run(args: argparse.Namespace) -> int:
    from zoomfeat.errors import ConfigError

    run_dir = args.run or args.run_pos
    slide = args.slide or args.slide_pos
    if not run_dir or not slide:
        raise ConfigError("heatmap needs a run directory and a slide: zoomfeat heatmap RUN_DIR SLIDE")
    if args.out and not str(args.out).lower().endswith(".png"):
        raise ConfigError(f"--out {args.out}: heatmap writes PNG images; give a file name ending in .png")
    from mil.heatmap import build_heatmap
    from mil.record import check_complete
    from zoomfeat.features import FeatureSpec

    features = FeatureSpec.parse(args.features) if args.features else None
    completeness = check_complete(run_dir, allow_partial=args.allow_partial)  # a partial run: one line, exit 2
    if completeness.note():
        print(f"{run_dir}: {completeness.note()}")
    seeds = completeness.record.seeds
    if args.seed is None and len(seeds) > 1:  # an unknown --seed is refused by mil.cv.load_fold_model
        print(f"{run_dir} was trained with seeds {','.join(map(str, seeds))}: drawing fold {args.fold} of seed "
              f"{seeds[0]} (the first); --seed S draws another")
    result = build_heatmap(run_dir, args.fold, slide, features, args.out, seed=args.seed, top=args.top,
                           max_size=args.max_size, alpha=args.alpha)
    print(f"{result.n_tiles} tiles: wrote {result.heatmap_png} and {result.top_png}")
    return 0
