"""Patch pixels of one slide's tiles at one magnification, for batched DataLoader reading.

Each worker opens its own OpenSlide handle lazily (handles are not shared across processes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoomfeat.mags import Magnification
from zoomfeat.slides import Slide


class TilePatchDataset(Dataset):
    """Item i = (i, uint8 [3, size, size]) of the tile at ``coords_level0[i]`` read at magnification ``mag``."""

    def __init__(self, slide_path: str | Path, coords_level0: np.ndarray, mag: Magnification, size: int = 256,
                 base_mag: float | None = None, mpp: float | None = None):
        self.slide_path = Path(slide_path)
        self.coords_level0 = np.asarray(coords_level0, dtype=np.int64).reshape(-1, 2)
        self.mag = Magnification(mag)
        self.size = int(size)
        self.base_mag = base_mag
        self.mpp = mpp
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return len(self.coords_level0)

    def _open(self) -> Slide:
        if self._slide is None:
            self._slide = Slide(self.slide_path, base_mag=self.base_mag, mpp=self.mpp)
        return self._slide

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        x, y = self.coords_level0[i]
        patch = self._open().read_patch(int(x), int(y), self.mag, self.size)
        return int(i), torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1)))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_slide"] = None  # each worker opens its own handle
        return state

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def patch_loader(dataset: TilePatchDataset, batch_size: int, workers: int) -> DataLoader:
    """In-order batches (row indices LongTensor [B], uint8 [B, 3, size, size]) read by ``workers`` processes."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      persistent_workers=False, pin_memory=False,
                      prefetch_factor=4 if workers > 0 else None)
