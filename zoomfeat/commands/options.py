"""Options shared by several commands: one spelling, unit, default and help for the tissue flags, the scale
overrides, sharding, ``--device`` and ``--workers`` (``tests/test_house_rules.py`` checks the last two agree).
Light imports only (command modules are imported for ``--help``); the values become typed objects in the library.
:func:`check_common` holds the checks every command's options get before it runs (cli.main calls it): seeds,
names used in paths, class lists, feature sets.
"""

from __future__ import annotations

import argparse
import re

from zoomfeat.errors import ConfigError
from zoomfeat.features import FeatureSpec

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


DEVICE_HELP = "where the networks run: auto (cuda when a GPU is visible), cpu, cuda or cuda:N (default auto)"
WORKERS = 2
WORKERS_HELP = (f"DataLoader worker processes reading the inputs, per device (default {WORKERS}; 0 reads in the "
                "main process)")


def add_device_option(group, *aliases: str) -> None:
    """``--device`` (one default and meaning in every command): checked by :func:`zoomfeat.runtime.resolve_device`
    when the command runs, so a bad value is a one-line error naming it."""
    group.add_argument("--device", *aliases, dest="device", default="auto", metavar="auto|cpu|cuda[:N]",
                       help=DEVICE_HELP)


def add_workers_option(group) -> None:
    """``--workers`` (one default and meaning in every command that reads through a DataLoader)."""
    group.add_argument("--workers", type=int, default=WORKERS, metavar="N", help=WORKERS_HELP)


def add_shard_option(group) -> None:
    """``--shard i/n`` (job arrays): every n-th slide of the sorted list, from i."""
    group.add_argument("--shard", default=None, metavar="i/n",
                       help="process shard i of n of the sorted slide list (job arrays; default: all slides); "
                            "shards may share one --out: failures are kept per shard and merged")


# ---- checks every command's parsed options get (cli.main runs them before the command) ----
SEED_MAX = 2**63 - 1  # numpy, torch and HDF5 attributes all hold a seed in a signed 64-bit integer
PATH_NAME_OPTIONS = ("encoder_name",)  # options whose value becomes a file or folder name
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_seed(value, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        return
    if not 0 <= value <= SEED_MAX:
        raise ConfigError(f"bad {option} {value}: a seed is an integer from 0 to 2^63-1 ({SEED_MAX})")


def safe_name(value: str, option: str) -> str:
    """``value`` when it is usable as one file or folder name (letters, digits, ``._+-``; no separator, no
    ``..``, not hidden); a ConfigError naming the option otherwise."""
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise ConfigError(f"bad {option} {value!r}: it names a file or folder, so use letters, digits and ._+- "
                          "only (no path separators, no '..', not starting with '.')")
    return value


def check_list_repeats(text: str, option: str) -> None:
    items = [item.strip() for item in text.split(",")]
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise ConfigError(f"bad {option} {text!r}: the list repeats {', '.join(map(repr, repeated))}; "
                          "name each one once")


def check_common(args: argparse.Namespace) -> None:
    """The checks every command gets, by option name: seeds within 0..2^63-1, names used in paths safe,
    comma lists of classes without repeats, feature sets well formed (a known layout prefix)."""
    for dest, value in vars(args).items():
        if dest.startswith("_") or value is None:
            continue
        if dest == "seed" or dest.endswith("_seed") or dest == "seeds" or dest.endswith("_seeds"):
            if isinstance(value, str):  # a comma list such as train-mil --seeds 0,1,2
                value = [int(v) for v in value.split(",") if v.strip().lstrip("-").isdigit()]
            for item in value if isinstance(value, (list, tuple)) else [value]:
                check_seed(item, _option(dest))
        elif dest in PATH_NAME_OPTIONS and isinstance(value, str):
            safe_name(value, _option(dest))
        elif dest == "classes" and isinstance(value, str):
            check_list_repeats(value, _option(dest))
        elif dest == "features" and isinstance(value, str) and "@" in value:  # a feature set (DIR@20x...)
            FeatureSpec.parse(value)  # an unknown layout prefix or a malformed set, before any file is read
