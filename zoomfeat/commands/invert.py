"""``zoomfeat invert``: conditioning for an image without a slide, by optimising the Summarizer's SSL grid."""

from __future__ import annotations

import argparse

HELP = "infer a conditioning grid for one patch image (ZoomLDM condition inversion) and save it as HDF5"


def add_model_group(parser: argparse.ArgumentParser) -> None:
    """``--zoomldm`` / ``--weights`` (section "model"), shared with ``superres``."""
    group = parser.add_argument_group("model")
    group.add_argument("--zoomldm", required=True, metavar="CONFIG_OR_DIR",
                       help="ZoomLDM: 'tiny', a folder with config.yaml (+ weights.ckpt), or a config.yaml")
    group.add_argument("--weights", metavar="CKPT", help="ZoomLDM checkpoint (default: beside the config)")


def add_inversion_group(parser: argparse.ArgumentParser) -> None:
    """The inversion hyper-parameters (section "inversion"; defaults: ZoomLDM's stated settings)."""
    group = parser.add_argument_group("inversion")
    group.add_argument("--inversion-steps", type=int, default=200,
                       help="Adam iterations, one timestep each from high to low noise (default 200)")
    group.add_argument("--inversion-lr", type=float, default=0.1, help="Adam learning rate (default 0.1)")
    group.add_argument("--diversity", type=float, default=0.05,
                       help="weight of the mean pairwise cosine similarity penalty of the grid vectors (default 0.05)")
    group.add_argument("--noise-batch", type=int, default=1, help="noise draws per iteration (default 1)")


def add_runtime_group(parser: argparse.ArgumentParser, what: str, batch_size: bool = False) -> None:
    """``--seed``, ``--device``, ``--precision`` (and ``--batch-size``) (section "runtime")."""
    group = parser.add_argument_group("runtime")
    if batch_size:
        group.add_argument("--batch-size", type=int, default=8,
                           help="20x patches per network batch in joint sampling (default 8)")
    group.add_argument("--seed", type=int, default=0, help=f"seed of the {what} (default 0)")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="where the networks run (default auto = cuda when visible)")
    group.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"),
                       help="autocast of the inversion's U-Net passes (default fp32; auto = bf16 on CUDA)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="one square patch at --mag (PNG/JPEG/TIFF), 256 px or the "
                        "model's first-stage resolution")
    data = parser.add_argument_group("data")
    data.add_argument("--mag", required=True, help="magnification of the image, e.g. 5x")
    add_model_group(parser)
    add_inversion_group(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, metavar="GRID.h5",
                        help="output conditioning file (HDF5, the `extract --conditioning` feature-file format)")
    output.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_runtime_group(parser, "initial grid and the noise draws")


def inversion_settings(args: argparse.Namespace):
    from zoomfeat.generate.invert import InversionSettings

    return InversionSettings(iterations=args.inversion_steps, lr=args.inversion_lr, diversity=args.diversity,
                             noise_batch=args.noise_batch, seed=args.seed)


def check_out(path, overwrite: bool, suffixes: tuple[str, ...]):
    """A Path for ``--out``: right suffix, and not an existing file unless ``--overwrite``."""
    from pathlib import Path

    from zoomfeat.errors import ConfigError

    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ConfigError(f"--out {path}: use a file name ending in {' or '.join(suffixes)}")
    if path.exists() and not overwrite:
        raise ConfigError(f"--out {path} exists: pass --overwrite to replace it, or choose another name")
    return path


def load_model(args: argparse.Namespace):
    """(model, ZoomLDMSource, Runtime) from the model/runtime options."""
    from zoomfeat.runtime import resolve_runtime
    from zoomfeat.model import load_zoomldm
    from zoomfeat.resolve import resolve_zoomldm

    runtime = resolve_runtime(args.device, args.precision)
    source = resolve_zoomldm(args.zoomldm, args.weights)
    model = load_zoomldm(source.config, source.weights, use_ema=True, device=runtime.device)
    return model, source, runtime


def run(args: argparse.Namespace) -> int:
    from zoomfeat.errors import DataError
    from zoomfeat.generate.invert import invert_image, save_grid
    from zoomfeat.generate.metrics.images import read_image
    from zoomfeat.mags import parse_mag
    from zoomfeat.resolve import file_sha256

    mag = parse_mag(args.mag)
    settings = inversion_settings(args)
    out = check_out(args.out, args.overwrite, (".h5",))
    image = read_image(args.image)
    model, source, runtime = load_model(args)
    side = model.first_stage_resolution
    if image.shape[0] != image.shape[1] or image.shape[0] not in (256, side):
        raise DataError(f"{args.image} is {image.shape[1]}x{image.shape[0]} px: invert takes one square patch of "
                        f"256 px{'' if side == 256 else f' or {side} px'} at {mag}; use `zoomfeat superres` for "
                        f"larger images")
    result = invert_image(model, image, mag, settings, autocast=runtime.autocast())
    provenance = {"image": str(args.image), "zoomldm_config": str(source.config),
                  "zoomldm_sha256": file_sha256(source.weights), "settings": settings.__dict__,
                  "precision": runtime.precision}
    save_grid(out, result, provenance)
    first, last = result.probe_losses[0], result.probe_losses[-1]
    print(f"invert: {mag} grid {list(result.grid.shape)}; probe loss {first:.6g} -> {last:.6g} "
          f"({settings.iterations} iterations); written to {out}")
    return 0
