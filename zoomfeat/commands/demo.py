"""``zoomfeat demo``: the whole pipeline on a synthetic cohort, on CPU, in minutes."""

from __future__ import annotations

import argparse

HELP = "run the whole pipeline on a synthetic cohort (synth, tile, train ZoomLDM, extract, splits, MIL, reports)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--slides", type=int, default=20, help="number of synthetic slides (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cohort, splits and training")
    parser.add_argument("--size", type=int, default=4096, help="level-0 side of each slide in px (default 4096)")
    parser.add_argument("--train-steps", type=int, default=200, help="tiny ZoomLDM training steps (default 200)")
    parser.add_argument("--mil-epochs", type=int, default=12, help="ABMIL epochs per fold (default 12)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zoomfeat.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=Path(args.out), slides=args.slides, seed=args.seed, size=args.size,
                     train_steps=args.train_steps, mil_epochs=args.mil_epochs)
    return run_demo(cfg)
