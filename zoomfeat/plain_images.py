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

from zoomfeat.errors import DataError, one_line

PLAIN_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_LEVEL_FACTORS = (1, 4, 16, 64)  # an in-memory pyramid is built lazily for the coarse factors
MAX_PIXELS = 1 << 31  # refuse images whose decoded RGB would not fit a sane memory budget (2 Gpx)


class PlainImageError(DataError):
    """The file is not a readable plain image (``Slide`` wraps it into a SlideError naming the slide)."""


# ---- the one conversion of image pixels to uint8 RGB (every command that reads an image file comes here) ----
#
# True ranges: 8-bit values as they are; 16-bit values (PIL modes I;16, I;16B, I;16L, 16-bit TIFF samples)
# v -> round(v * 255 / 65535); PIL mode I (the 32-bit container PIL uses for 16-bit grey) must hold 0-65535 and
# is scaled like 16-bit; floating point (mode F, float TIFFs) must lie in [0, 1] and becomes round(v * 255);
# 1-bit images are 0 / 255; palettes are expanded (with their transparency); CMYK becomes
# round((255 - C)(255 - K) / 255) per channel (Pillow's own formula); alpha is composited on white:
# round((c * a + 255 * (255 - a)) / 255) (premultiplied alpha, modes La / RGBa: round(c + 255 - a)).
# Anything else (LAB, HSV, signed or 32-bit unsigned samples, more than 4 channels) is refused in one line
# naming the mode and the file.

def _refuse(where: str, what: str) -> PlainImageError:
    return PlainImageError(f"{where}: {what} is not supported: convert the image to 8- or 16-bit RGB or grey "
                           "(PNG/TIFF)")


def _to_uint8(a: np.ndarray, where: str, mode: str | None = None) -> np.ndarray:
    """Samples scaled from their true range to uint8 (see the table above)."""
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16 or a.dtype.newbyteorder("=") == np.dtype(np.uint16):
        return np.rint(a.astype(np.int64) * 255 / 65535).astype(np.uint8)
    label = f"PIL mode {mode!r}" if mode else f"{a.dtype} samples"
    if np.issubdtype(a.dtype, np.signedinteger) or (mode == "I"):
        low, high = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if low < 0 or high > 65535:
            raise _refuse(where, f"{label} with values {low}..{high} (outside 0..65535)")
        return np.rint(a.astype(np.int64) * 255 / 65535).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if a.size and not np.isfinite(a).all():
            raise _refuse(where, f"{label} with non-finite values")
        low, high = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise _refuse(where, f"{label} with values {low:g}..{high:g} (outside 0..1)")
        return np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    raise _refuse(where, label)


