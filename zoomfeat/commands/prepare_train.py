"""``zoomfeat prepare-train``: slides -> a ZoomLDM training set (first-stage latents + conditioning grids)."""

from __future__ import annotations

import argparse
from pathlib import Path

from zoomfeat.commands.options import add_scale_group, add_tissue_group, tissue_params
from zoomfeat.encoders.specs import parse_conditioner
from zoomfeat.mags import parse_mags
from zoomfeat.train.config import PrepareConfig

HELP = "write a ZoomLDM training set: per-magnification latents and 20x conditioning grids in HDF5 shards"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", help="slide files and/or folders holding slides")
    model = parser.add_argument_group("model")
    model.add_argument("--conditioner", required=True,
                       help="conditioning encoder of the 20x tiles: NAME=PATH (a registered encoder and its local "
                            "weights, e.g. uni=weights/uni) or toy (random, tests)")
    model.add_argument("--conditioner-dim", type=int, default=None,
                       help="toy conditioner width (default: the model's Summarizer input channels)")
    model.add_argument("--zoomldm", default="tiny",
                       help="official config.yaml or release folder whose first stage encodes the latents "
                            "(default: tiny, the packaged CPU-sized config)")
    model.add_argument("--weights", "--zoomldm-weights", dest="zoomldm_weights", default=None,
                       help="weights.ckpt for the first stage (default: <folder>/weights.ckpt, else random init)")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--mags", default="all", help="magnifications: all (default) or e.g. 20x,10x,5x")
    grid.add_argument("--max-patches-per-mag", type=int, default=None,
                      help="at most N patches per slide and magnification (a reproducible random subset; "
                           "default: all)")
    add_tissue_group(parser)
    add_scale_group(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="output folder (index.h5, shards/<slide_id>.h5); refused when "
                        "it holds a training set made with other settings")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--batch-size", type=int, default=32, help="patches per batch for the encoders "
                         "(default 32)")
    runtime.add_argument("--workers", type=int, default=0, help="DataLoader worker processes reading tiles "
                         "(default 0)")
    runtime.add_argument("--device", default="cpu", help="torch device for the encoders: cpu (default), cuda, "
                         "cuda:1")
    runtime.add_argument("--seed", type=int, default=0, help="subset draws and the random init of toy/tiny models "
                         "(default 0)")


def build_config(args: argparse.Namespace):
    from zoomfeat.runtime import check_device

    name, weights = parse_conditioner(args.conditioner)
    weights = Path(weights) if weights else None
    return PrepareConfig(
        slides=tuple(Path(s) for s in args.slides), out=Path(args.out), conditioner=name,
        conditioner_weights=weights, zoomldm=Path(args.zoomldm),
        zoomldm_weights=Path(args.zoomldm_weights) if args.zoomldm_weights else None,
        mags=parse_mags(args.mags), max_patches_per_mag=args.max_patches_per_mag,
        conditioner_dim=args.conditioner_dim, batch_size=args.batch_size, workers=args.workers,
        device=check_device(args.device), seed=args.seed, base_mag=args.base_mag, mpp=args.mpp, tissue=tissue_params(args))


def run(args: argparse.Namespace) -> int:
    from zoomfeat.train.prepare import prepare_training_set

    report = prepare_training_set(build_config(args))
    print(f"training set: {report.out} ({report.n_shards} slides, {sum(report.counts.values())} patches)")
    return report.exit_code
