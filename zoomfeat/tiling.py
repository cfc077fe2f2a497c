"""Aligned multi-magnification tile grids on one level-0 lattice.

A tile at magnification ``m`` is ``PATCH_SIZE`` px at ``m``, i.e. ``patch_size_level0 = 256 * base_mag / m``
level-0 px (must be an integer). All tiles sit on the lattice of the coarsest requested magnification,
anchored at level-0 (0, 0), so every coarse tile splits exactly into finer tiles.

Selection: finest tiles lying fully inside the slide whose tissue fraction is >= ``min_tissue``; a tile at
a coarser magnification is kept whenever it contains a kept finest tile (it may reach past the slide edge,
which reads as white). Order (documented, deterministic): coarsest tiles row-major (y, then x); at every
other magnification, tiles grouped by their coarsest ancestor in that order, row-major inside it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from zoomfeat.errors import DataError, SlideError
from zoomfeat.mags import PATCH_SIZE, MagDict, Magnification, mag_name, parse_mag
from zoomfeat.tissue import TissueMask, TissueParams, tissue_mask


@dataclass(frozen=True)
class TileGrid:
    """Kept tiles per magnification; coords are level-0 top-left (x, y).

    Every mapping is a :class:`MagDict` keyed by :class:`Magnification` (a name such as ``"20x"`` is parsed on
    lookup); ``names`` gives the canonical names, which are also the store's HDF5 group names.
    """

    mags: tuple[Magnification, ...]  # finest first
    coords: MagDict  # magnification -> int64 [N, 2]
    parents: MagDict  # fine magnification -> MagDict{coarser magnification: int64 [N] row into its coords}
    patch_size_level0: MagDict  # magnification -> 256 * base_mag / mag

    def __post_init__(self) -> None:
        object.__setattr__(self, "mags", tuple(Magnification(m) for m in self.mags))
        object.__setattr__(self, "coords", MagDict(self.coords))
        object.__setattr__(self, "parents", MagDict({m: MagDict(p) for m, p in self.parents.items()}))
        object.__setattr__(self, "patch_size_level0", MagDict(self.patch_size_level0))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(mag_name(m) for m in self.mags)

    def __len__(self) -> int:
        """Number of tiles at the finest magnification."""
        return len(self.coords[self.names[0]]) if self.mags else 0


def patch_sizes_level0(base_mag: float, mags: Sequence[Magnification], slide_name: str = "slide") -> MagDict:
    """Level-0 size of a 256-px tile at each magnification; :class:`SlideError` if not a whole number."""
    sizes = MagDict()
    for mag in map(Magnification, mags):
        if mag > base_mag + 1e-9:
            raise SlideError(f"{slide_name}: base magnification {base_mag:g}x is below the requested {mag_name(mag)}: "
                             "drop it from --mags or pass the right --base-mag")
        size = PATCH_SIZE * base_mag / mag
        if abs(size - round(size)) > 1e-6:
            raise SlideError(f"{slide_name}: a {mag_name(mag)} tile would be {size:g} level-0 px at base "
                             f"{base_mag:g}x (not whole): pick --mags that divide the base magnification")
        sizes[mag] = int(round(size))
    coarsest = sizes[min(sizes)]
    for mag, size in sizes.items():
        if coarsest % size:
            raise SlideError(f"{slide_name}: {mag} tiles ({size} px) do not divide the coarsest tiles "
                             f"({coarsest} px): use magnifications a power of two apart")
    return sizes


def grid_from_mask(width: int, height: int, base_mag: float, mags: Sequence[Magnification],
                   mask: TissueMask | None, min_tissue: float, slide_name: str = "slide") -> TileGrid:
    """Grid over a ``width`` x ``height`` level-0 slide; ``mask=None`` keeps every tile (no tissue check)."""
    mags = tuple(sorted({parse_mag(m) for m in mags}, reverse=True))
    sizes = patch_sizes_level0(base_mag, mags, slide_name)
    fine, coarse = mags[0], mags[-1]
    fine_xy = _lattice(width, height, sizes[fine])
    if len(fine_xy) and mask is not None:
        fine_xy = fine_xy[mask.fractions(fine_xy, sizes[fine]) >= min_tissue]
    coords = MagDict()
    for mag in mags:
        cells = np.unique(fine_xy // sizes[mag], axis=0) if len(fine_xy) else np.zeros((0, 2), np.int64)
        coords[mag] = _order(cells.astype(np.int64) * sizes[mag], sizes[mag], sizes[coarse])
    parents = {f: {c: _parent_rows(coords[f], coords[c], sizes[c]) for c in mags[i + 1 :]}
               for i, f in enumerate(mags)}
    return TileGrid(mags=mags, coords=coords, parents=parents, patch_size_level0=sizes)


def _lattice(width: int, height: int, size: int) -> np.ndarray:
    """Top-left corners of the tiles of side ``size`` that lie fully inside the slide, int64 [N, 2]."""
    xs = np.arange(0, width - size + 1, size, dtype=np.int64)
    ys = np.arange(0, height - size + 1, size, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def _order(coords: np.ndarray, size: int, coarsest: int) -> np.ndarray:
    """Sort by coarsest ancestor (row-major), then row-major inside it."""
    if len(coords) == 0:
        return coords.reshape(0, 2)
    x, y = coords[:, 0], coords[:, 1]
    order = np.lexsort((x, y, x // coarsest, y // coarsest))
    return np.ascontiguousarray(coords[order])


def _parent_rows(fine: np.ndarray, coarse: np.ndarray, coarse_size: int) -> np.ndarray:
    """Row in ``coarse`` of the tile containing each ``fine`` tile, int64 [N]; DataError when one has none."""
    if len(fine) == 0:
        return np.zeros(0, np.int64)
    if len(coarse) == 0:
        raise DataError(f"{len(fine)} tiles but no coarser tile to contain them")
    cells = coarse // coarse_size
    fine_cells = fine // coarse_size
    shape = (max(cells[:, 1].max(), fine_cells[:, 1].max()) + 1, max(cells[:, 0].max(), fine_cells[:, 0].max()) + 1)
    lookup = np.full(shape, -1, np.int64)
    lookup[cells[:, 1], cells[:, 0]] = np.arange(len(coarse))
    rows = lookup[fine_cells[:, 1], fine_cells[:, 0]]
    if (rows < 0).any():
        x, y = fine[int(np.flatnonzero(rows < 0)[0])]
        raise DataError(f"the tile at level-0 ({x}, {y}) lies in no coarser tile of {coarse_size} px")
    return rows


def grid_from_coords(coords: Mapping[Magnification, np.ndarray], base_mag: float) -> TileGrid:
    """A TileGrid from given tile corners per magnification (rows kept in the given order); the parent
    links come from the geometry (DataError when a tile lies in no coarser tile)."""
    coords = MagDict(coords)
    mags = tuple(sorted(coords, reverse=True))
    sizes = MagDict({m: m.level0_size(base_mag) for m in mags})
    arrays = MagDict({m: np.asarray(coords[m], np.int64).reshape(-1, 2) for m in mags})
    parents = {f: {c: _parent_rows(arrays[f], arrays[c], sizes[c]) for c in mags[i + 1 :]}
               for i, f in enumerate(mags)}
    return TileGrid(mags=mags, coords=arrays, parents=parents, patch_size_level0=sizes)


def make_grid(slide, mags: Sequence[Magnification], tissue: TissueParams = TissueParams()) -> TileGrid:
    """Tile grid of an open :class:`zoomfeat.slides.Slide` at ``mags`` (any order; stored finest first).

    A slide smaller than one finest tile gives an empty grid and a warning; a slide without tissue is a
    :class:`SlideError`.
    """
    info = slide.info
    mags = tuple(sorted({parse_mag(m) for m in mags}, reverse=True))
    sizes = patch_sizes_level0(info.base_magnification, mags, str(info.path))
    fine = sizes[mags[0]]
    mask = tissue_mask(slide, tissue)  # also proves the pixels are readable
    if info.width < fine or info.height < fine:
        warnings.warn(f"{info.path}: {info.width}x{info.height} px is smaller than one {mag_name(mags[0])} tile "
                      f"({fine} px): empty grid", stacklevel=2)
        return grid_from_mask(info.width, info.height, info.base_magnification, mags, None, tissue.min_tissue,
                              str(info.path))
    grid = grid_from_mask(info.width, info.height, info.base_magnification, mags, mask, tissue.min_tissue,
                          str(info.path))
    if len(grid) == 0:
        raise SlideError(f"{info.path}: no tissue found (no {mag_name(mags[0])} tile reaches --min-tissue "
                         f"{tissue.min_tissue:g}): lower --min-tissue or --saturation-threshold, or exclude the slide")
    return grid


def restrict_grid(grid: TileGrid, mags: Sequence[Magnification], source) -> TileGrid:
    """The part of a stored tile grid at the magnifications ``mags`` (parents kept among them)."""
    wanted = [Magnification(m) for m in mags]
    missing = [m for m in wanted if m not in grid.coords]
    if missing:
        raise DataError(f"tile store {source} has no {missing[0]} tiles: re-run `zoomfeat tile` with "
                        f"--mags {','.join(map(str, wanted))} or drop --tiles")
    kept = tuple(m for m in grid.mags if m in wanted)
    parents = {m: {p: a for p, a in grid.parents.get(m, {}).items() if p in wanted} for m in wanted}
    return TileGrid(mags=kept, coords={m: grid.coords[m] for m in wanted}, parents=parents,
                    patch_size_level0={m: grid.patch_size_level0[m] for m in wanted})
