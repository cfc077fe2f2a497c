"""``zoomfeat heatmap``: a fold model's attention drawn over a slide thumbnail, plus its top-attended patches."""

from __future__ import annotations

import argparse

HELP = "attention heatmap of a train-mil fold model on one slide, and a montage of its top-attended patches"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="a train-mil run directory")
    parser.add_argument("--fold", required=True, type=int, metavar="K", help="fold whose model is used")
    parser.add_argument("--slide", required=True, metavar="SLIDE", help="slide file (its slide_id is the stem)")
    parser.add_argument("--features", required=True, metavar="SPEC", help="feature set, e.g. feats/zoomldm@20x+5x")
    parser.add_argument("--out", required=True, metavar="PNG", help="heatmap PNG; <stem>_top.png goes beside it")
    parser.add_argument("--top", type=int, default=16, help="number of top-attended patches in the montage")
    parser.add_argument("--max-size", type=int, default=2048, help="longest side of the thumbnail, px")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the attention colours")


def run(args: argparse.Namespace) -> int:
    from mil.heatmap import build_heatmap

    result = build_heatmap(args.run, args.fold, args.slide, args.features, args.out, top=args.top,
                           max_size=args.max_size, alpha=args.alpha)
    print(f"{result.n_tiles} tiles: wrote {result.heatmap_png} and {result.top_png}")
    return 0
