"""Writing generated images: PNG files (with text chunks when given: magnification, mpp, seed, model hash), a
contact sheet, and a tiled pyramidal TIFF (OpenSlide-readable, :mod:`zoomfeat.generate.pyramid`) for images
larger than 4096 px a side or when asked for. Every file goes through :func:`zoomfeat.store.atomic_write`.
Images are uint8 [H, W, 3] numpy arrays (what :func:`zoomfeat.generate.decode.to_uint8` returns per item).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zoomfeat.errors import ConfigError, DataError
from zoomfeat.plain_images import read_rgb
from zoomfeat.store import atomic_write

PNG_MAX_SIDE = 4096  # larger images are written as pyramidal TIFF
FORMATS = ("auto", "png", "tiff")  # auto: PNG up to PNG_MAX_SIDE px a side, else TIFF


def _check(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"an image to write must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return image


def save_png(path: str | Path, image: np.ndarray, text: dict | None = None) -> Path:
    """Write ``image`` as a PNG at ``path`` (atomic), ``text`` as tEXt chunks (keys and values as strings)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    image = _check(image)
    path = Path(path)
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(str(key), str(value))
    with atomic_write(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
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


def large_suffix(side_px: int, fmt: str = "auto") -> str:
    """``.png`` or ``.tiff``: what :func:`save_large` writes for an image of ``side_px`` px in ``fmt``."""
    if fmt not in FORMATS:
        raise ConfigError(f"bad --format {fmt!r}: use one of {', '.join(FORMATS)}")
    return ".tiff" if fmt == "tiff" or (fmt == "auto" and side_px > PNG_MAX_SIDE) else ".png"


def save_large(stem: str | Path, image: np.ndarray, mpp: float = 0.5, magnification: float = 20.0,
               fmt: str = "auto", text: dict | None = None) -> Path:
    """``<stem>.png`` or ``<stem>.tiff`` (:func:`large_suffix`). The TIFF is a tiled JPEG pyramid
    (:func:`zoomfeat.generate.pyramid.write_pyramid_array`) with mpp and magnification (default 20x at 0.5
    um/px) written in, which OpenSlide and zoomfeat open; ``text`` goes into its description, and into a PNG's
    text chunks beside ``magnification`` and ``mpp``."""
    image = _check(image)
    stem = Path(stem)
    if large_suffix(max(image.shape[:2]), fmt) == ".png":
        return save_png(stem.with_suffix(".png"), image,
                        {"magnification": f"{magnification:g}", "mpp": f"{mpp:g}", **(text or {})})
    from zoomfeat.generate.pyramid import write_pyramid_array  # tifffile

    return write_pyramid_array(stem.with_suffix(".tiff"), image, mpp=mpp, magnification=magnification,
                               metadata=dict(text or {}))
