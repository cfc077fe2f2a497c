"""Magnifications: canonical names, ZoomLDM indices and the patch geometry they imply.

ZoomLDM was trained at eight magnifications, 20x down to 0.15625x, each a factor 2 apart; its
magnification token is the index in :data:`MAGNIFICATIONS` (20x=0 ... 0.15625x=7). A patch is
:data:`PATCH_SIZE` px at its own magnification, so it covers ``PATCH_SIZE * 20 / m`` px at 20x and its
conditioning grid is ``20 / m`` UNI tiles wide.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from zoomfeat.errors import ConfigError

PATCH_SIZE = 256
MAGNIFICATIONS: tuple[float, ...] = (20.0, 10.0, 5.0, 2.5, 1.25, 0.625, 0.3125, 0.15625)
CONDITIONING_MAG = 20.0  # the UNI tiles that condition every patch are 20x tiles

_MAG_RE = re.compile(r"^\s*(\d+(?:[._]\d+)?)\s*x?\s*$", re.IGNORECASE)


def parse_mag(value: str | float) -> float:
    """Parse ``"20x"``, ``"2.5x"``, ``"2_5x"``, ``"2.5"`` or ``2.5`` into one of :data:`MAGNIFICATIONS`."""
    if isinstance(value, (int, float)):
        mag = float(value)
    else:
        match = _MAG_RE.match(str(value))
        if not match:
            raise ConfigError(f"unknown magnification {value!r}: use one of {', '.join(mag_names())}")
        mag = float(match.group(1).replace("_", "."))
    if mag not in MAGNIFICATIONS:
        raise ConfigError(f"unknown magnification {value!r}: use one of {', '.join(mag_names())}")
    return mag


def parse_mags(value: str | Iterable[str | float]) -> tuple[float, ...]:
    """Parse a list such as ``"20x,5x"`` (or ``"all"``) into unique magnifications, finest first."""
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return MAGNIFICATIONS
        items = [v for v in value.split(",") if v.strip()]
    else:
        items = list(value)
    if not items:
        raise ConfigError("no magnification given: use e.g. --mags 20x,5x")
    return tuple(sorted({parse_mag(v) for v in items}, reverse=True))


def mag_name(mag: float) -> str:
    """Canonical name of a magnification: ``20.0 -> "20x"``, ``2.5 -> "2.5x"``."""
    return f"{parse_mag(mag):g}x"


def mag_names() -> list[str]:
    return [f"{m:g}x" for m in MAGNIFICATIONS]


def mag_index(mag: float | str) -> int:
    """ZoomLDM magnification index: 20x=0, 10x=1, ..., 0.15625x=7."""
    return MAGNIFICATIONS.index(parse_mag(mag))


def grid_width(mag: float | str) -> int:
    """Width, in 20x tiles, of the conditioning grid of one patch at ``mag`` (1 at 20x, 4 at 5x)."""
    return int(round(CONDITIONING_MAG / parse_mag(mag)))
