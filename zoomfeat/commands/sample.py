"""``zoomfeat sample``: N variations of real patches at any magnification, PNGs + contact sheet + manifest."""

from __future__ import annotations

import argparse

from zoomfeat import hub
from zoomfeat.commands.options import add_device_option, add_scale_group, add_tissue_group

HELP = ("generate N ZoomLDM variations of real patches (slide + coordinates, tile store or conditioning folder) "
        "or of contexts drawn by a CDM (--cdm, no slide)")

# zoomfeat.generate.samplers.sampler_names(), kept torch-free here (command modules import only the standard
# library); a test checks they agree
SAMPLER_CHOICES = ("ddim", "plms")


def add_model_group(parser: argparse.ArgumentParser) -> None:
    """``--zoomldm``, ``--weights``, ``--conditioner``, ``--toy-seed`` (section "model")."""
    model = parser.add_argument_group("model")
    model.add_argument("--zoomldm", required=True, metavar="CONFIG_OR_DIR",
                       help="official ZoomLDM config.yaml, its folder (with weights.ckpt), or 'tiny'")
    model.add_argument("--weights", metavar="CKPT", help="ZoomLDM checkpoint (default: beside the config); EMA "
                       "weights are used")
    model.add_argument("--conditioner", default="uni", metavar="uni=PATH|toy",
                       help="20x encoder whose embeddings condition ZoomLDM (default uni; needs uni=PATH)")
    model.add_argument("--toy-seed", type=int, default=0, help="seed of the toy conditioner (default 0)")


def add_conditions_group(parser: argparse.ArgumentParser, patches: bool) -> None:
    """``--slide``, ``--mag``, ``--x/--y``, ``--tiles``, ``--conditioning`` (section "conditions")."""
    cond = parser.add_argument_group("conditions")
    cond.add_argument("--slide", help="the slide whose real 20x embeddings condition the images (required "
                      "unless `sample --cdm` draws the contexts)")
    cond.add_argument("--mag", required=True, help="magnification of the patch, e.g. 5x (20x, 10x, ..., 0.15625x)")
    cond.add_argument("--x", type=int, default=None, help="level-0 x (px) of the patch's top-left corner "
                      "(default: the first tissue patch at --mag)")
    cond.add_argument("--y", type=int, default=None, help="level-0 y (px) of the patch's top-left corner")
    if patches:
        cond.add_argument("--patches", type=int, default=1, help="without --x/--y: the first K tissue patches "
                          "at --mag (default 1)")
    cond.add_argument("--tiles", metavar="DIR", help="tile stores from `zoomfeat tile` to take the tissue patches "
                      "from (default: tile on the fly)")
    cond.add_argument("--conditioning", metavar="DIR", help="conditioning folder written by `zoomfeat extract` "
                      "(20x embeddings; no conditioner runs)")
    add_tissue_group(parser)
    add_scale_group(parser)


def add_cdm_group(parser: argparse.ArgumentParser) -> None:
    """``--cdm`` and its draw (section "cdm"): contexts from a conditioning diffusion model instead of a slide."""
    cdm = parser.add_argument_group("cdm")
    cdm.add_argument("--cdm", metavar="DIR", help="train-cdm run folder (or CDM checkpoint): draw --patches novel "
                     "contexts at --mag from it, no slide (default: none, real conditions)")
    cdm.add_argument("--cdm-steps", type=int, default=200, help="CDM DDIM steps (default 200, as the official "
                     "CDM evaluation)")
    cdm.add_argument("--cdm-guidance", type=float, default=1.0, help="CDM classifier-free guidance on the "
                     "magnification (default 1 = none; > 1 needs a CDM trained with label dropout)")
    cdm.add_argument("--cdm-seed", type=int, default=0, help="seed of the CDM's noise (default 0)")


def add_runtime_group(parser: argparse.ArgumentParser, batch_size: int) -> None:
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--batch-size", type=int, default=batch_size,
                         help=f"patches (or windows) per network pass (default {batch_size})")
    add_device_option(runtime)
    runtime.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                         help="auto (default) = bf16 autocast on CUDA, fp32 on CPU")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_group(parser)
    add_conditions_group(parser, patches=True)
    add_cdm_group(parser)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--n", type=int, default=8, help="variations per patch (default 8)")
    sampling.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    sampling.add_argument("--guidance", type=float, default=2.0, metavar="S",
                          help="classifier-free guidance as the standard scale s: e_u + s (e_c - e_u) (the CompVis "
                               "samplers' form; default 2.0, the official notebooks')")
    sampling.add_argument("--sampler", default="ddim", choices=SAMPLER_CHOICES, help="sampler (default ddim)")
    sampling.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k "
                          "(default 0)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="new (or empty) folder, or the folder of an interrupted run "
                        "to resume: images/ (syn/ and real/ with --write-real), contact_sheet.png, conditions.npz, "
                        "manifest.json")
    output.add_argument("--write-real", action="store_true",
                        help="also write the real patch of each condition (from its slide, same magnification and "
                             "size) to real/, and the samples to syn/: the two folders of an FID")
    add_runtime_group(parser, batch_size=8)


