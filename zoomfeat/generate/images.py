"""Writing generated images: PNG files, a contact sheet, and a tiled pyramidal TIFF (OpenSlide-readable)
for images larger than 4096 px a side. Every file goes through :func:`zoomfeat.store.atomic_write`.
Images are uint8 [H, W, 3] numpy arrays (what :func:`zoomfeat.generate.decode.to_uint8` returns per item).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zoomfeat.errors import DataError
from zoomfeat.plain_images import read_rgb
from zoomfeat.store import atomic_write

PNG_MAX_SIDE = 4096  # larger images are written as pyramidal TIFF


def _check(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"an image to write must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return image


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write ``image`` as a PNG at ``path`` (atomic)."""
    from PIL import Image

    image = _check(image)
    path = Path(path)
    with atomic_write(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path


def read_png(path: str | Path) -> np.ndarray:
    """uint8 [H, W, 3] of a PNG written by :func:`save_png` (read by :func:`zoomfeat.plain_images.read_rgb`)."""
    return read_rgb(path)


def contact_sheet(images: Sequence[np.ndarray], columns: int | None = None, pad: int = 2,
                  pad_value: int = 255) -> np.ndarray:
    """All ``images`` (equal sizes) on one near-square grid, row-major, separated by ``pad`` px."""
    if not images:
        raise DataError("no images for a contact sheet")
    h, w = _check(images[0]).shape[:2]
    cols = columns or max(1, math.ceil(math.sqrt(len(images))))
    rows = math.ceil(len(images) / cols)
    sheet = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3), pad_value, np.uint8)
    for k, img in enumerate(images):
        if _check(img).shape[:2] != (h, w):
            raise DataError(f"contact sheet images differ in size: {img.shape[:2]} vs {(h, w)}")
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        sheet[y:y + h, x:x + w] = img
    return sheet


def save_large(stem: str | Path, image: np.ndarray, mpp: float = 0.5, magnification: float = 20.0) -> Path:
    """``<stem>.png`` when both sides are at most 4096 px, else ``<stem>.tiff``: a tiled JPEG pyramid in the
    Aperio layout with ``AppMag`` / ``MPP`` (default 20x at 0.5 um/px), which OpenSlide (and zoomfeat) opens."""
    image = _check(image)
    stem = Path(stem)
    if max(image.shape[:2]) <= PNG_MAX_SIDE:
        return save_png(stem.with_suffix(".png"), image)
    from zoomfeat.synthetic import write_pyramid

    path = stem.with_suffix(".tiff")
    with atomic_write(path) as tmp:
        write_pyramid(tmp, image, fmt="aperio", mpp=mpp, app_mag=magnification, quality=90)
    return path
