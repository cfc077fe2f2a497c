"""Plain large images (PNG, JPEG, non-pyramidal TIFF such as BACH's or GeoTIFF tiles) behind the small part of
the OpenSlide API that :class:`zoomfeat.slides.Slide` uses, so ``tile``, ``extract``, ``sample`` and ``superres``
work on them unchanged.

A plain image has no scale metadata zoomfeat trusts, so its scale must be given (``--mpp`` or ``--base-mag``);
``properties`` is empty and :func:`zoomfeat.slides.resolve_scale` refuses it in one line otherwise. Reading is
lazy where the format allows: an uncompressed TIFF is memory-mapped (``tifffile.memmap``), so a region read
touches only its rows; compressed TIFFs, PNG and JPEG are decoded once when opened (their formats do not allow
random access). Pixels outside the image are white, as OpenSlide's transparent pixels become in ``Slide``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from zoomfeat.errors import one_line

PLAIN_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_LEVEL_FACTORS = (1, 4, 16, 64)  # an in-memory pyramid is built lazily for the coarse factors
MAX_PIXELS = 1 << 31  # refuse images whose decoded RGB would not fit a sane memory budget (2 Gpx)


class PlainImageError(Exception):
    """The file is not a readable plain image (wrapped into SlideError by ``Slide``)."""


def _to_rgb(array: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] from grey, grey+alpha, RGB, RGBA or 16-bit arrays (alpha composited on white)."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer):
            a = (a.astype(np.float64) / np.iinfo(a.dtype).max * 255.0).round()
        else:
            a = np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0
        a = a.astype(np.uint8)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] in (2, 4):
        colour, alpha = a[..., :-1].astype(np.float32), a[..., -1:].astype(np.float32) / 255.0
        if colour.shape[2] == 1:
            colour = np.repeat(colour, 3, axis=2)
        return (colour * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    if a.ndim == 3 and a.shape[2] >= 3:
        return a[..., :3]
    raise PlainImageError(f"unsupported pixel layout {a.shape}")


def _open_tiff(path: Path):
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            shape, compression = page.shape, int(page.compression)
        if compression == 1:  # uncompressed: map it, read rows on demand
            try:
                return tifffile.memmap(path, page=0, mode="r"), shape
            except ValueError:
                pass  # not contiguous on disk: decode it
        return tifffile.imread(path, key=0), shape
    except (tifffile.TiffFileError, ValueError, OSError, KeyError) as exc:
        raise PlainImageError(f"not a readable TIFF ({one_line(exc, 100)})") from exc


def _open_pil(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise PlainImageError(f"{image.width}x{image.height} px is too large for a plain image; "
                                      "convert it to a pyramidal TIFF")
            return np.asarray(image.convert("RGBA" if "A" in image.getbands() else "RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise PlainImageError(f"not a readable image ({one_line(exc, 100)})") from exc


class PlainImage:
    """OpenSlide-like read access to one plain image (level 0 = the image; coarser levels made on demand)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix.lower() in (".tif", ".tiff"):
            self._pixels, shape = _open_tiff(self.path)
        else:
            self._pixels = _open_pil(self.path)
            shape = self._pixels.shape
        if len(shape) < 2 or shape[0] < 1 or shape[1] < 1:
            raise PlainImageError(f"image has shape {shape}")
        self.dimensions = (int(shape[1]), int(shape[0]))
        self.properties: dict[str, str] = {"openslide.vendor": "plain-image"}
        self._levels: dict[int, np.ndarray] = {}
        factors = [f for f in _LEVEL_FACTORS if f == 1 or min(self.dimensions) // f >= 64]
        self.level_downsamples = tuple(float(f) for f in factors)
        self.level_dimensions = tuple((max(1, self.dimensions[0] // f), max(1, self.dimensions[1] // f))
                                      for f in factors)
        self.level_count = len(factors)

    def close(self) -> None:
        self._levels.clear()
        self._pixels = None

    def get_best_level_for_downsample(self, downsample: float) -> int:
        best = 0
        for i, factor in enumerate(self.level_downsamples):
            if factor <= downsample + 1e-9:
                best = i
        return best

    def _level(self, level: int) -> np.ndarray:
        if level == 0:
            return self._pixels
        if level not in self._levels:  # box-filtered copy of the whole image, made once
            from PIL import Image

            width, height = self.level_dimensions[level]
            full = Image.fromarray(_to_rgb(np.asarray(self._pixels)))
            self._levels[level] = np.asarray(full.resize((width, height), Image.Resampling.BOX))
        return self._levels[level]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        """RGBA PIL image of ``size`` at ``level`` whose top-left is ``location`` in level-0 px (outside: clear)."""
        from PIL import Image

        factor = self.level_downsamples[level]
        pixels = self._level(level)
        width, height = size
        x = int(math.floor(location[0] / factor))
        y = int(math.floor(location[1] / factor))
        out = np.zeros((height, width, 4), dtype=np.uint8)
        h_img, w_img = pixels.shape[0], pixels.shape[1]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w_img), min(y + height, h_img)
        if x1 > x0 and y1 > y0:
            block = _to_rgb(np.asarray(pixels[y0:y1, x0:x1]))
            out[y0 - y : y1 - y, x0 - x : x1 - x, :3] = block
            out[y0 - y : y1 - y, x0 - x : x1 - x, 3] = 255
        return Image.fromarray(out, "RGBA")

    def get_thumbnail(self, size: tuple[int, int]):
        from PIL import Image

        level = self.level_count - 1
        image = Image.fromarray(_to_rgb(np.asarray(self._level(level))))
        image.thumbnail(size, Image.Resampling.BOX)
        return image


def is_plain_image(path: str | Path) -> bool:
    """True for PNG/JPEG files (always plain) and TIFFs without tiles or pyramid levels."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg"):
        return True
    if suffix not in (".tif", ".tiff"):
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return not page.is_tiled and len(tif.series[0].levels) == 1 and len(tif.pages) <= 2
    except (tifffile.TiffFileError, ValueError, OSError, KeyError, IndexError):
        return False
