"""``zoomfeat info``: a slide's dimensions, levels, base magnification and mpp, and where each came from."""

from __future__ import annotations

import argparse

from zoomfeat.commands.options import add_scale_group
from zoomfeat.serial import to_jsonable
from zoomfeat.slides import Slide

HELP = "show a slide's dimensions, pyramid levels, base magnification and mpp (and their sources)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slide", help="slide file")
    add_scale_group(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print JSON instead of text (default: text)")


def run(args: argparse.Namespace) -> int:
    import json

    with Slide(args.slide, base_mag=args.base_mag, mpp=args.mpp) as slide:
        info = slide.info
    if args.json:
        print(json.dumps(to_jsonable(info), indent=2))
        return 0
    mpp = "unknown" if info.base_mpp is None else f"{info.base_mpp:g} um/px"
    print(f"slide:          {info.path}")
    print(f"vendor:         {info.vendor}")
    print(f"dimensions:     {info.width} x {info.height} px (level 0)")
    print(f"magnification:  {info.base_magnification:g}x (from {info.magnification_source})")
    print(f"mpp:            {mpp} (from {info.mpp_source})")
    for i, ((w, h), ds) in enumerate(zip(info.level_dimensions, info.level_downsamples)):
        print(f"level {i}:        {w} x {h} px, downsample {ds:g}")
    return 0
