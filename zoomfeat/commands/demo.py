"""``zoomfeat demo``: the whole toolkit on a synthetic multi-scale cohort, on CPU, in minutes."""

from __future__ import annotations

import argparse

HELP = ("run the whole toolkit on a synthetic cohort whose signal is only visible at 5x (synth, tile, train "
        "ZoomLDM, extract, splits, MIL, reports, compare, heatmaps, sample, generate-large, superres) -> index.html")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="demo_out", help="output folder; index.html is the page (default demo_out)")
    cohort = parser.add_argument_group("cohort")
    cohort.add_argument("--slides", type=int, default=48, help="number of synthetic slides (default 48)")
    cohort.add_argument("--size", type=int, default=3072,
                        help="level-0 side of each slide in px, a multiple of 1024 (default 3072)")
    cohort.add_argument("--cluster", type=float, default=2.0,
                        help="correlation length of the clustered class's tissue patches, in 20x tiles (default 2)")
    cohort.add_argument("--tile-signal", type=float, default=0.0,
                        help="share of the clustered slides' epithelium tiles drawn with finer-grained nuclei of the same "
                             "colour, a cell-level cue, 0-1 (default 0: the signal is only at 5x)")
    cohort.add_argument("--seed", type=int, default=0, help="seed of the cohort, splits and training (default 0)")
    model = parser.add_argument_group("model")
    model.add_argument("--train-slides", type=int, default=8,
                       help="slides whose patches train the tiny ZoomLDM (default 8)")
    model.add_argument("--train-steps", type=int, default=400, help="tiny ZoomLDM training steps (default 400)")
    model.add_argument("--lr", type=float, default=2e-3, help="tiny ZoomLDM learning rate (default 2e-3)")
    model.add_argument("--summarizer-lr-scale", type=float, default=0.0, metavar="S",
                       help="the Summarizer's learning rate as a multiple of the U-Net's (default 0: kept at its "
                            "initialisation; trained jointly at the demo's lr it collapses to one context)")
    model.add_argument("--timestep", type=int, default=200,
                       help="diffusion timestep of the extracted features, in steps (default 200)")
    model.add_argument("--block", type=int, default=8,
                       help="U-Net output block whose activation is the ZoomLDM feature (default 8)")
    model.add_argument("--pooling", default="meanmax", choices=("mean", "meanmax"),
                       help="spatial pooling of that block (default meanmax: mean and max, concatenated)")
    model.add_argument("--first-stage-steps", type=int, default=120,
                       help="steps fitting the first-stage encoder to the patches' mean colour (default 120)")
    mil = parser.add_argument_group("mil")
    mil.add_argument("--mil-epochs", type=int, default=20, help="ABMIL epochs per fold (default 20)")
    generation = parser.add_argument_group("generation")
    generation.add_argument("--no-generation", action="store_true",
                            help="skip the generation wing: sample, generate-large, superres (default: run it)")
    generation.add_argument("--gen-steps", type=int, default=10, help="sampler steps of the generation wing (default 10)")
    generation.add_argument("--cdm-steps", type=int, default=300,
                            help="training steps of the generation wing's tiny CDM (default 300)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zoomfeat.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=Path(args.out), slides=args.slides, seed=args.seed, size=args.size, cluster=args.cluster,
                     tile_signal=args.tile_signal, train_slides=args.train_slides, train_steps=args.train_steps,
                     lr=args.lr, summarizer_lr_scale=args.summarizer_lr_scale, timestep=args.timestep,
                     block=args.block, pooling=args.pooling,
                     first_stage_steps=args.first_stage_steps, mil_epochs=args.mil_epochs,
                     generation=not args.no_generation, gen_steps=args.gen_steps, cdm_steps=args.cdm_steps)
    return run_demo(cfg)
