"""Conditioning grids: the 20x-tile embeddings (UNI, or a stand-in encoder) under every requested patch.

A patch at magnification ``m`` covers ``g x g`` 20x tiles (``g = grid_width(m)``: 1 at 20x, 4 at 5x,
128 at 0.15625x). ZoomLDM is conditioned on the grid of their embeddings. :class:`ConditioningGrids` embeds,
for one slide, the union of the 20x tiles under every requested patch exactly once (tiles shared by several
patches or magnifications are deduplicated; background tiles are included, because the grid needs them), and
keeps one float32 row per distinct tile. Grids are gathered from that table on demand, a batch at a time, so
memory does not grow with the number of patches times the grid area.

Read once at 20x: :class:`ConditioningStream` embeds ``first`` (the 20x patches of the run, in their row order)
first and yields each batch (positions, pixels, embeddings) to the consumer, in batches of exactly the rows
the 20x feature pass would read, so the extractor computes the 20x features from the same pixels instead of
reading every tile a second time; :meth:`ConditioningStream.finish` then embeds the other tiles of the table
and returns the :class:`ConditioningGrids`. No callback runs back into the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoomfeat.errors import DataError
from zoomfeat.mags import CONDITIONING_MAG, PATCH_SIZE, MagDict, Magnification


def tile_size_level0(mag: Magnification, base_mag: float) -> int:
    """Side, in level-0 px, of a 256-px patch at ``mag`` on a slide scanned at ``base_mag``."""
    return int(round(PATCH_SIZE * base_mag / Magnification(mag)))


def lattice_20x(coords_level0: np.ndarray, mag: Magnification, base_mag: float) -> np.ndarray:
    """Level-0 top-left corners of the 20x tiles under each patch. int64 [N, g, g, 2], row-major.

    ``coords_level0`` is int64 [N, 2] of (x, y) patch corners at ``mag``; entry ``[n, i, j]`` is the tile in
    row ``i`` (y) and column ``j`` (x) of patch ``n``'s grid, ``g = grid_width(mag)``.
    """
    coords = np.asarray(coords_level0, dtype=np.int64).reshape(-1, 2)
    g = Magnification(mag).grid_width
    step = tile_size_level0(CONDITIONING_MAG, base_mag)
    offsets = np.arange(g, dtype=np.int64) * step
    out = np.empty((len(coords), g, g, 2), dtype=np.int64)
    out[..., 0] = coords[:, None, None, 0] + offsets[None, None, :]
    out[..., 1] = coords[:, None, None, 1] + offsets[None, :, None]
    return out


def _keys(coords: np.ndarray) -> np.ndarray:
    """One sortable int64 key per (x, y) pair (coordinates are below 2**31 px)."""
    coords = np.asarray(coords, dtype=np.int64)
    return (coords[..., 1] << np.int64(32)) | coords[..., 0]


def pool_grid(grids: np.ndarray, pool_to: int) -> np.ndarray:
    """Average-pool [n, C, g, g] grids to at most ``pool_to`` x ``pool_to`` (g a multiple of it when larger)."""
    g = grids.shape[-1]
    if g <= pool_to:
        return grids
    f = g // pool_to
    n, c = grids.shape[:2]
    return grids.reshape(n, c, pool_to, f, pool_to, f).mean(axis=(3, 5), dtype=np.float32)


class EmbeddingTable:
    """Distinct 20x tiles of one slide and one embedding row per tile.

    ``coords``: int64 [U, 2] sorted by (y, x); ``embeddings``: float32 [U, C] (filled by the owner).
    """

    def __init__(self, coords: np.ndarray, embeddings: np.ndarray | None = None, dim: int | None = None):
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        keys = _keys(coords)
        order = np.argsort(keys, kind="stable")
        self.coords = coords[order]
        self._keys = keys[order]
        if embeddings is not None:
            self.embeddings = np.asarray(embeddings, dtype=np.float32)[order]
        else:
            self.embeddings = np.zeros((len(coords), int(dim or 0)), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.coords)

    def rows(self, coords: np.ndarray, source: str = "conditioning table") -> np.ndarray:
        """Row index of each (x, y) in ``coords`` ([..., 2]); DataError when a tile is missing."""
        keys = _keys(coords)
        if len(self._keys) == 0:
            idx = np.zeros(keys.shape, dtype=np.int64)
            missing = np.ones(keys.shape, dtype=bool)
        else:
            idx = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
            missing = self._keys[idx] != keys
        if np.any(missing):
            x, y = np.asarray(coords).reshape(-1, 2)[np.flatnonzero(missing.reshape(-1))[0]]
            raise DataError(
                f"{source} has no embedding for the 20x tile at level-0 ({x}, {y}): "
                "recompute the conditioning (drop --conditioning) or point it at the folder written with these tiles"
            )
        return idx


@dataclass(frozen=True)
class EmbeddedBatch:
    """One batch of 20x tiles: ``positions`` int64 [B] into the rows requested, ``images`` uint8 tensor
    [B, 3, 256, 256], ``embeddings`` float32 [B, C]."""

    positions: np.ndarray
    images: object
    embeddings: np.ndarray


class _TileReader:
    """Reads 20x tiles of one slide with DataLoader workers and embeds them, batch by batch."""

    def __init__(self, slide_path, encoder, batch_size, workers, device, slide_kwargs, autocast, progress):
        import contextlib

        self.slide_path, self.encoder, self.device = slide_path, encoder, device
        self.batch_size, self.workers, self.slide_kwargs = batch_size, workers, slide_kwargs
        self.autocast = autocast or contextlib.nullcontext
        self.progress = progress

    def embed_rows(self, table: EmbeddingTable, rows: np.ndarray) -> Iterator[EmbeddedBatch]:
        """Embed the table rows ``rows`` (in that order) into ``table.embeddings``, yielding each batch."""
        import torch

        from zoomfeat.patches import TilePatchDataset, patch_loader

        if len(rows) == 0:
            return
        dataset = TilePatchDataset(self.slide_path, table.coords[rows], CONDITIONING_MAG, size=PATCH_SIZE,
                                   **self.slide_kwargs)
        try:
            for positions, images in patch_loader(dataset, self.batch_size, self.workers):
                positions = positions.numpy()
                with torch.inference_mode(), self.autocast():
                    emb = self.encoder(self.encoder.preprocess(images.to(self.device, non_blocking=True)))
                emb = emb.float().cpu().numpy()
                table.embeddings[rows[positions]] = emb
                if self.progress is not None:
                    self.progress(len(positions))
                yield EmbeddedBatch(positions, images, emb)
        finally:
            dataset.close()


class ConditioningStream:
    """The conditioning of one slide computed as a stream: iterate to get the batches of ``first`` (20x tiles,
    all under requested patches) as they are embedded, then :meth:`finish` for the grids.

    Arguments as :class:`ConditioningGrids` (``encoder`` required). Iterating is optional: :meth:`finish`
    embeds whatever has not been embedded yet.
    """

    def __init__(self, slide_path, coords_by_mag: Mapping[Magnification, np.ndarray], encoder, batch_size: int = 32,
                 workers: int = 0, device="cpu", *, base_mag: float, slide_kwargs: Mapping | None = None,
                 autocast: Callable | None = None, progress: Callable[[int], None] | None = None,
                 first: np.ndarray | None = None):
        self.coords_by_mag, self.base_mag = MagDict(coords_by_mag), float(base_mag)
        self.lattices = MagDict({mag: lattice_20x(c, mag, self.base_mag) for mag, c in self.coords_by_mag.items()})
        union = np.concatenate([v.reshape(-1, 2) for v in self.lattices.values()] + [np.zeros((0, 2), np.int64)])
        self.table = EmbeddingTable(np.unique(union, axis=0), dim=encoder.spec.dim)
        self._reader = _TileReader(slide_path, encoder, batch_size, workers, device, dict(slide_kwargs or {}),
                                   autocast, progress)
        self._first_rows = (self.table.rows(np.asarray(first, np.int64).reshape(-1, 2))
                            if first is not None and len(first) else np.zeros(0, np.int64))
        self._first_done = False

    def __iter__(self) -> Iterator[EmbeddedBatch]:
        """Batches of ``first``, in its order (positions index into ``first``)."""
        if self._first_done:
            return
        yield from self._reader.embed_rows(self.table, self._first_rows)
        self._first_done = True

    def finish(self) -> ConditioningGrids:
        """Embed the remaining tiles and return the grids of every requested patch."""
        if not self._first_done:
            for _ in self:
                pass
        rest = np.ones(len(self.table), dtype=bool)
        rest[self._first_rows] = False
        for _ in self._reader.embed_rows(self.table, np.flatnonzero(rest)):
            pass
        return ConditioningGrids(None, self.coords_by_mag, base_mag=self.base_mag, table=self.table)


class ConditioningGrids:
    """Raw conditioning grids of one slide's requested patches, from one embedding per distinct 20x tile.

    ``coords_by_mag`` maps a :class:`Magnification` to int64 [N, 2] level-0 patch corners.
    Either give ``encoder`` (the 20x tiles are read with :class:`zoomfeat.patches.TilePatchDataset` and embedded
    in batches) or build from precomputed embeddings with :meth:`from_embeddings`. ``base_mag`` is the slide's
    base magnification (it fixes the 20x tile size in level-0 px; read from the slide when None); ``slide_kwargs`` (``base_mag``/``mpp``
    overrides) go to the patch dataset; ``autocast`` is a context-manager factory wrapped around the encoder.
    To consume the 20x batches as they are embedded, use :class:`ConditioningStream` instead.
    """

    def __init__(
        self,
        slide_path: str | Path | None,
        coords_by_mag: Mapping[Magnification, np.ndarray],
        encoder=None,
        batch_size: int = 32,
        workers: int = 0,
        device="cpu",
        *,
        base_mag: float | None = None,
        slide_kwargs: Mapping | None = None,
        autocast: Callable | None = None,
        progress: Callable[[int], None] | None = None,
        table: EmbeddingTable | None = None,
    ):
        if base_mag is None:  # read from the slide (honouring --base-mag / --mpp overrides)
            from zoomfeat.slides import Slide

            with Slide(slide_path, **dict(slide_kwargs or {})) as slide:
                base_mag = slide.info.base_magnification
        self.base_mag = float(base_mag)
        self._index = MagDict()
        coords_by_mag = MagDict(coords_by_mag)
        if table is None and encoder is not None:
            table = ConditioningStream(slide_path, coords_by_mag, encoder, batch_size, workers, device,
                                       base_mag=self.base_mag, slide_kwargs=slide_kwargs, autocast=autocast,
                                       progress=progress).finish().table
        lattices = MagDict({mag: lattice_20x(c, mag, self.base_mag) for mag, c in coords_by_mag.items()})
        if table is None:
            union = np.concatenate([v.reshape(-1, 2) for v in lattices.values()] + [np.zeros((0, 2), np.int64)])
            table = EmbeddingTable(np.unique(union, axis=0), dim=0)
        for mag, lat in lattices.items():
            self._index[mag] = table.rows(lat).astype(np.int32)
        self.table = table

    @classmethod
    def from_embeddings(
        cls, coords_by_mag: Mapping[Magnification, np.ndarray], coords_20x: np.ndarray, embeddings: np.ndarray,
        *, base_mag: float, source: str = "conditioning table",
    ) -> ConditioningGrids:
        """Grids from precomputed 20x embeddings (``coords_20x`` int64 [U, 2], ``embeddings`` float32 [U, C])."""
        table = EmbeddingTable(coords_20x, embeddings)
        try:
            return cls(None, coords_by_mag, base_mag=base_mag, table=table)
        except DataError as exc:
            raise DataError(str(exc).replace("conditioning table", source)) from exc

    @property
    def dim(self) -> int:
        """Channels C of one embedding."""
        return int(self.table.embeddings.shape[1])

    def grid(self, mag: Magnification, rows: np.ndarray | None = None, pool_to: int | None = None) -> np.ndarray:
        """Raw grids of the patches ``rows`` (rows of that mag's coords; all when None). float32 [n, C, g, g]."""
        index = self._index[mag]
        if rows is not None:
            index = index[np.asarray(rows)]
        grids = self.table.embeddings[index]  # [n, g, g, C]
        grids = np.ascontiguousarray(grids.transpose(0, 3, 1, 2))
        return pool_grid(grids, pool_to) if pool_to else grids

    def embeddings_20x(self, coords_level0: np.ndarray) -> np.ndarray:
        """Embeddings of the given 20x tiles (int64 [N, 2] corners). float32 [N, C]."""
        return self.table.embeddings[self.table.rows(coords_level0)]
