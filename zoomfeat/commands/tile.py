"""``zoomfeat tile``: tissue detection and aligned multi-magnification tile grids, one HDF5 file per slide."""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

from zoomfeat.commands.options import add_scale_group, add_shard_option, add_tissue_group, tissue_params
from zoomfeat.mags import Magnification, parse_mags
from zoomfeat.serial import to_jsonable
from zoomfeat.slides import Slide, check_scale_overrides, find_slides, slide_id_of
from zoomfeat.store import TileStoreWriter, check_output_folder, h5_path, is_complete, slide_tile_grid
from zoomfeat.tissue import tissue_mask

HELP = "detect tissue and write aligned multi-magnification tile grids (one .h5 per slide)"
RECORD_NAME = "tile_config.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", help="slide files and/or folders holding slides")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--mags", default="20x,5x", help="magnifications, e.g. 20x,5x (default) or 20x,10x,5x,2.5x")
    add_tissue_group(parser)
    add_scale_group(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="output folder for <slide_id>.h5 files (refused when it holds "
                        "grids made with other settings)")
    output.add_argument("--preview", action="store_true", help="also write <out>/previews/<slide_id>.png "
                        "(default off)")
    runtime = parser.add_argument_group("runtime")
    add_shard_option(runtime)
    runtime.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Validated settings of one `zoomfeat tile` run (saved as <out>/tile_config.json, with the "grid"
    record a reuse of the folder is compared with)."""

    slides: tuple[str, ...]
    out: str
    mags: tuple[Magnification, ...]
    tissue: object  # zoomfeat.tissue.TissueParams
    base_mag: float | None
    mpp: float | None
    preview: bool
    shard: str | None

    def record(self) -> dict:
        """What the grids of the folder share (compared when it is reused). The scale overrides are not in it:
        each file records its own base magnification and mpp, and a slide lacking them is tiled into the same
        folder with --mpp / --base-mag."""
        return {"mags": [str(m) for m in self.mags], "tissue": self.tissue}


def build_config(args: argparse.Namespace) -> TileConfig:
    from zoomfeat.batch import parse_shard

    tissue = tissue_params(args)
    if args.shard is not None:
        parse_shard(args.shard)
    check_scale_overrides(args.base_mag, args.mpp)
    return TileConfig(slides=tuple(args.slides), out=args.out, mags=parse_mags(args.mags), tissue=tissue,
                      base_mag=args.base_mag, mpp=args.mpp, preview=args.preview, shard=args.shard)


def tile_slide(path: Path, config: TileConfig) -> str:
    """Write one slide's tile file; "skipped" when a complete file made from the same slide exists."""
    from zoomfeat.log import warn
    from zoomfeat.preview import save_preview

    target = h5_path(config.out, slide_id_of(path))
    if is_complete(target, path):
        return "skipped"
    with Slide(path, base_mag=config.base_mag, mpp=config.mpp) as slide:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grid = slide_tile_grid(slide, config.mags, config.tissue)
        for warning in caught:
            warn(str(warning.message))
        with TileStoreWriter(target, slide.info, grid) as writer:
            writer.commit()
        if config.preview:
            mask = tissue_mask(slide, config.tissue) if len(grid) else None
            save_preview(Path(config.out) / "previews" / f"{slide_id_of(path)}.png", slide.thumbnail(1024), mask,
                         grid, slide.info.width)
    return "done"


def run(args: argparse.Namespace) -> int:
    from zoomfeat.batch import run_batch, shard_slides

    config = build_config(args)
    slides = shard_slides(find_slides(config.slides), config.shard)
    check_output_folder(config.out, "--out", config.record(), RECORD_NAME, section="grid", extra=to_jsonable(config))
    report = run_batch(slides, config.out, lambda p: tile_slide(p, config), desc="tile",
                       progress=not args.no_progress, shard=config.shard)
    return report.exit_code
