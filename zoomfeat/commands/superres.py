"""``zoomfeat superres``: super-resolve plain images at M to 20x (inversion + joint sampling with the image fixed)."""

from __future__ import annotations

import argparse

HELP = "super-resolve images at --mag to 20x: inverted conditions + joint sampling with the image as measurement"
ROWS = ("inverted", "gt", "uncond", "bicubic")  # zoomfeat.generate.superres.ROWS (torch-free copy, tested)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from zoomfeat.commands.invert import add_inversion_group, add_model_group, add_runtime_group
    from zoomfeat.commands.options import add_scale_group

    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG/TIFF images at --mag; sides multiples "
                        "of the model's patch size (256 px for the released model, 64 for the tiny test models)")
    data = parser.add_argument_group("data")
    data.add_argument("--mag", required=True, help="magnification of the images, e.g. 5x (output: 20x)")
    data.add_argument("--slide", metavar="SLIDE", help="slide the image comes from (row gt: its real 20x embeddings)")
    data.add_argument("--x", type=int, help="level-0 x of the image's top-left corner on --slide")
    data.add_argument("--y", type=int, help="level-0 y of the image's top-left corner on --slide")
    data.add_argument("--conditioner", default=None, metavar="uni=PATH|toy",
                      help="20x encoder of the gt row's embeddings (uni=PATH, or toy for tests)")
    add_scale_group(parser)
    add_model_group(parser)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--rows", default="inverted", metavar="ROW[,ROW]",
                          help=f"what to produce, comma-separated: {', '.join(ROWS)} (default inverted)")
    sampling.add_argument("--steps", type=int, default=20, help="joint sampling steps from t=1000 (default 20, "
                          "stride 1000/steps = 50)")
    sampling.add_argument("--guidance", type=float, default=2.0,
                          help="guidance w in the large-image form (1+w) e_c - w e_u (default 2)")
    sampling.add_argument("--fd-step", type=float, default=0.005, help="finite-difference step h (default 0.005)")
    sampling.add_argument("--joint-lr", type=float, default=0.5, help="constraint step size (default 0.5)")
    sampling.add_argument("--inner-iterations", type=int, default=10, help="GMRES iterations per step (default 10)")
    sampling.add_argument("--refine", action="store_true", help="run the official refinement pass after sampling")
    sampling.add_argument("--refine-t0", type=int, default=300, help="refinement start timestep, 1-based (default 300)")
    sampling.add_argument("--refine-stride", type=int, default=100, help="refinement timestep stride (default 100)")
    sampling.add_argument("--consistency", default="project", choices=("project", "none"),
                          help="project: end with the exact projection onto images whose downsampling is the input "
                               "(default); none: the sampler's output as is (the paper's procedure)")
    add_inversion_group(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, metavar="OUT.png|DIR",
                        help="one .png (one image, one row) or a folder: DIR/<row>/<image>.png + .json (a pyramidal .tiff "
                        "instead of .png above 4096 px)")
    output.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_runtime_group(parser, "inversion and the sampler noise", batch_size=True)


def _rows(value: str) -> tuple[str, ...]:
    from zoomfeat.errors import ConfigError

    rows = tuple(dict.fromkeys(r.strip().lower() for r in value.split(",") if r.strip()))
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        raise ConfigError(f"bad --rows {value!r}: use one or more of {', '.join(ROWS)}")
    return rows


def build_settings(args: argparse.Namespace, row: str):
    from zoomfeat.commands.invert import inversion_settings
    from zoomfeat.errors import ConfigError
    from zoomfeat.generate.guidance import Guidance
    from zoomfeat.generate.joint import JointSettings
    from zoomfeat.generate.superres import SuperResSettings
    from zoomfeat.generate.windows import WindowSettings

    if not 1 <= args.steps <= 1000:
        raise ConfigError(f"--steps {args.steps}: use 1..1000")
    guidance = Guidance(args.guidance, "large_image")
    joint = JointSettings(t_start=1000, stride=1000 // args.steps, guidance=guidance, h=args.fd_step,
                          lr=args.joint_lr, inner_iterations=args.inner_iterations, batch_size=args.batch_size)
    refinement = (WindowSettings(t_start=args.refine_t0, stride=args.refine_stride, guidance=guidance)
                  if args.refine and row in ("inverted", "gt") else None)
    return SuperResSettings(row=row, joint=joint, inversion=inversion_settings(args), refinement=refinement,
                            consistency=args.consistency, seed=args.seed)


