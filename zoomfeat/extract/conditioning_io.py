"""The conditioner's 20x embeddings, written as baseline feature files and read back with ``--conditioning``.

A ZoomLDM run embeds every 20x tile under its patches once; those embeddings are saved in
``<conditioning_out>/<slide_id>.h5`` (default ``<out>/../<conditioner>``, e.g. ``features/uni`` beside
``features/zoomldm``), a normal feature file (``extractor`` = the conditioner's name) with:

* group ``20x``: the kept 20x tiles of the run's grid (the same tiles as the ZoomLDM 20x features; empty when
  20x was not requested) -- i.e. the UNI baseline features of those tiles, usable by MIL as they are;
* group ``conditioning_extra_20x`` (``coords`` int64 [M, 2], ``features`` float32 [M, C]): every other 20x tile
  under a requested patch (background tiles under coarse patches). Its name is not a magnification, so
  ``store.read_grid`` and ``verify`` ignore it.

``--conditioning DIR`` reads both groups back; a tile missing from them is a :class:`DataError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from zoomfeat.conditioning import ConditioningGrids, tile_size_level0
from zoomfeat.errors import DataError
from zoomfeat.mags import CONDITIONING_MAG, Magnification
from zoomfeat.store import FeatureFile, TileStoreWriter, h5_path, is_complete, settings_diff
from zoomfeat.tiling import TileGrid

EXTRA_GROUP = "conditioning_extra_20x"
CHUNK = 4096  # rows written per slice


def _split(kept: np.ndarray, table_coords: np.ndarray) -> np.ndarray:
    """Boolean mask over ``table_coords`` of the tiles NOT in ``kept``."""
    kept_set = {(int(x), int(y)) for x, y in kept}
    return np.array([(int(x), int(y)) not in kept_set for x, y in table_coords], dtype=bool)


def write_conditioning(path: Path, info, grid: TileGrid, cond: ConditioningGrids, config: dict) -> Path:
    """Write the conditioning embeddings of one slide (atomic); returns the final path."""
    tile = CONDITIONING_MAG
    kept = np.asarray(grid.coords.get(tile, np.zeros((0, 2), np.int64)), np.int64).reshape(-1, 2)
    grid20 = TileGrid(mags=(tile,), coords={tile: kept}, parents={tile: {}},
                      patch_size_level0={tile: tile_size_level0(tile, info.base_magnification)})
    extra = _split(kept, cond.table.coords)
    with TileStoreWriter(path, info, grid20, extractor=config["encoder"], extractor_config=config,
                         feature_dim=cond.dim) as writer:
        for start in range(0, len(kept), CHUNK):
            writer.write_features(tile, start, cond.embeddings_20x(kept[start : start + CHUNK]))
        writer.write_extra_group(EXTRA_GROUP, cond.table.coords[extra], cond.table.embeddings[extra],
                                 "20x tiles under requested patches that are not rows of the 20x group")
        return writer.commit()


def load_table(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 20x tiles of a conditioning file: (coords int64 [U, 2], embeddings float32 [U, C])."""
    with FeatureFile(path) as f:
        if CONDITIONING_MAG not in f.mags:
            raise DataError(f"{path} has no 20x group: give --conditioning a folder written by `zoomfeat extract`")
        coords, feats = [f.coords(CONDITIONING_MAG)], [f.features(CONDITIONING_MAG)]
        extra = f.extra(EXTRA_GROUP)
    if extra is not None:
        coords.append(extra[0])
        feats.append(extra[1])
    return np.concatenate(coords).astype(np.int64), np.concatenate(feats).astype(np.float32)


def read_conditioning(folder: Path, info, coords_by_mag: Mapping[Magnification, np.ndarray], dim: int) -> ConditioningGrids:
    """ConditioningGrids of one slide from ``<folder>/<slide_id>.h5``; DataError when missing or incompatible."""
    path = h5_path(folder, info.slide_id)
    if not is_complete(path):
        raise DataError(f"no complete conditioning file {path}: drop --conditioning to compute the embeddings")
    coords, embeddings = load_table(path)
    if embeddings.shape[1] != dim:
        raise DataError(f"{path} holds {embeddings.shape[1]}-d embeddings but the ZoomLDM Summarizer takes "
                        f"{dim}-d: use the conditioner the checkpoint was trained with")
    return ConditioningGrids.from_embeddings(coords_by_mag, coords, embeddings,
                                             base_mag=info.base_magnification, source=str(path))


def is_reusable(path: Path | None, slide_path: Path, config: dict | None) -> bool:
    """True when ``path`` is a complete conditioning file of this slide made with the same conditioner."""
    if path is None or config is None or not is_complete(path, slide_path):
        return False
    with FeatureFile(path) as f:
        return not settings_diff(f.extractor_config or {}, config)
