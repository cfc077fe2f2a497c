"""``zoomfeat generate-large``: the 20x image of the region one patch at M covers, by ``grid`` or ``joint``."""

from __future__ import annotations

import argparse

from zoomfeat.commands.sample import add_conditions_group, add_model_group, add_runtime_group, condition_request

HELP = "generate the 20x image of one patch's region at M ((20/M) patches a side) by grid or joint sampling"
METHODS = ("grid", "joint")  # zoomfeat.generate.run.METHODS (torch-free copy, checked by a test)


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
    sampling.add_argument("--steps", type=int, default=20, help="denoising steps; stride = t-start // steps "
                          "(default 20, the paper's: stride 50)")
    sampling.add_argument("--t-start", type=int, default=1000, help="first timestep, 1-based (default 1000)")
    sampling.add_argument("--guidance", type=float, default=2.0, help="guidance weight w of the large-image form "
                          "(1+w) e_c - w e_u (default 2.0 = a standard scale of 3)")
    sampling.add_argument("--h", type=float, default=0.005, help="joint: finite-difference step (rms of the "
                          "perturbation; default 0.005)")
    sampling.add_argument("--lr", type=float, default=0.5, help="joint: fraction of the Newton step taken per "
                          "denoising step (default 0.5)")
    sampling.add_argument("--inner-iterations", type=int, default=10, help="joint: GMRES iterations of the "
                          "inexact Newton solve (default 10)")
    sampling.add_argument("--window-stride", type=int, default=None, help="grid/refinement: window stride in "
                          "latent px (default a quarter window: 16 for 64-px latents)")
    sampling.add_argument("--refine-t0", type=int, default=0, help="refinement pass: re-noise to this 1-based t "
                                                                   "and denoise with windows (default 0 = none)")
    sampling.add_argument("--refine-stride", type=int, default=100, help="refinement timestep stride (default 100)")
    sampling.add_argument("--seed", type=int, default=0, help="seed of all noise draws (default 0)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="new (or empty) folder: large.png (large.tiff above 4096 "
                        "px), guide.png (joint), conditions.npz, manifest.json")
    add_runtime_group(parser, batch_size=8)


def build_config(args: argparse.Namespace):
    from pathlib import Path

    from zoomfeat.generate.guidance import Guidance
    from zoomfeat.generate.run import LargeConfig
    from zoomfeat.resolve import resolve_zoomldm

    source = resolve_zoomldm(args.zoomldm, args.weights, require_weights=str(args.zoomldm).strip().lower() != "tiny")
    return LargeConfig(zoomldm=source, conditions=condition_request(args), out=Path(args.out), method=args.method,
                       steps=args.steps, t_start=args.t_start, guidance=Guidance(args.guidance, "large_image"),
                       h=args.h, lr=args.lr, inner_iterations=args.inner_iterations,
                       window_stride=args.window_stride, refine_t0=args.refine_t0, refine_stride=args.refine_stride,
                       seed=args.seed, batch_size=args.batch_size, device=args.device, precision=args.precision)


def run(args: argparse.Namespace) -> int:
    from zoomfeat.generate.run import run_large
    from zoomfeat.log import note

    cfg = build_config(args)
    manifest = run_large(cfg)
    note(f"{manifest['images'][0]['file']} ({manifest['images'][0]['size_px'][0]} px) -> {cfg.out}")
    return 0
