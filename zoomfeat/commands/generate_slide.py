"""``zoomfeat generate-slide``: a synthetic whole slide with a real slide's tissue layout and conditions, by
cascaded joint multi-scale sampling, streamed into a pyramidal TIFF (resumable)."""

from __future__ import annotations

import argparse

from zoomfeat import hub
from zoomfeat.commands.options import add_scale_group, add_tissue_group, tissue_params
from zoomfeat.commands.generate_large import add_guidance_options, add_joint_options, add_refine_options, guidance_of
from zoomfeat.commands.sample import add_model_group, add_runtime_group
from zoomfeat.errors import ConfigError
from zoomfeat.log import note
from zoomfeat.mags import parse_mags

HELP = ("generate a synthetic whole slide (pyramidal TIFF) from a real slide's tissue and 20x embeddings, coarse "
        "to fine: overlapping windows at the first level, then region by region in agreement with the level above "
        "and the finished neighbours")
COMPRESSIONS = ("jpeg", "deflate", "none")  # zoomfeat.generate.pyramid.COMPRESSIONS (torch-free copy)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_group(parser)
    cond = parser.add_argument_group("conditions")
    cond.add_argument("--slide", help="the real slide whose tissue mask and 20x embeddings the synthetic slide "
                      "takes (or --cdm for a slide with no real counterpart)")
    cond.add_argument("--region", metavar="X,Y,W,H", help="level-0 rectangle of the slide to generate (default: "
                      "the whole slide), rounded down to whole patches of the first level")
    cond.add_argument("--conditioning", metavar="DIR", help="conditioning folder written by `zoomfeat extract` "
                      "(20x embeddings; no conditioner runs)")
    add_tissue_group(parser)
    add_scale_group(parser)
    cdm = parser.add_argument_group("cdm")
    cdm.add_argument("--cdm", metavar="DIR", help="train-cdm run folder (or CDM checkpoint) trained on this "
                     "ZoomLDM's contexts: a slide with no real counterpart, the first level's contexts drawn from "
                     "it, each finer level conditioned on the conditioner's embeddings of the level above as "
                     "generated; needs --size, takes no --slide")
    cdm.add_argument("--size", metavar="W,H", help="with --cdm: the new slide's size in px at 20x, all of it "
                     "tissue, rounded down to whole patches of the first level (e.g. 4096,4096)")
    cdm.add_argument("--cdm-steps", type=int, default=200, help="CDM DDIM steps (default 200, as the official "
                     "CDM evaluation)")
    cdm.add_argument("--cdm-guidance", type=float, default=1.0, help="CDM classifier-free guidance on the "
                     "magnification (default 1 = none; > 1 needs a CDM trained with label dropout)")
    cdm.add_argument("--cdm-seed", type=int, default=0, help="seed of the CDM's noise (default 0)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--levels", default="1.25x,5x,20x", help="magnifications of the cascade, coarsest first, "
                          "ending at 20x (default 1.25x,5x,20x)")
    sampling.add_argument("--steps", type=int, default=50, help="denoising steps from t = 1000 of the first level "
                          "and of each region's joint sampling (default 50, the supplement's)")
    add_guidance_options(sampling)
    add_joint_options(sampling)
    add_refine_options(sampling)
    sampling.add_argument("--window-stride", type=int, default=None, help="latent px between overlapping windows "
                          "(first level and refinement; default a quarter window, below 20x rounded to whole 20x "
                          "tiles)")
    sampling.add_argument("--seed", type=int, default=0, help="seed; unit (level, row, col) draws from "
                          "SeedSequence([seed, level, row, col]) (default 0)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="the new .tiff file; finished regions are kept in "
                        "<out>.parts/ until it is written (run the same command again to resume)")
    output.add_argument("--decode-stride", type=int, default=None, help="latent px between the Gaussian-blended "
                        "decoder windows (default a quarter window)")
    output.add_argument("--tile", type=int, default=256, help="TIFF tile side in px (default 256)")
    output.add_argument("--compression", default="jpeg", choices=COMPRESSIONS, help="TIFF tile compression "
                        "(default jpeg)")
    output.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    output.add_argument("--keep-parts", action="store_true", help="keep <out>.parts/ after the TIFF is written")
    add_runtime_group(parser, batch_size=8)


