"""``zoomfeat generate-large``: the 20x image of the region one patch at M covers, by ``grid`` or ``joint``."""

from __future__ import annotations

import argparse

from zoomfeat.commands.sample import add_conditions_group, add_model_group, add_runtime_group, condition_request

HELP = "generate the 20x image of one patch's region at M ((20/M) patches a side) by grid or joint sampling"
METHODS = ("grid", "joint")  # zoomfeat.generate.run.METHODS (torch-free copy, checked by a test)


FORMATS = ("auto", "png", "tiff")  # zoomfeat.generate.images.FORMATS (torch-free copy)
JOINT_UPDATES = ("je", "gmres")  # zoomfeat.generate.joint.JOINT_UPDATES (torch-free copy, checked by a test)


def add_guidance_options(group) -> None:
    """``--guidance`` (the standard scale s, as everywhere) or ``--large-image-weight`` (w = s - 1)."""
    how = group.add_mutually_exclusive_group()
    how.add_argument("--guidance", type=float, default=None, metavar="S",
                     help="classifier-free guidance as the standard scale s: e_u + s (e_c - e_u) (default 3.0, "
                          "the official large-image helpers' w = 2)")
    how.add_argument("--large-image-weight", type=float, default=None, metavar="W",
                     help="the same guidance as the official large-image helpers' weight w: (1+w) e_c - w e_u "
                          "(w = s - 1; give this or --guidance)")


def guidance_of(args: argparse.Namespace):
    """The Guidance of ``--guidance`` / ``--large-image-weight``, in the large-image form (w = s - 1)."""
    from zoomfeat.generate.guidance import Guidance

    if args.large_image_weight is not None:
        return Guidance(args.large_image_weight, "large_image")
    return Guidance((3.0 if args.guidance is None else args.guidance) - 1.0, "large_image")


def add_joint_options(group) -> None:
    """The joint update's options (shared with ``superres``)."""
    group.add_argument("--joint-update", default="je", choices=JOINT_UPDATES,
                       help="je: the supplement's Algorithm S2, one forward Jacobian-vector product J·e per patch "
                            "and iteration, error and update scaled by their max-norm (default); gmres: zoomfeat's "
                            "Newton-Krylov solve of J dx = e (not in the papers)")
    group.add_argument("--joint-iterations", type=int, default=1, metavar="K",
                       help="je: J·e updates per denoising step, x0 re-evaluated after each (default 1, the "
                            "supplement's K)")
    group.add_argument("--krylov-size", type=int, default=10,
                       help="gmres: Krylov subspace size (GMRES iterations) of each solve (default 10)")
    group.add_argument("--guide-guidance", type=float, default=None, metavar="S_L",
                       help="standard guidance scale of the guide at M (default: the same as --guidance)")
    group.add_argument("--fd-step", type=float, default=0.005,
                       help="finite-difference step of the J·e product and of the encoder's JVP (zeta = delta; "
                            "default 0.005)")
    group.add_argument("--joint-lr", type=float, default=0.5,
                       help="step size lambda of the joint update (default 0.5)")


def add_refine_options(group, default_t0: int = 300, default_stride: int = 50) -> None:
    group.add_argument("--no-refine", action="store_true",
                       help="skip the refinement pass (re-noise to --refine-t0 and denoise with windows), which "
                            "runs by default after sampling as the supplement's post-processing")
    group.add_argument("--refine-t0", type=int, default=default_t0,
                       help=f"refinement start timestep, 1-based (default {default_t0}, from the second-hand "
                            "notebook copy)")
    group.add_argument("--refine-stride", type=int, default=default_stride,
                       help=f"refinement timestep stride (default {default_stride}, from the second-hand notebook "
                            "copy)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_group(parser)
    add_conditions_group(parser, patches=False)
    for action in parser._actions:  # the shared group words --slide for `sample`, which can draw contexts instead
        if action.dest == "slide":
            action.help = "the slide whose real 20x embeddings condition the image (required)"
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--method", default="joint", choices=METHODS,
                          help="joint: ZoomLDM §3.2 guide at M + 20x patches kept in agreement (default); grid: "
                               "MultiDiffusion windows conditioned on the slerped 20x embeddings (Graikos et al. 2024)")
    sampling.add_argument("--steps", type=int, default=50, help="denoising steps; stride = t-start // steps "
                          "(default 50, the supplement's DDIM steps; 20 is the faster setting of the second-hand "
                          "notebook copy)")
    sampling.add_argument("--t-start", type=int, default=1000, help="first timestep, 1-based (default 1000)")
    add_guidance_options(sampling)
    add_joint_options(sampling)
    sampling.add_argument("--window-stride", type=int, default=None, help="grid/refinement: window stride in "
                          "latent px (default a quarter window: 16 for 64-px latents)")
    add_refine_options(sampling)
    sampling.add_argument("--seed", type=int, default=0, help="seed of all noise draws (default 0)")
    sampling.add_argument("--n", type=int, default=1, help="images from one model load: the first N tissue "
                          "regions at --mag, or with --x/--y one region and seeds seed..seed+N-1 (default 1)")
    output = parser.add_argument_group("output")
    output.add_argument("--decode-stride", type=int, default=None, help="latent px between the Gaussian-blended "
                        "decoder windows (default a quarter window: 16 for 64-px latents, the official "
                        "decode_large_image's; half a window decodes ~3x faster with a stronger seam at the patch "
                        "borders, measured in benchmarks/RESULTS.md)")
    output.add_argument("--format", default="auto", choices=FORMATS, help="auto: PNG up to 4096 px a side, else "
                        "a tiled pyramidal TIFF; png; tiff (OpenSlide/QuPath open it; mpp and magnification written "
                        "in). PNGs carry magnification, mpp, seed and model hash as text chunks (default auto)")
    output.add_argument("--out", required=True, help="new (or empty) folder, or the folder of an interrupted run "
                        "to resume: large.png (large.tiff above 4096 px), guide.png (joint), conditions.npz, "
                        "manifest.json (large_###/guide_### with --n > 1)")
    add_runtime_group(parser, batch_size=8)


def build_config(args: argparse.Namespace):
    from pathlib import Path

    from zoomfeat.generate.guidance import Guidance
    from zoomfeat.generate.run import LargeConfig
    from zoomfeat.resolve import resolve_zoomldm

    source = resolve_zoomldm(args.zoomldm, args.weights, require_weights=str(args.zoomldm).strip().lower() != "tiny")
    guide = None if args.guide_guidance is None else Guidance(args.guide_guidance - 1.0, "large_image")
    return LargeConfig(zoomldm=source, conditions=condition_request(args), out=Path(args.out), method=args.method,
                       steps=args.steps, t_start=args.t_start, guidance=guidance_of(args), h=args.fd_step,
                       lr=args.joint_lr, joint_update=args.joint_update, joint_iterations=args.joint_iterations,
                       krylov=args.krylov_size, guide_guidance=guide, window_stride=args.window_stride,
                       refine_t0=0 if args.no_refine else args.refine_t0, refine_stride=args.refine_stride,
                       decode_stride=args.decode_stride, seed=args.seed, n=args.n, batch_size=args.batch_size,
                       device=args.device, precision=args.precision, format=args.format)


def run(args: argparse.Namespace) -> int:
    from zoomfeat.generate.run import run_large
    from zoomfeat.log import note

    cfg = build_config(args)
    manifest = run_large(cfg)
    large = [e for e in manifest["images"] if e.get("role") != "guide"]
    note(f"{len(large)} large image(s) ({large[0]['size_px'][0]} px) -> {cfg.out}: "
         + ", ".join(e["file"] for e in large))
    return 0
