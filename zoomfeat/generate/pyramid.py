"""A streamed, tiled, pyramidal TIFF writer for generated slides (tifffile), in the layout OpenSlide opens as a
pyramid.

Layout (checked against OpenSlide 4.0's ``generic-tiff`` reader): every level is a tiled page of the main IFD
chain (level 0 ``NewSubfileType`` 0, the reduced levels 1); OpenSlide ignores SubIFDs, so none are used. Each
page carries its resolution (``XResolution``/``YResolution`` in px per cm, from which OpenSlide reports
``openslide.mpp-x``), and level 0 an ``ImageDescription`` that is one JSON object
``{"format": "zoomfeat-slide", "format_version": 1, "magnification": 20.0, "mpp": 0.5, ...}`` with whatever
provenance the caller adds (source slide fingerprint, model hash, seeds, settings);
:func:`zoomfeat.slides.read_written_description` reads it, and the slide reader takes the magnification from it (generic TIFF has no objective-power field).

Streaming: level 0 is produced band by band by a caller's ``band(y0, y1) -> uint8 [y1-y0, W, 3]`` and handed to
tifffile tile by tile from a generator; while a band is cut into tiles it is also 2x2 box-averaged
(``(a+b+c+d+2)//4``, dropping an odd last row/column) into a raw file on disk, which is level 1's band source,
and so on down the levels. Memory holds one band of ``tile`` rows of the widest level, never the image (tiles
go to tifffile's encoder one at a time); the
temporary raw files (about a third of level 0's raw size in all) are deleted when the file is done. The output
is written to a hidden temporary file and renamed into place (:func:`zoomfeat.store.atomic_write`), so a killed
run never leaves a file that looks finished. The bytes depend only on the pixels, the metadata and the
settings (no timestamps), so the same inputs give the same file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoomfeat.errors import ConfigError, DataError
from zoomfeat.slides import WRITTEN_FORMAT as FORMAT
from zoomfeat.store import atomic_write
FORMAT_VERSION = 1
COMPRESSIONS = ("jpeg", "deflate", "none")

BandFn = Callable[[int, int], np.ndarray]  # (y0, y1) -> uint8 [y1 - y0, W, 3] rows of level 0


@dataclass(frozen=True)
class PyramidSettings:
    """Tile side (px, a multiple of 16), compression (``jpeg`` lossy at ``quality``, ``deflate`` lossless,
    ``none``) and the smallest level kept (levels are halved while the longer side exceeds ``tile``)."""

    tile: int = 256
    compression: str = "jpeg"
    quality: int = 90

    def __post_init__(self) -> None:
        if self.tile < 16 or self.tile % 16:
            raise ConfigError(f"TIFF tile side {self.tile} must be a multiple of 16 (e.g. 256)")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"bad TIFF compression {self.compression!r}: use one of {', '.join(COMPRESSIONS)}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"JPEG quality {self.quality} must be in 1..100")

    def tifffile_args(self) -> dict:
        if self.compression == "jpeg":
            return {"compression": "jpeg", "compressionargs": {"level": self.quality}}
        if self.compression == "deflate":
            return {"compression": "zlib", "compressionargs": {"level": 6}}
        return {"compression": None}


def level_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """(h, w) of every level: level 0, then halved (floor) while the longer side of the last exceeds ``tile``."""
    shapes = [(int(height), int(width))]
    while max(shapes[-1]) > tile and min(shapes[-1]) >= 2:
        h, w = shapes[-1]
        shapes.append((h // 2, w // 2))
    return shapes


def downsample2(band: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """2x2 box average of uint8 [h, w, 3] with round-half-up, odd last row/column dropped: [h//2, w//2, 3].
    Computed ``chunk`` columns at a time, so its uint16 temporaries do not grow with the band's width."""
    h, w = band.shape[0] // 2 * 2, band.shape[1] // 2 * 2
    out = np.empty((h // 2, w // 2, 3), np.uint8)
    for x0 in range(0, w, chunk):
        b = band[:h, x0:min(w, x0 + chunk)].astype(np.uint16)
        out[:, x0 // 2:x0 // 2 + b.shape[1] // 2] = (b[0::2, 0::2] + b[0::2, 1::2] + b[1::2, 0::2] + b[1::2, 1::2]
                                                     + 2) // 4
    return out


def description(magnification: float, mpp: float, metadata: dict | None = None) -> str:
    """The level-0 ImageDescription: one JSON object (sorted keys, so the bytes are reproducible)."""
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "magnification": float(magnification),
              "mpp": float(mpp), **(metadata or {})}
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


class _RawLevel:
    """A level's pixels in a raw uint8 file on disk: rows appended in order, read back by row ranges."""

    def __init__(self, folder: str, width: int):
        fd, name = tempfile.mkstemp(suffix=".raw", dir=folder)
        self.file = os.fdopen(fd, "w+b")
        self.path, self.width, self.rows = name, width, 0

    def append(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows).tobytes())
        self.rows += len(rows)

    def band(self, y0: int, y1: int) -> np.ndarray:
        row = self.width * 3
        self.file.flush()
        self.file.seek(y0 * row)
        data = self.file.read((y1 - y0) * row)
        return np.frombuffer(data, np.uint8).reshape(y1 - y0, self.width, 3)

    def close(self) -> None:
        self.file.close()
        os.unlink(self.path)


def _tiles(band_fn: BandFn, shape: tuple[int, int], tile: int, sink: _RawLevel | None) -> Iterator[np.ndarray]:
    """Tiles of one level, row-major, for tifffile; every band also goes, halved, into ``sink`` (next level)."""
    h, w = shape
    for y0 in range(0, h, tile):
        y1 = min(y0 + tile, h)
        band = np.asarray(band_fn(y0, y1))
        if band.dtype != np.uint8 or band.shape != (y1 - y0, w, 3):
            raise DataError(f"a pyramid band must be uint8 [{y1 - y0}, {w}, 3], got {band.dtype} {band.shape}")
        if sink is not None:  # before the tiles: tifffile stops pulling after the last tile it expects
            sink.append(downsample2(band))  # bands have an even height except maybe the last (odd row dropped)
        for x0 in range(0, w, tile):
            t = band[:, x0:x0 + tile]
            if t.shape[:2] != (tile, tile):
                full = np.zeros((tile, tile, 3), np.uint8)
                full[:t.shape[0], :t.shape[1]] = t
                t = full
            yield t


def write_pyramid_streamed(path: str | Path, height: int, width: int, band: BandFn, *, mpp: float,
                           magnification: float, metadata: dict | None = None,
                           settings: PyramidSettings = PyramidSettings()) -> Path:
    """Write a ``height x width`` RGB image whose level-0 rows come from ``band(y0, y1)`` (called once per band
    of ``settings.tile`` rows, top to bottom) as a pyramidal TIFF at ``path`` (atomic). Returns ``path``."""
    import tifffile

    if height < 1 or width < 1:
        raise ConfigError(f"a slide needs at least 1x1 px, got {width}x{height}")
    if not (mpp > 0 and magnification > 0):
        raise ConfigError(f"mpp {mpp} and magnification {magnification} must be positive")
    path = Path(path)
    shapes = level_shapes(height, width, settings.tile)
    px_per_cm = 1e4 / mpp
    common = dict(photometric="rgb", dtype=np.uint8, tile=(settings.tile, settings.tile), metadata=None,
                  resolutionunit="CENTIMETER", software="zoomfeat", **settings.tifffile_args())
    bigtiff = height * width * 3 * 4 // 3 > 2**31
    with atomic_write(path) as tmp, tempfile.TemporaryDirectory(dir=path.parent, prefix=".pyramid-") as scratch:
        source: BandFn = band
        previous: _RawLevel | None = None
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            for level, (h, w) in enumerate(shapes):
                sink = _RawLevel(scratch, shapes[level + 1][1]) if level + 1 < len(shapes) else None
                scale = width / w
                extra = {"description": description(magnification, mpp, metadata)} if level == 0 else {}
                # maxworkers=1: tifffile's threaded encoder buffers up to 512 MiB of tiles (memory that grows
                # with the slide up to that size); one encoder pulls one tile at a time (same bytes)
                tif.write(_tiles(source, (h, w), settings.tile, sink), shape=(h, w, 3), maxworkers=1,
                          resolution=(px_per_cm / scale, px_per_cm / scale), subfiletype=0 if level == 0 else 1,
                          **extra, **common)
                if previous is not None:
                    previous.close()
                previous = sink
                source = sink.band if sink is not None else None
    return path


def write_pyramid_array(path: str | Path, image: np.ndarray, *, mpp: float, magnification: float,
                        metadata: dict | None = None, settings: PyramidSettings = PyramidSettings()) -> Path:
    """:func:`write_pyramid_streamed` for an image already in memory, uint8 [H, W, 3]."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"an image to write must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return write_pyramid_streamed(path, image.shape[0], image.shape[1], lambda y0, y1: image[y0:y1], mpp=mpp,
                                  magnification=magnification, metadata=metadata, settings=settings)