def _region(text: str | None):

    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ConfigError(f"bad --region {text!r}: give X,Y,W,H in level-0 px, e.g. 0,0,8192,8192")
    return values


def _size(text: str | None):

    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2 or min(values) < 1:
        raise ConfigError(f"bad --size {text!r}: give W,H in px at 20x, e.g. 4096,4096")
    return values


def _check_sources(args: argparse.Namespace) -> None:
    """--slide (a real slide's layout and conditions) or --cdm with --size (a new slide), never both."""
    if args.cdm is None:
        if args.slide is None:
            raise ConfigError("no conditions: pass --slide REAL_SLIDE, or --cdm DIR with --size W,H for a slide "
                              "with no real counterpart")
        return
    given = [o for o, v in (("--slide", args.slide), ("--region", args.region), ("--conditioning", args.conditioning),
                            ("--base-mag", args.base_mag), ("--mpp", args.mpp)) if v is not None]
    if given:
        raise ConfigError(f"--cdm makes a slide with no real counterpart: drop {', '.join(given)}")


def build_config(args: argparse.Namespace):
    from pathlib import Path

    from zoomfeat.encoders.specs import parse_conditioner
    from zoomfeat.generate.conditions import ConditionRequest
    from zoomfeat.generate.slide import SlideGenConfig
    from zoomfeat.resolve import resolve_zoomldm
    from zoomfeat.slides import check_scale_overrides

    _check_sources(args)
    for option, value in (("--slide", args.slide), ("--conditioning", args.conditioning)):
        if value is not None and not Path(value).exists():
            raise ConfigError(f"{option} {value} does not exist: give an existing path")
    if args.conditioning is None:
        conditioner, weights = parse_conditioner(args.conditioner)
    else:
        conditioner, weights = args.conditioner.partition("=")[0].strip().lower(), None
    check_scale_overrides(args.base_mag, args.mpp)
    if args.guide_guidance is not None:
        raise ConfigError("--guide-guidance: generate-slide's guide is the finished level above (fixed, not "
                          "sampled): drop it")
    levels = parse_mags(args.levels)
    cdm = None
    if args.cdm is not None:
        cdm = hub.local_file(args.cdm, ("last.ckpt",), "--cdm")  # a path, or a hub reference resolved to its file
        if not cdm.exists():
            raise ConfigError(f"--cdm {args.cdm} not found: pass a train-cdm run folder or a CDM checkpoint file")
    request = ConditionRequest(mag=levels[0], slide=Path(args.slide) if args.slide else None,
                               conditioning_dir=Path(args.conditioning) if args.conditioning else None,
                               conditioner=conditioner, conditioner_weights=Path(weights) if weights else None,
                               toy_seed=args.toy_seed, base_mag=args.base_mag, mpp=args.mpp,
                               tissue=tissue_params(args), batch_size=max(1, args.batch_size))
    source = resolve_zoomldm(args.zoomldm, args.weights, require_weights=str(args.zoomldm).strip().lower() != "tiny")
    return SlideGenConfig(zoomldm=source, conditions=request, out=Path(args.out), levels=levels,
                          region=_region(args.region), steps=args.steps, guidance=guidance_of(args), h=args.fd_step,
                          lr=args.joint_lr, joint_update=args.joint_update, joint_iterations=args.joint_iterations,
                          krylov=args.krylov_size, refine_t0=0 if args.no_refine else args.refine_t0,
                          refine_stride=args.refine_stride, window_stride=args.window_stride,
                          decode_stride=args.decode_stride, seed=args.seed,
                          batch_size=args.batch_size, device=args.device, precision=args.precision, tile=args.tile,
                          compression=args.compression, quality=args.quality, keep_parts=args.keep_parts,
                          size=_size(args.size), cdm=cdm, cdm_steps=args.cdm_steps, cdm_guidance=args.cdm_guidance,
                          cdm_seed=args.cdm_seed)


def run(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from zoomfeat.generate.slide import generate_slide

    cfg = build_config(args)
    bar = tqdm(desc="regions", unit="region", file=sys.stderr, disable=None, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        record = generate_slide(cfg, progress)
    finally:
        bar.close()
    h, w = record["size_px"]
    note(f"{cfg.out}: {w}x{h} px at 20x, {record['units']} units")
    return 0
