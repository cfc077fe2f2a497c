"""Image folders for the metrics: listing, reading (PNG/JPEG/TIFF -> uint8 RGB), pairing by name, crops, downsampling.

Images are read one at a time (a folder of large images is never all in memory: the set metrics stream features).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from zoomfeat.errors import DataError
from zoomfeat.log import warn
from zoomfeat.plain_images import read_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def list_images(folder: str | Path, what: str = "image folder") -> list[Path]:
    """Image files directly in ``folder`` (sorted by name); DataError when missing or empty."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} {folder} does not exist: pass a folder of PNG/JPEG/TIFF images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{what} {folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return files


def read_image(path: str | Path) -> np.ndarray:
    """uint8 RGB [H, W, 3] of a PNG/JPEG/TIFF file through the one image reader
    (:func:`zoomfeat.plain_images.read_rgb`: every mode at its true range, or one line naming the mode)."""
    return read_rgb(path)


def iter_images(paths: list[Path]) -> Iterator[np.ndarray]:
    for path in paths:
        yield read_image(path)


def pair_images(real: list[Path], fake: list[Path]) -> list[tuple[Path, Path]]:
    """(real, fake) pairs matched by file stem; DataError when none match, a warning for unmatched files."""
    by_stem = {p.stem: p for p in real}
    pairs = [(by_stem[f.stem], f) for f in fake if f.stem in by_stem]
    if not pairs:
        raise DataError(f"no file name is shared by the real ({real[0].parent}) and generated ({fake[0].parent}) "
                        f"folders: paired metrics match images by name (without extension)")
    unmatched = len(real) + len(fake) - 2 * len(pairs)
    if unmatched:
        warn(f"{unmatched} images without a same-named partner are ignored by the paired metrics")
    return pairs


def crops(image: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Non-overlapping ``size`` x ``size`` crops, row-major; the image sides must be multiples of ``size``."""
    h, w = image.shape[:2]
    if h % size or w % size:
        raise DataError(f"a {w}x{h} image cannot be cut into {size}-px crops: its sides must be multiples of {size}")
    for y in range(0, h, size):
        for x in range(0, w, size):
            yield image[y:y + size, x:x + size]


def downsample(image: np.ndarray, size: int) -> np.ndarray:
    """Square image resized to ``size`` x ``size`` with PIL's antialiased bicubic filter (as clean-fid resizes)."""
    from PIL import Image

    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
