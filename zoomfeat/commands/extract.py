"""``zoomfeat extract``: ZoomLDM or baseline-encoder features of slides, one HDF5 file per slide."""

from __future__ import annotations

import argparse

HELP = "extract ZoomLDM (or UNI/Phikon/CTransPath/toy baseline) features per slide and magnification"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", metavar="SLIDE_OR_DIR", help="slide files or folders of slides")
    parser.add_argument("--out", required=True, help="output folder: <out>/<slide_id>.h5")
    parser.add_argument("--encoder", default="zoomldm", help="zoomldm (default) or a baseline: uni, phikon, "
                        "ctranspath, toy")
    parser.add_argument("--zoomldm", metavar="CONFIG_OR_DIR", help="official ZoomLDM config.yaml or its folder "
                        "(with weights.ckpt)")
    parser.add_argument("--weights", metavar="CKPT", help="ZoomLDM checkpoint (default: beside the config), or the "
                        "baseline encoder's weight file/folder")
    parser.add_argument("--conditioner", default="uni", metavar="uni=PATH|toy",
                        help="20x encoder whose embeddings condition ZoomLDM (default uni; needs uni=PATH)")
    parser.add_argument("--mags", default="20x,5x", help="magnifications, e.g. 20x,5x (default)")
    parser.add_argument("--timestep", type=int, default=50, help="diffusion timestep of the features (default 50)")
    parser.add_argument("--block", type=int, default=3, help="U-Net output block (default 3)")
    parser.add_argument("--pooling", default="mean", choices=("mean", "meanmax"), help="spatial pooling")
    parser.add_argument("--noise", default="seeded", choices=("seeded", "none"),
                        help="noise at t seeded by (slide, mag, x, y), or none (clean latent)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers reading tiles")
    parser.add_argument("--device", "--accelerator", dest="device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the networks run (auto = cuda when visible)")
    parser.add_argument("--devices", type=int, default=1, help="processes (GPUs, or CPU processes) per node; "
                        "more than 1 runs DDP through Lightning Fabric, one slide shard per rank")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes of a multi-node run (torchrun/SLURM)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="auto = bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--shard", metavar="i/n", help="process shard i of n (job arrays); with --devices, "
                        "the ranks split that shard")
    parser.add_argument("--tiles", metavar="DIR", help="tile stores from `zoomfeat tile` (default: tile on the fly)")
    parser.add_argument("--conditioning", metavar="DIR", help="read the 20x conditioning embeddings from this "
                        "folder (written by an earlier run) instead of computing them")
    parser.add_argument("--conditioning-out", metavar="DIR", help="where the computed conditioning embeddings "
                        "are written as feature files (default: <out>/../<conditioner>)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--base-mag", type=float, help="objective power of level 0, when the slide lacks it")
    group.add_argument("--mpp", type=float, help="microns per level-0 px, when the slide lacks it")
    parser.add_argument("--min-tissue", type=float, default=0.25, help="minimum tissue fraction of a kept tile")
    parser.add_argument("--toy-seed", type=int, default=0, help="seed of the toy encoder/conditioner")


def _conditioner(value: str) -> tuple[str, str | None]:
    from zoomfeat.errors import ConfigError

    name, _, path = value.partition("=")
    name = name.strip().lower()
    if name == "toy" and not path:
        return "toy", None
    if name in ("uni", "phikon", "ctranspath") and path:
        return name, path
    raise ConfigError(f"bad --conditioner {value!r}: use uni=PATH (UNI weights) or toy")


def build_config(args: argparse.Namespace):
    """ExtractConfig from parsed arguments (every value validated here, before any work)."""
    from pathlib import Path

    from zoomfeat.extract.config import ExtractConfig
    from zoomfeat.extract.loading import resolve_zoomldm_paths
    from zoomfeat.mags import parse_mags

    encoder = args.encoder.strip().lower()
    zoomldm_config, weights = None, (Path(args.weights) if args.weights else None)
    conditioner, cond_weights = "uni", None
    if encoder == "zoomldm":
        from zoomfeat.errors import ConfigError

        if not args.zoomldm:
            raise ConfigError("--encoder zoomldm needs --zoomldm CONFIG_OR_DIR")
        zoomldm_config, weights = resolve_zoomldm_paths(args.zoomldm, args.weights)
        if args.conditioning is None:
            conditioner, cond_weights = _conditioner(args.conditioner)
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
    )


def run(args: argparse.Namespace) -> int:
    from zoomfeat.extract.runner import extract

    return extract(build_config(args), args.slides)