def _targets(args, rows):
    """[(image path, row, png path)] and a check that no output exists (unless --overwrite)."""
    from pathlib import Path

    from zoomfeat.errors import ConfigError

    out = Path(args.out)
    images = [Path(p) for p in args.images]
    if out.suffix.lower() == ".png":
        if len(images) > 1 or len(rows) > 1:
            raise ConfigError(f"--out {out} is one file: with several images or rows pass a folder")
        targets = [(images[0], rows[0], out)]
    elif out.suffix:
        raise ConfigError(f"--out {out}: use a .png file or a folder")
    else:
        stems = [p.stem for p in images]
        if len(set(stems)) != len(stems):
            raise ConfigError("two input images share a file name: outputs are named after the inputs")
        targets = [(p, row, out / row / f"{p.stem}.png") for row in rows for p in images]
    existing = [t for *_, t in targets if t.exists() or t.with_suffix(".tiff").exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"{existing[0]} exists: pass --overwrite to replace it, or choose another --out")
    return targets


def _gt_grids(args, rows, model, images, mag):
    from zoomfeat.errors import ConfigError

    if "gt" not in rows:
        return None
    if not args.slide or args.x is None or args.y is None or not args.conditioner:
        raise ConfigError("the gt row needs --slide, --x, --y and --conditioner uni=PATH|toy")
    if len(images) != 1:
        raise ConfigError("the gt row takes one image (its --slide position)")
    from zoomfeat.encoders import load_encoder
    from zoomfeat.encoders.specs import parse_conditioner
    from zoomfeat.generate.superres import check_input, gt_grid_from_slide
    from zoomfeat.slides import check_scale_overrides

    check_scale_overrides(args.base_mag, args.mpp)
    name, path = parse_conditioner(args.conditioner)
    encoder = load_encoder(name, path, dim=model.conditioning_dim if name == "toy" else None)
    if encoder.spec.dim != model.conditioning_dim:
        raise ConfigError(f"--conditioner {name} gives {encoder.spec.dim}-d embeddings; this ZoomLDM takes "
                          f"{model.conditioning_dim}-d")
    kh, kw = check_input(images[0][1], mag, model.first_stage_resolution, str(images[0][0]))
    device = str(model.alphas_cumprod.device)
    return gt_grid_from_slide(args.slide, args.x, args.y, kh, kw, mag, encoder, base_mag=args.base_mag,
                              mpp=args.mpp, device=device)


def run(args: argparse.Namespace) -> int:
    from zoomfeat.commands.invert import load_model
    from zoomfeat.store import write_json_atomic
    from zoomfeat.generate.metrics.images import read_image
    from zoomfeat.generate.images import save_large
    from zoomfeat.generate.superres import check_input, manifest, superres
    from zoomfeat.mags import parse_mag
    from zoomfeat.resolve import file_sha256

    mag = parse_mag(args.mag)
    rows = _rows(args.rows)
    settings = {row: build_settings(args, row) for row in rows}
    targets = _targets(args, rows)
    paths = list(dict.fromkeys(p for p, _, _ in targets))
    images = [(p, read_image(p)) for p in paths]
    model, source, runtime = load_model(args)
    for path, image in images:
        check_input(image, mag, model.first_stage_resolution, str(path))
    gt = _gt_grids(args, rows, model, images, mag)
    pixels = dict(images)
    provenance = {"zoomldm_config": str(source.config), "zoomldm_sha256": file_sha256(source.weights),
                  "precision": runtime.precision, "device": runtime.device}
    for path, row, out in targets:
        result = superres(model, pixels[path], mag, settings[row], gt_grid=gt, autocast=runtime.autocast())
        written = save_large(out.with_suffix(""), result.image)  # .png, or a pyramidal .tiff above 4096 px
        record = manifest(result, settings[row], mag, {**provenance, "input": str(path), "output": str(written)})
        write_json_atomic(out.with_suffix(".json"), record)
        print(f"superres {row}: {path} -> {written} ({result.image.shape[1]}x{result.image.shape[0]} px); "
              f"downsampled output vs input: {result.psnr_sampler:.2f} dB from the sampler, "
              f"{result.psnr_final:.2f} dB final")
    return 0
