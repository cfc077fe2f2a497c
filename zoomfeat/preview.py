"""PNG preview of a slide's tissue mask and tile grid: thumbnail, mask tinted green, tile outlines."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zoomfeat.tissue import TissueMask
from zoomfeat.tiling import TileGrid

OUTLINE_COLORS = ((20, 90, 220), (230, 120, 0), (200, 0, 120), (0, 150, 150))  # finest first


def save_preview(path: str | Path, thumbnail: np.ndarray, mask: TissueMask | None, grid: TileGrid,
                 width_level0: int) -> Path:
    """Write ``path`` (PNG): ``thumbnail`` uint8 [h, w, 3] with the mask and the tile outlines of every mag."""
    from PIL import Image, ImageDraw

    image = thumbnail.astype(np.float32)
    if mask is not None:
        tissue = np.asarray(Image.fromarray(mask.mask).resize(image.shape[1::-1], Image.Resampling.NEAREST))
        image[tissue] = image[tissue] * 0.7 + np.array([0, 200, 0], np.float32) * 0.3
    canvas = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    scale = thumbnail.shape[1] / width_level0
    for i, name in enumerate(reversed(grid.names)):  # coarsest first, finest drawn on top
        color = OUTLINE_COLORS[(len(grid.names) - 1 - i) % len(OUTLINE_COLORS)]
        size = grid.patch_size_level0[name] * scale
        for x, y in grid.coords[name] * scale:
            draw.rectangle([x, y, x + size - 1, y + size - 1], outline=color)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