def condition_request(args: argparse.Namespace, n_patches: int = 1):
    """The validated ConditionRequest of the "conditions" and "model" options."""
    from pathlib import Path

    from zoomfeat.commands.options import tissue_params
    from zoomfeat.encoders.specs import parse_conditioner
    from zoomfeat.errors import ConfigError
    from zoomfeat.generate.conditions import ConditionRequest
    from zoomfeat.mags import parse_mag
    from zoomfeat.slides import check_scale_overrides

    if n_patches < 1:
        raise ConfigError(f"bad --patches {n_patches}: use 1 or more")
    if getattr(args, "cdm", None) is not None:
        return cdm_request(args, n_patches)
    if args.slide is None:
        raise ConfigError("no conditions: pass --slide SLIDE (its real 20x embeddings) or, for `sample`, --cdm DIR "
                          "(contexts drawn by a CDM)")
    if (args.x is None) != (args.y is None):
        raise ConfigError("give both --x and --y (level-0 corner of the patch), or neither")
    for option, value in (("--slide", args.slide), ("--tiles", args.tiles), ("--conditioning", args.conditioning)):
        if value is not None and not Path(value).exists():
            raise ConfigError(f"{option} {value} does not exist: give an existing path")
    if args.conditioning is None:
        conditioner, weights = parse_conditioner(args.conditioner)
        weights = Path(weights) if weights else None
    else:
        conditioner, weights = args.conditioner.partition("=")[0].strip().lower(), None
    check_scale_overrides(args.base_mag, args.mpp)
    coords = ((args.x, args.y),) if args.x is not None else None
    return ConditionRequest(mag=parse_mag(args.mag), slide=Path(args.slide), coords=coords, n_patches=n_patches,
                            tiles_dir=Path(args.tiles) if args.tiles else None,
                            conditioning_dir=Path(args.conditioning) if args.conditioning else None,
                            conditioner=conditioner, conditioner_weights=weights, toy_seed=args.toy_seed,
                            base_mag=args.base_mag, mpp=args.mpp, tissue=tissue_params(args),
                            batch_size=max(1, args.batch_size))


def cdm_request(args: argparse.Namespace, n_patches: int):
    """The ConditionRequest of the "cdm" source: ``n_patches`` contexts drawn by the CDM at --mag."""
    from pathlib import Path

    from zoomfeat.errors import ConfigError
    from zoomfeat.generate.conditions import ConditionRequest
    from zoomfeat.mags import parse_mag

    given = [o for o, v in (("--slide", args.slide), ("--x/--y", args.x if args.x is not None else args.y),
                            ("--tiles", args.tiles), ("--conditioning", args.conditioning)) if v is not None]
    if given:
        raise ConfigError(f"--cdm draws the contexts itself: drop {', '.join(given)}")
    cdm = hub.local_file(args.cdm, ("last.ckpt",), "--cdm")  # a path, or a hub reference resolved to its file
    if not cdm.exists():
        raise ConfigError(f"--cdm {args.cdm} not found: pass a train-cdm run folder or a CDM checkpoint file")
    extra = {"cdm": cdm, "cdm_steps": args.cdm_steps, "cdm_guidance": args.cdm_guidance,
             "cdm_seed": args.cdm_seed}
    return ConditionRequest(mag=parse_mag(args.mag), n_patches=n_patches, batch_size=max(1, args.batch_size),
                            extra=extra)


def build_config(args: argparse.Namespace):
    from pathlib import Path

    from zoomfeat.generate.guidance import Guidance
    from zoomfeat.generate.run import SampleConfig
    from zoomfeat.generate.samplers import SamplerSettings
    from zoomfeat.resolve import resolve_zoomldm

    source = resolve_zoomldm(args.zoomldm, args.weights, require_weights=str(args.zoomldm).strip().lower() != "tiny")
    sampler = SamplerSettings(args.sampler, args.steps, Guidance(args.guidance, "standard"))
    if args.cdm is not None:
        import zoomfeat.cdm.source  # noqa: F401  (registers the "cdm" context source)
    return SampleConfig(zoomldm=source, conditions=condition_request(args, args.patches), out=Path(args.out),
                        n=args.n, sampler=sampler, seed=args.seed, batch_size=args.batch_size, device=args.device,
                        precision=args.precision, source="grid" if args.cdm is None else "cdm",
                        write_real=args.write_real)


def run(args: argparse.Namespace) -> int:
    from zoomfeat.generate.run import run_sample
    from zoomfeat.log import note

    cfg = build_config(args)
    manifest = run_sample(cfg)
    note(f"{len(manifest['images'])} images -> {cfg.out} (manifest.json, contact_sheet.png)")
    return 0
