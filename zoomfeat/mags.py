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

# Other domains name the same factor-2 ladder of scale levels differently; their names are aliases parsed at the
# boundary onto the ladder's slots (index 0 = the finest level), and stored canonically. ZoomLDM's NAIP model uses
# four levels at 1, 2, 4 and 8 m/px (its `mag_levels: 4`): "2m" is slot 1, stored as "10x".
SCALE_NAMES: dict[str, tuple[str, ...]] = {"naip": ("1m", "2m", "4m", "8m")}
_ALIASES: dict[str, float] = {name: MAGNIFICATIONS[i] for names in SCALE_NAMES.values() for i, name in enumerate(names)}

_MAG_RE = re.compile(r"^\s*(\d+(?:[._]\d+)?)\s*x?\s*$", re.IGNORECASE)


class Magnification(float):
    """One magnification of the ZoomLDM ladder, parsed once at the boundary and carried everywhere.

    A ``float`` subclass (``Magnification("5x") == 5.0``, usable as a dict key next to plain floats) that
    also knows its canonical ``name`` ("5x"), ZoomLDM ``index`` (20x=0 ... 0.15625x=7), conditioning
    ``grid_width`` (20x tiles per side of one patch) and its patch size in level-0 px for a base magnification.
    ``str(m)`` is the canonical name. Construct it with :func:`parse_mag` or ``Magnification(value)``.
    """

    __slots__ = ()

    def __new__(cls, value: "str | float | Magnification") -> "Magnification":
        if isinstance(value, Magnification):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            mag = float(value)
        elif str(value).strip().lower() in _ALIASES:
            mag = _ALIASES[str(value).strip().lower()]
        else:
            match = _MAG_RE.match(str(value))
            if not match:
                raise ConfigError(f"unknown magnification {value!r}: use one of {', '.join(mag_names())}")
            mag = float(match.group(1).replace("_", "."))
        if mag not in MAGNIFICATIONS:
            raise ConfigError(f"unknown magnification {value!r}: use one of {', '.join(mag_names())}")
        return super().__new__(cls, mag)

    @property
    def name(self) -> str:
        """Canonical name: ``"20x"``, ``"2.5x"``, ``"0.15625x"``."""
        return f"{float(self):g}x"

    @property
    def index(self) -> int:
        """ZoomLDM magnification token: 20x=0, 10x=1, ..., 0.15625x=7."""
        return MAGNIFICATIONS.index(float(self))

    @property
    def grid_width(self) -> int:
        """Conditioning grid width: 20x tiles per side of one 256-px patch (1 at 20x, 4 at 5x)."""
        return int(round(CONDITIONING_MAG / float(self)))

    @property
    def downsample_from_20x(self) -> int:
        """20x px per px at this magnification (= ``grid_width``)."""
        return self.grid_width

    def level0_size(self, base_magnification: float, patch_size: int = PATCH_SIZE) -> int:
        """Level-0 px covered by one ``patch_size`` patch at this magnification on a slide scanned at
        ``base_magnification`` (``256 * 40 / 5 = 2048`` for a 5x patch of a 40x slide)."""
        size = patch_size * float(base_magnification) / float(self)
        if abs(size - round(size)) > 1e-6 or size < 1:
            raise ConfigError(f"a {self.name} patch of a {base_magnification:g}x slide is {size:g} level-0 px, "
                              f"not a whole number: pass --base-mag with the scanner's objective power")
        return int(round(size))

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Magnification({self.name!r})"

    def __reduce__(self):
        return (Magnification, (float(self),))


CONDITIONING_MAG = Magnification(20.0)  # the UNI tiles that condition every patch are 20x tiles


class MagDict(dict):
    """A ``dict`` keyed by :class:`Magnification`: keys given as names (``"5x"``) or numbers are parsed on the way
    in, so ``d["5x"]``, ``d[5.0]`` and ``d[Magnification("5x")]`` are one entry, and iteration yields
    magnifications (whose ``str`` is the canonical name)."""

    __slots__ = ()

    def __init__(self, items=(), **kwargs):
        super().__init__()
        self.update(items, **kwargs)

    @staticmethod
    def _key(key) -> "Magnification":
        try:
            return Magnification(key)
        except ConfigError:
            raise KeyError(key) from None

    def __setitem__(self, key, value) -> None:
        super().__setitem__(self._key(key), value)

    def __getitem__(self, key):
        return super().__getitem__(self._key(key))

    def __delitem__(self, key) -> None:
        super().__delitem__(self._key(key))

    def __contains__(self, key) -> bool:
        try:
            return super().__contains__(self._key(key))
        except (KeyError, TypeError):
            return False

    def get(self, key, default=None):
        return self[key] if key in self else default

    def pop(self, key, *default):
        return super().pop(self._key(key), *default) if default else super().pop(self._key(key))

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, items=(), **kwargs) -> None:
        for key, value in (items.items() if hasattr(items, "items") else items):
            self[key] = value
        for key, value in kwargs.items():
            self[key] = value

    def __eq__(self, other) -> bool:
        if isinstance(other, dict) and not isinstance(other, MagDict):
            try:
                other = MagDict(other)
            except KeyError:
                return False
        return dict.__eq__(self, other)

    __ne__ = lambda self, other: not self == other  # noqa: E731
    __hash__ = None

    def copy(self) -> "MagDict":
        return MagDict(self)

    def __repr__(self) -> str:
        return "MagDict({" + ", ".join(f"{k.name!r}: {v!r}" for k, v in self.items()) + "})"


def parse_mag(value: str | float) -> Magnification:
    """Parse ``"20x"``, ``"2.5x"``, ``"2_5x"``, ``"2.5"`` or ``2.5`` into a :class:`Magnification`."""
    return Magnification(value)


def parse_mags(value: str | Iterable[str | float]) -> tuple[Magnification, ...]:
    """Parse a list such as ``"20x,5x"`` (or ``"all"``) into unique magnifications, finest first."""
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return tuple(Magnification(m) for m in MAGNIFICATIONS)
        items = [v for v in value.split(",") if v.strip()]
    else:
        items = list(value)
    if not items:
        raise ConfigError("no magnification given: use e.g. --mags 20x,5x")
    return tuple(sorted({parse_mag(v) for v in items}, reverse=True))


def mag_name(mag: float | str) -> str:
    """Canonical name of a magnification: ``20.0 -> "20x"``, ``2.5 -> "2.5x"``."""
    return parse_mag(mag).name


def mag_names() -> list[str]:
    return [f"{m:g}x" for m in MAGNIFICATIONS]


def mag_index(mag: float | str) -> int:
    """ZoomLDM magnification index: 20x=0, 10x=1, ..., 0.15625x=7."""
    return parse_mag(mag).index


def grid_width(mag: float | str) -> int:
    """Width, in 20x tiles, of the conditioning grid of one patch at ``mag`` (1 at 20x, 4 at 5x)."""
    return parse_mag(mag).grid_width
