"""Argument groups shared by the slide commands (``tile``, ``extract``, ``prepare-train``, ``info``): one
spelling, unit and default for the tissue flags, the scale overrides and sharding. Standard library only
(command modules are imported for ``--help``); the values become typed objects in the library.
"""

from __future__ import annotations

import argparse

from zoomfeat.tissue import TissueParams


def add_tissue_group(parser: argparse.ArgumentParser) -> None:
    """``--min-tissue``, ``--saturation-threshold``, ``--min-saturation``, ``--mask-mag`` (section "tissue")."""
    group = parser.add_argument_group("tissue")
    group.add_argument("--min-tissue", type=float, default=0.25,
                       help="fraction (0-1) of a finest-magnification tile that must be tissue (default 0.25)")
    group.add_argument("--saturation-threshold", type=float, default=None,
                       help="HSV saturation (0-255) above which a pixel is tissue (default: Otsu per slide)")
    group.add_argument("--min-saturation", type=float, default=20.0,
                       help="floor of the Otsu saturation threshold, 0-255 (default 20)")
    group.add_argument("--mask-mag", type=float, default=1.25,
                       help="magnification of the thumbnail the tissue mask is computed on (default 1.25)")


def tissue_params(args: argparse.Namespace):
    """The validated :class:`zoomfeat.tissue.TissueParams` of the tissue group."""
    return TissueParams(min_tissue=args.min_tissue, mask_mag=args.mask_mag,
                        saturation_threshold=args.saturation_threshold, min_saturation=args.min_saturation)


def add_scale_group(parser: argparse.ArgumentParser) -> None:
    """``--base-mag`` / ``--mpp`` (mutually exclusive, section "scale")."""
    group = parser.add_argument_group("scale")
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument("--base-mag", type=float, default=None,
                           help="objective power of level 0 (e.g. 20, 40) for slides that lack or misstate it "
                                "(default: from the slide)")
    exclusive.add_argument("--mpp", type=float, default=None,
                           help="microns per level-0 pixel, 0.1-2.0 (e.g. 0.5) for slides that lack it "
                                "(default: from the slide)")


def add_shard_option(group) -> None:
    """``--shard i/n`` (job arrays): every n-th slide of the sorted list, from i."""
    group.add_argument("--shard", default=None, metavar="i/n",
                       help="process shard i of n of the sorted slide list (job arrays; default: all slides); "
                            "shards may share one --out: failures are kept per shard and merged")
