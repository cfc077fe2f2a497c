"""Reproducible diffusion noise: one generator per patch, seeded from (slide_id, magnification, x, y).

The noise of a patch depends only on where it is, never on batch size, order, worker count or device, so
two runs (or a resumed run) give bitwise the same latent at timestep t.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from zoomfeat.mags import Magnification


def patch_seed(slide_id: str, mag: Magnification, x: int, y: int) -> int:
    """63-bit seed from sha256 of ``"<slide_id>|<mag name>|<x>|<y>"`` (level-0 px; the name as in ``"5x"``)."""
    digest = hashlib.sha256(f"{slide_id}|{Magnification(mag).name}|{int(x)}|{int(y)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_noise(slide_id: str, mag: Magnification, coords_level0: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise, float32 [N, *shape] on the CPU, row n drawn from ``patch_seed(..., *coords[n])``."""
    coords = np.asarray(coords_level0, dtype=np.int64).reshape(-1, 2)
    out = torch.empty((len(coords), *shape), dtype=torch.float32)
    generator = torch.Generator()
    for n, (x, y) in enumerate(coords):
        generator.manual_seed(patch_seed(slide_id, mag, x, y))
        out[n] = torch.randn(shape, generator=generator)
    return out