def _on_white(colour: np.ndarray, alpha: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """uint8 colour [H, W, C] with uint8 alpha [H, W] composited on white (integer numerators: no ties)."""
    c, a = colour.astype(np.int64), alpha.astype(np.int64)[..., None]
    if premultiplied:
        return np.clip(c + 255 - a, 0, 255).astype(np.uint8)
    return np.rint((c * a + 255 * (255 - a)) / 255).astype(np.uint8)


def _cmyk(a: np.ndarray) -> np.ndarray:
    c, k = a[..., :3].astype(np.int64), a[..., 3:4].astype(np.int64)
    return np.rint((255 - c) * (255 - k) / 255).astype(np.uint8)


def _grey_or_colour(a: np.ndarray, where: str, label: str) -> np.ndarray:
    """uint8 [H, W, 3] from uint8 grey [H, W], grey+alpha, RGB or RGBA samples."""
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 2:
        return np.repeat(_on_white(a[..., :1], a[..., 1]), 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 3:
        return a
    if a.ndim == 3 and a.shape[2] == 4:
        return _on_white(a[..., :3], a[..., 3])
    raise _refuse(where, f"{label} with pixel layout {list(a.shape)}")


def pixels_to_rgb(array: np.ndarray, where: str = "image", photometric: str = "rgb",
                  colormap: np.ndarray | None = None) -> np.ndarray:
    """uint8 [H, W, 3] from decoded samples (a TIFF page, a numpy array): grey, grey+alpha, RGB, RGBA at 8 or
    16 bits or float in [0, 1]; ``photometric`` is ``"rgb"`` (also grey), ``"miniswhite"`` (inverted grey),
    ``"cmyk"`` or ``"palette"`` (indices into ``colormap`` [3, N] of 16-bit values)."""
    a = np.asarray(array)
    label = f"{a.dtype} samples"
    if photometric == "palette":
        if colormap is None or a.ndim != 2 or not np.issubdtype(a.dtype, np.unsignedinteger):
            raise _refuse(where, "a palette image without a usable colour map")
        table = _to_uint8(np.asarray(colormap).T.astype(np.uint16), where)
        if a.size and int(a.max()) >= len(table):
            raise _refuse(where, f"a palette index {int(a.max())} beyond the {len(table)}-colour map")
        return table[a]
    a = _to_uint8(a, where)
    if photometric == "miniswhite":
        if a.ndim == 3 and a.shape[2] == 2:
            a = np.stack([255 - a[..., 0], a[..., 1]], axis=2)
        else:
            a = 255 - a
    elif photometric == "cmyk":
        if a.ndim != 3 or a.shape[2] not in (4, 5):
            raise _refuse(where, f"CMYK with pixel layout {list(a.shape)}")
        rgb = _cmyk(a)
        return _on_white(rgb, a[..., 4]) if a.shape[2] == 5 else rgb
    elif photometric != "rgb":
        raise _refuse(where, f"photometric {photometric!r}")
    return _grey_or_colour(a, where, label)


def pil_to_rgb(image, where: str = "image") -> np.ndarray:
    """uint8 [H, W, 3] of an open PIL image, mode by mode (see the table above)."""
    mode = image.mode
    if mode in ("1", "L", "LA", "RGB", "RGBA"):
        return _grey_or_colour(_to_uint8(np.asarray(image), where, mode), where, f"PIL mode {mode!r}")
    if mode in ("RGBX",):
        return np.asarray(image)[..., :3]
    if mode in ("La", "RGBa"):
        a = np.asarray(image)
        colour = a[..., :-1] if a.shape[2] == 4 else np.repeat(a[..., :1], 3, axis=2)
        return _on_white(colour, a[..., -1], premultiplied=True)
    if mode in ("P", "PA"):
        expanded = image.convert("RGBA")  # palette colours and the palette's transparency
        return _grey_or_colour(np.asarray(expanded), where, f"PIL mode {mode!r}")
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        return _grey_or_colour(_to_uint8(np.asarray(image), where, mode), where, f"PIL mode {mode!r}")
    if mode == "CMYK":
        return _cmyk(np.asarray(image))
    if mode == "YCbCr":
        return np.asarray(image.convert("RGB"))
    raise _refuse(where, f"PIL mode {mode!r}")


def _tiff_page(path: Path):
    """(pixels, photometric, colormap) of the first page of a TIFF, pixels memory-mapped when uncompressed."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        shape, compression = page.shape, int(page.compression)
        photo = {0: "miniswhite", 1: "rgb", 2: "rgb", 3: "palette", 5: "cmyk", 6: "rgb"}.get(int(page.photometric))
        if photo is None:
            raise _refuse(str(path), f"TIFF photometric {page.photometric.name}")
        colormap = page.colormap
        separate = int(page.planarconfig) == 2 and len(shape) == 3
        pixels = None
        if compression == 1 and not separate:  # uncompressed: map it, read rows on demand
            try:
                pixels = tifffile.memmap(path, page=0, mode="r")
            except ValueError:
                pixels = None  # not contiguous on disk: decode it
        if pixels is None:
            pixels = page.asarray()
            if separate:
                pixels = np.moveaxis(pixels, 0, -1)
    return pixels, photo, colormap


def read_rgb(path: str | Path) -> np.ndarray:
    """uint8 [H, W, 3] of a PNG, JPEG or TIFF file: the one image reader of ``invert``, ``superres``,
    ``gen-metrics`` and the plain-image slides; a file that cannot be read, or a mode with no faithful RGB
    conversion, is a :class:`PlainImageError` (a DataError) naming the file."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            pixels, photo, colormap = _tiff_page(path)
            return np.ascontiguousarray(pixels_to_rgb(np.asarray(pixels), str(path), photo, colormap))
        except PlainImageError:
            raise
        except (tifffile.TiffFileError, ValueError, OSError, KeyError, IndexError) as exc:
            raise PlainImageError(f"{path}: not a readable TIFF ({one_line(exc, 100)}): "
                                  "pass a PNG, JPEG or TIFF file") from exc
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            _check_size(image.width, image.height, path)
            return np.ascontiguousarray(pil_to_rgb(image, str(path)))
    except PlainImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise PlainImageError(f"{path}: not a readable image ({one_line(exc, 100)}): "
                              "pass a PNG, JPEG or TIFF file") from exc


def _check_size(width: int, height: int, path: Path) -> None:
    if width * height > MAX_PIXELS:
        raise PlainImageError(f"{path}: {width}x{height} px is too large for a plain image; convert it to a "
                              "pyramidal TIFF")


class PlainImage:
    """OpenSlide-like read access to one plain image (level 0 = the image; coarser levels made on demand)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            try:
                self._pixels, photo, colormap = _tiff_page(self.path)
            except PlainImageError:
                raise
            except (tifffile.TiffFileError, ValueError, OSError, KeyError, IndexError) as exc:
                raise PlainImageError(f"not a readable TIFF ({one_line(exc, 100)})") from exc
            if np.asarray(self._pixels[:1, :1]).dtype not in (np.uint8, np.uint16, np.bool_):
                # float or 32-bit samples: their range is checked on the whole image now, not per read
                self._pixels = pixels_to_rgb(np.asarray(self._pixels), str(self.path), photo, colormap)
                self._to_rgb = lambda block: block
            else:
                self._to_rgb = lambda block: pixels_to_rgb(block, str(self.path), photo, colormap)
                self._to_rgb(np.asarray(self._pixels[:1, :1]))  # the layout is refused at open, not per read
        else:
            self._pixels = read_rgb(self.path)
            self._to_rgb = lambda block: block
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
            full = Image.fromarray(self._to_rgb(np.asarray(self._pixels)))
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
            block = np.asarray(pixels[y0:y1, x0:x1])
            block = block if level else self._to_rgb(block)
            out[y0 - y : y1 - y, x0 - x : x1 - x, :3] = block
            out[y0 - y : y1 - y, x0 - x : x1 - x, 3] = 255
        return Image.fromarray(out, "RGBA")

    def get_thumbnail(self, size: tuple[int, int]):
        from PIL import Image

        level = self.level_count - 1
        pixels = np.asarray(self._level(level))
        image = Image.fromarray(pixels if level else self._to_rgb(pixels))
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
