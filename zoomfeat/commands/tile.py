"""``zoomfeat tile``: tissue detection and aligned multi-magnification tile grids, one HDF5 file per slide."""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

HELP = "detect tissue and write aligned multi-magnification tile grids (one .h5 per slide)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", help="slide files and/or folders holding slides")
    parser.add_argument("--out", required=True, help="output folder for <slide_id>.h5 files")
    parser.add_argument("--mags", default="20x,5x", help="magnifications, e.g. 20x,5x or 20x,10x,5x,2.5x")
    parser.add_argument("--min-tissue", type=float, default=0.25, help="tissue fraction a finest tile needs")
    parser.add_argument("--saturation-threshold", type=float, default=None,
                        help="HSV saturation (0-255) for tissue; default Otsu per slide")
    parser.add_argument("--min-saturation", type=float, default=20.0, help="floor of the Otsu threshold (0-255)")
    parser.add_argument("--mask-mag", type=float, default=1.25, help="magnification of the tissue mask thumbnail")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--base-mag", type=float, default=None, help="override the slides' base magnification")
    scale.add_argument("--mpp", type=float, default=None, help="override the slides' level-0 um/px")
    parser.add_argument("--preview", action="store_true", help="write <out>/previews/<slide_id>.png")
    parser.add_argument("--shard", default=None, help="process shard i/n of the sorted slide list")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Validated settings of one `zoomfeat tile` run (saved as <out>/tile_config.json)."""

    slides: tuple[str, ...]
    out: str
    mags: tuple[float, ...]
    tissue: object  # zoomfeat.tissue.TissueParams
    base_mag: float | None
    mpp: float | None
    preview: bool
    shard: str | None


def build_config(args: argparse.Namespace) -> TileConfig:
    from zoomfeat.batch import parse_shard
    from zoomfeat.mags import parse_mags
    from zoomfeat.slides import resolve_scale
    from zoomfeat.tissue import TissueParams

    tissue = TissueParams(min_tissue=args.min_tissue, mask_mag=args.mask_mag,
                          saturation_threshold=args.saturation_threshold, min_saturation=args.min_saturation)
    if args.shard is not None:
        parse_shard(args.shard)
    if args.base_mag is not None or args.mpp is not None:  # validate overrides before any slide is opened
        resolve_scale({}, Path("."), args.base_mag, args.mpp)
    return TileConfig(slides=tuple(args.slides), out=args.out, mags=parse_mags(args.mags), tissue=tissue,
                      base_mag=args.base_mag, mpp=args.mpp, preview=args.preview, shard=args.shard)


def tile_slide(path: Path, config: TileConfig) -> str:
    """Write one slide's tile file; "skipped" when a complete file made from the same slide exists."""
    from zoomfeat.preview import save_preview
    from zoomfeat.slides import Slide
    from zoomfeat.store import TileStoreWriter, h5_path, is_complete
    from zoomfeat.tiling import make_grid
    from zoomfeat.tissue import tissue_mask

    target = h5_path(config.out, path.stem)
    if is_complete(target, path):
        return "skipped"
    with Slide(path, base_mag=config.base_mag, mpp=config.mpp) as slide:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grid = make_grid(slide, config.mags, config.tissue)
        for warning in caught:
            print(f"warning: {warning.message}", file=__import__("sys").stderr)
        with TileStoreWriter(target, slide.info, grid) as writer:
            writer.commit()
        if config.preview:
            mask = tissue_mask(slide, config.tissue) if len(grid) else None
            save_preview(Path(config.out) / "previews" / f"{path.stem}.png", slide.thumbnail(1024), mask, grid,
                         slide.info.width)
    return "done"


def run(args: argparse.Namespace) -> int:
    from zoomfeat.batch import run_batch, shard_slides
    from zoomfeat.config import save_config
    from zoomfeat.slides import find_slides

    config = build_config(args)
    slides = shard_slides(find_slides(config.slides), config.shard)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    save_config(config, Path(config.out) / "tile_config.json")
    report = run_batch(slides, config.out, lambda p: tile_slide(p, config), desc="tile",
                       progress=not args.no_progress)
    return report.exit_code
