"""Saving validation samples: decoded images in [-1, 1] -> one PNG grid per magnification."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def save_sample_grid(images: torch.Tensor, path: str | Path) -> Path:
    """Write ``images`` (float [n, 3, H, W] in [-1, 1]) as a near-square PNG grid; returns the path."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = max(1, math.ceil(math.sqrt(images.shape[0])))
    save_image((images.float() + 1.0) / 2.0, path, nrow=nrow, padding=2, pad_value=1.0)
    return path
