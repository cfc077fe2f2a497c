"""``zoomfeat extract``: ZoomLDM or baseline-encoder features of slides, one HDF5 file per slide."""

from __future__ import annotations

import argparse

from zoomfeat.commands.options import add_scale_group, add_shard_option, add_tissue_group
from zoomfeat.encoders.specs import encoder_names, parse_conditioner
from zoomfeat.mags import parse_mags

HELP = "extract ZoomLDM (or UNI/Phikon/CTransPath/toy baseline) features per slide and magnification"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", metavar="SLIDE_OR_DIR", help="slide files or folders of slides")
    model = parser.add_argument_group("model")
    model.add_argument("--encoder", default="zoomldm",
                       help=f"zoomldm (default) or a baseline encoder: {', '.join(encoder_names())}")
    model.add_argument("--zoomldm", metavar="CONFIG_OR_DIR", help="official ZoomLDM config.yaml or its folder "
                       "(with weights.ckpt); needed for --encoder zoomldm")
    model.add_argument("--weights", metavar="CKPT", help="ZoomLDM checkpoint (default: beside the config), or the "
                       "baseline encoder's weight file/folder")
    model.add_argument("--conditioner", default="uni", metavar="uni=PATH|toy",
                       help="20x encoder whose embeddings condition ZoomLDM (default uni; needs uni=PATH)")
    model.add_argument("--timestep", type=int, default=50, help="diffusion timestep of the features, in steps "
                       "(default 50)")
    model.add_argument("--block", type=int, default=3, help="U-Net output block whose activation is the feature "
                       "(default 3)")
    model.add_argument("--pooling", default="mean", choices=("mean", "meanmax"),
                       help="spatial pooling of the block's activation (default mean)")
    model.add_argument("--noise", default="seeded", choices=("seeded", "none"),
                       help="noise at t seeded by (slide, mag, x, y), or none (clean latent); default seeded")
    model.add_argument("--toy-seed", type=int, default=0, help="seed of the toy encoder/conditioner (default 0)")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--mags", default="20x,5x", help="magnifications, e.g. 20x,5x (default)")
    grid.add_argument("--tiles", metavar="DIR", help="tile stores from `zoomfeat tile` (default: tile on the fly "
                      "with the tissue flags below)")
    add_tissue_group(parser)
    add_scale_group(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="output folder: <out>/<slide_id>.h5 (refused when it holds "
                        "features made with other settings)")
    output.add_argument("--conditioning", metavar="DIR", help="read the 20x conditioning embeddings from this "
                        "folder (written by an earlier run) instead of computing them")
    output.add_argument("--conditioning-out", metavar="DIR", help="where the computed conditioning embeddings "
                        "are written as feature files (default: <out>/../<conditioner>; refused when it holds "
                        "other features)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--batch-size", type=int, default=32, help="patches per forward pass (default 32)")
    runtime.add_argument("--workers", type=int, default=2, help="DataLoader worker processes reading tiles "
                         "(default 2)")
    runtime.add_argument("--device", "--accelerator", dest="device", default="auto", metavar="auto|cpu|cuda",
                         help="where the networks run (default auto = cuda when visible)")
    runtime.add_argument("--devices", type=int, default=1, help="processes (GPUs, or CPU processes) per node, "
                         ">= 1 (default 1); more than 1 runs DDP through Lightning Fabric, one slide shard per rank")
    runtime.add_argument("--num-nodes", type=int, default=1, help="nodes of a multi-node run (torchrun/SLURM; "
                         "default 1)")
    runtime.add_argument("--precision", default="auto", metavar="auto|fp32|bf16|fp16",
                         help="auto (default) = bf16 autocast on CUDA, fp32 on CPU")
    add_shard_option(runtime)


def build_config(args: argparse.Namespace):
    """ExtractConfig from parsed arguments (every value validated here, before any work)."""
    from pathlib import Path

    from zoomfeat.extract.config import ExtractConfig
    from zoomfeat.extract.loading import resolve_zoomldm_paths

    encoder = args.encoder.strip().lower()
    zoomldm_config, weights = None, (Path(args.weights) if args.weights else None)
    conditioner, cond_weights = "uni", None
    if encoder == "zoomldm":
        from zoomfeat.errors import ConfigError

        if not args.zoomldm:
            raise ConfigError("--encoder zoomldm needs --zoomldm CONFIG_OR_DIR")
        zoomldm_config, weights = resolve_zoomldm_paths(args.zoomldm, args.weights)
        if args.conditioning is None:
            conditioner, cond_weights = parse_conditioner(args.conditioner)
        else:
            conditioner = args.conditioner.partition("=")[0].strip().lower()
    else:
        from zoomfeat.encoders import encoder_class

        encoder_class(encoder)  # ConfigError listing the choices
    return ExtractConfig(
        out_dir=Path(args.out), encoder=encoder, mags=parse_mags(args.mags), zoomldm_config=zoomldm_config,
        weights=weights, conditioner=conditioner, conditioner_weights=Path(cond_weights) if cond_weights else None,
        timestep=args.timestep, block=args.block, pooling=args.pooling, noise=args.noise,
        batch_size=args.batch_size, workers=args.workers, device=args.device, precision=args.precision,
        devices=args.devices, num_nodes=args.num_nodes, shard=args.shard, tiles_dir=Path(args.tiles) if args.tiles else None,
        conditioning_dir=Path(args.conditioning) if args.conditioning else None,
        conditioning_out=Path(args.conditioning_out) if args.conditioning_out else None,
        base_mag=args.base_mag, mpp=args.mpp, min_tissue=args.min_tissue, toy_seed=args.toy_seed,
        saturation_threshold=args.saturation_threshold, min_saturation=args.min_saturation, mask_mag=args.mask_mag,
    )


def run(args: argparse.Namespace) -> int:
    from zoomfeat.extract.runner import extract

    return extract(build_config(args), args.slides)
