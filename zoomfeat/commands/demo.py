"""``zoomfeat demo``: the whole toolkit on a synthetic multi-scale cohort, on CPU, in minutes."""

from __future__ import annotations

import argparse
from pathlib import Path

from zoomfeat.demo import QUICK, DemoConfig, run_demo

HELP = ("run the whole toolkit on a synthetic cohort whose signal is only visible at 5x (synth, tile, train "
        "ZoomLDM, extract, splits, MIL, reports, compare, heatmaps, sample, generate-large, superres) -> index.html")

# option -> (type, full demo's default, help); None defaults here let --quick fill in what was not given
_OPTIONS: dict[str, tuple[type, object, str]] = {
    "slides": (int, 48, "number of synthetic slides"),
    "size": (int, 3072, "level-0 side of each slide in px, a multiple of 1024"),
    "cluster": (float, 2.0, "correlation length of the clustered class's tissue patches, in 20x tiles"),
    "tile_signal": (float, 0.0, "share of the clustered slides' epithelium tiles drawn with finer-grained nuclei of "
                                "the same colour, a cell-level cue, 0-1 (0: the signal is only at 5x)"),
    "folds": (int, 5, "patient-level cross-validation folds"),
    "train_slides": (int, 8, "slides whose patches fit the first stage and train the tiny ZoomLDM"),
    "patches_per_mag": (int, 24, "patches per slide and magnification in the first-stage fit and training set"),
    "first_stage_steps": (int, 120, "steps fitting the first-stage encoder to the patches' mean colour"),
    "decoder_steps": (int, 200, "steps fitting the first-stage decoder to reconstruct the patches (0: random)"),
    "train_steps": (int, 400, "tiny ZoomLDM training steps"),
    "mil_epochs": (int, 20, "ABMIL epochs per fold"),
    "gen_steps": (int, 10, "sampler steps of the generation wing"),
    "cdm_steps": (int, 300, "training steps of the generation wing's tiny CDM"),
    "resemblance_images": (int, 16, "generated patches per magnification in the resemblance measurement"),
}
_GROUPS = {"cohort": ("slides", "size", "cluster", "tile_signal", "folds"),
           "model": ("train_slides", "patches_per_mag", "first_stage_steps", "decoder_steps", "train_steps"),
           "mil": ("mil_epochs",), "generation": ("gen_steps", "cdm_steps", "resemblance_images")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="demo_out", help="output folder; index.html is the page (default demo_out)")
    output.add_argument("--quick", action="store_true",
                        help="the smallest cohort and fewest steps that still run every stage (~3 minutes on a "
                             "2-core CPU; its numbers mean nothing): " + ", ".join(
                                 f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items() if k in _OPTIONS))
    output.add_argument("--stage", type=int, metavar="K",
                        help="run only stage K (numbered as the demo prints them), whether done or not")
    groups = {name: parser.add_argument_group(name) for name in _GROUPS}
    groups["cohort"].add_argument("--seed", type=int, default=0,
                                  help="seed of the cohort, splits and training (default 0)")
    for group, names in _GROUPS.items():
        for name in names:
            kind, default, text = _OPTIONS[name]
            groups[group].add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                                       help=f"{text} (default {default}; --quick: {QUICK.get(name, default)})")
    groups["model"].add_argument("--lr", type=float, default=2e-3, help="tiny ZoomLDM learning rate (default 2e-3)")
    groups["model"].add_argument("--summarizer-lr-scale", type=float, default=0.0, metavar="S",
                                 help="the Summarizer's learning rate as a multiple of the U-Net's (default 0: kept "
                                      "at its initialisation; trained jointly at the demo's lr it collapses to one "
                                      "context)")
    groups["model"].add_argument("--timestep", type=int, default=200,
                                 help="diffusion timestep of the extracted features, in steps (default 200)")
    groups["model"].add_argument("--block", type=int, default=8,
                                 help="U-Net output block whose activation is the ZoomLDM feature (default 8)")
    groups["model"].add_argument("--pooling", default="meanmax", choices=("mean", "meanmax"),
                                 help="spatial pooling of that block (default meanmax: mean and max, concatenated)")
    groups["generation"].add_argument("--no-generation", action="store_true",
                                      help="skip the generation wing: sample, generate-large, superres, CDM "
                                           "(default: run it)")


def demo_config(args: argparse.Namespace):
    """The DemoConfig of parsed arguments: given options, else the --quick preset, else the full demo's defaults;
    ``rerun`` is the command that reproduces it (what ``--stage K`` is appended to)."""
    given = {name: getattr(args, name) for name in _OPTIONS if getattr(args, name) is not None}
    values = {**(QUICK if args.quick else {}), **given}
    rerun = ["demo", *(["--quick"] if args.quick else []), "--out", args.out]
    for name, value in given.items():
        rerun += [f"--{name.replace('_', '-')}", str(value)]
    fixed = {"seed": 0, "lr": 2e-3, "summarizer_lr_scale": 0.0, "timestep": 200, "block": 8, "pooling": "meanmax"}
    for name, default in fixed.items():
        if getattr(args, name) != default:
            rerun += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.no_generation:
        rerun.append("--no-generation")
    return DemoConfig(out=Path(args.out), seed=args.seed, lr=args.lr, summarizer_lr_scale=args.summarizer_lr_scale,
                      timestep=args.timestep, block=args.block, pooling=args.pooling,
                      generation=not args.no_generation, rerun=tuple(rerun), **values)


def run(args: argparse.Namespace) -> int:
    return run_demo(demo_config(args), only_stage=args.stage)
