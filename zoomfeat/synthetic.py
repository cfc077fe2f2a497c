"""Synthetic pyramidal whole-slide images with a planted class signal, for tests and the demo.

The slides are real files that OpenSlide opens: an Aperio-style SVS/TIFF (JPEG tiles, an
``Aperio Image Library`` description with ``AppMag`` and ``MPP``, reduced levels as separate tiled pages,
a stripped thumbnail page) or a generic tiled TIFF whose mpp comes from its resolution tags.

The picture is H&E-like: white background, one or a few tissue blobs of pink stroma with purple nuclei.
Slides with ``label=1`` carry a class signal inside a few boxes (level-0 px, returned):

* ``"20x"`` (cell level): dense, small, dark nuclei, a texture visible only at high magnification;
* ``"5x"`` (architecture): gland-like rings (purple epithelium around a white lumen), ~30 px wide at 5x.

Everything is generated with numpy at full resolution in row strips from a few small texture banks
(no per-pixel Python), then written with tifffile's ``tile=`` and ``compression="jpeg"``.

A second kind of cohort (``kind="arrangement"``, :func:`render_arrangement_level0`) carries a purely
multi-scale signal: every 20x tile (256 level-0 px, on the tiling lattice) is one of two tissue types,
pink stroma (``A``) or purple epithelium (``B``), and both classes draw the same per-slide share of ``B``.
In ``label=1`` slides the types come in spatial clusters of several tiles (a smoothed random field
thresholded at that share); in ``label=0`` slides the very same tile types are shuffled over the tissue
tiles, so they are intermixed tile by tile. The bag of single tiles is identically distributed in both
classes: only a view of several tiles at once (a 5x patch of 4x4 tiles) tells them apart. An optional
cell-level cue (``tile_signal``: a share of the ``B`` tiles of ``label=1`` slides drawn with finer-grained
nuclei of the same colour statistics, a difference a 4x reduction mostly averages away) adds a second,
mostly 20x-only part of the signal, for encoders that see cell-level grain (the demo's random toy CNN does;
the demo's tiny ZoomLDM does not: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zoomfeat.errors import ConfigError
from zoomfeat.mags import mag_name, parse_mag

TEXTURE = 1024  # side of the periodic nuclei/noise textures, level-0 px
MASK_FACTOR = 8  # the tissue mask and stroma colour are drawn at 1/8 of level 0
STRIP = TEXTURE  # rows generated at a time (one texture period)

WHITE = np.array([243, 243, 245], np.float32)
STROMA = np.array([232, 160, 196], np.float32)
NUCLEUS = np.array([96, 52, 146], np.float32)
SIGNAL_NUCLEUS = np.array([58, 26, 104], np.float32)
EPITHELIUM = np.array([150, 78, 168], np.float32)
LUMEN = np.array([250, 246, 250], np.float32)


@dataclass(frozen=True)
class SyntheticSlideInfo:
    """What was written: the file, its geometry, label and where the signal lies (level-0 px boxes)."""

    path: Path
    slide_id: str
    size: int
    label: int
    fmt: str
    base_magnification: float
    mpp: float
    signal_scales: tuple[str, ...]
    signal_boxes_level0: list[tuple[int, int, int, int]] = field(default_factory=list)


def _validate(size: int, fmt: str, tile: int, signal_strength: float, scales: Sequence[str]) -> tuple[str, ...]:
    if fmt not in ("aperio", "tiff"):
        raise ConfigError(f"unknown synthetic slide format {fmt!r}: use 'aperio' or 'tiff'")
    if tile not in (240, 256):
        raise ConfigError(f"synthetic tile size {tile} is not supported: use 256 or 240")
    if size < 64 or size % 64:
        raise ConfigError(f"synthetic slide size {size} must be a multiple of 64 and at least 64 px")
    if not 0.0 <= signal_strength <= 1.0:
        raise ConfigError(f"signal strength {signal_strength} must lie in [0, 1]")
    names = tuple(mag_name(parse_mag(s)) for s in scales)
    unknown = [n for n in names if n not in ("20x", "5x")]
    if unknown:
        raise ConfigError(f"signal scale {unknown[0]} is not supported: use 20x and/or 5x")
    return names


def _smooth_noise(rng: np.random.Generator, side: int, features: float) -> np.ndarray:
    """Smooth random field with ~``features`` bumps across, zero mean, unit std. float32 [side, side].

    Drawn on a 64-px grid and upsampled bilinearly, so its cost does not grow with the slide.
    """
    from scipy import ndimage

    coarse = ndimage.gaussian_filter(rng.standard_normal((64, 64)).astype(np.float32), 64 / features / 2, mode="wrap")
    field_ = ndimage.zoom(coarse, side / 64, order=1, mode="grid-wrap", grid_mode=True)[:side, :side]
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


def _tissue_mask(rng: np.random.Generator, side: int, n_blobs: int) -> np.ndarray:
    """Low-resolution tissue mask: ``n_blobs`` ellipses with wobbly edges. bool [side, side]."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    wobble = _smooth_noise(rng, side, 12) * 0.12
    mask = np.zeros((side, side), bool)
    for _ in range(n_blobs):
        cx, cy = rng.uniform(0.3, 0.7, 2)
        rx, ry = rng.uniform(0.18, 0.3, 2) / np.sqrt(n_blobs)
        angle = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        mask |= (u * u + v * v) < 1.0 + wobble
    return mask


def _nuclei_texture(rng: np.random.Generator, density: float, radius: float) -> np.ndarray:
    """Periodic nuclei opacity texture: blobs of ~``radius`` px, ``density`` per 1000 px². float32 [T, T] in [0, 1]."""
    from scipy import ndimage

    count = int(density * TEXTURE * TEXTURE / 1000)
    points = np.zeros((TEXTURE, TEXTURE), np.float32)
    ys, xs = rng.integers(0, TEXTURE, (2, count))
    points[ys, xs] = 1.0
    blur = ndimage.gaussian_filter(points, radius / 1.6, mode="wrap")
    peak = 1.0 / (2 * np.pi * (radius / 1.6) ** 2)
    return np.clip((blur / peak - 0.35) * 3.0, 0.0, 1.0)


def _signal_boxes(rng: np.random.Generator, mask: np.ndarray, size: int, count: int) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1) in level-0 px, 1/4 of the slide wide, centred on tissue, on a 64-px lattice."""
    side = mask.shape[0]
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return []
    box = max(64, (size // 4) // 64 * 64)
    boxes = []
    for i in rng.choice(len(xs), size=count, replace=False):
        cx, cy = (xs[i] + 0.5) * size / side, (ys[i] + 0.5) * size / side
        x0 = int(np.clip(cx - box / 2, 0, size - box)) // 64 * 64
        y0 = int(np.clip(cy - box / 2, 0, size - box)) // 64 * 64
        boxes.append((x0, y0, x0 + box, y0 + box))
    return boxes


def _gland_field(rng: np.random.Generator, h: int, w: int, spacing: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Gland-like rings on a jittered lattice: (ring opacity, lumen opacity), float32 [h, w] each."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cells_y, cells_x = (yy // spacing).astype(int), (xx // spacing).astype(int)
    jitter = rng.uniform(-0.15, 0.15, (h // spacing + 2, w // spacing + 2, 2)) * spacing
    radius = rng.uniform(0.26, 0.34, (h // spacing + 2, w // spacing + 2)) * spacing
    cy = (cells_y + 0.5) * spacing + jitter[cells_y, cells_x, 0]
    cx = (cells_x + 0.5) * spacing + jitter[cells_y, cells_x, 1]
    dist = np.hypot(yy - cy, xx - cx)
    r = radius[cells_y, cells_x]
    ring = np.clip(1.0 - np.abs(dist - r) / (0.09 * spacing), 0.0, 1.0)
    lumen = np.clip((r - 0.09 * spacing - dist) / 3.0, 0.0, 1.0)
    return ring, lumen


def _tiled(texture: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Rows r0:r1, columns c0:c1 of the plane tiled periodically with ``texture`` ([T, T, ...])."""
    n = texture.shape[0]
    a = r0 % n
    if a + (r1 - r0) <= n:
        rows = texture[a : a + r1 - r0]
    else:
        rows = np.take(texture, np.arange(r0, r1) % n, axis=0)
    b = c0 % n
    reps = -(-(b + c1 - c0) // n)
    return np.concatenate([rows] * reps, axis=1)[:, b : b + c1 - c0] if reps > 1 else rows[:, b : b + c1 - c0]


def _composite(base: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``base * (1 - alpha) + color * alpha`` in place on ``base`` (float32 [h, w, 3]); alpha [h, w]."""
    delta = color - base
    delta *= alpha[..., None]
    base += delta
    return base


class _Painter:
    """Paints level 0 strip by strip: a low-resolution label map (background, two stroma tints) picks
    between precomputed periodic uint8 textures, so the full-resolution work is copies and selects."""

    def __init__(self, rng: np.random.Generator, size: int, n_blobs: int):
        self.size = size
        side = size // MASK_FACTOR
        self.mask = _tissue_mask(rng, side, n_blobs)
        tint = _smooth_noise(rng, side, 8)
        self.labels = np.where(self.mask, np.where(tint > 0, 2, 1), 0).astype(np.uint8)  # 0 bg, 1/2 stroma tints
        nuclei = _nuclei_texture(rng, density=1.6, radius=4.5)
        self.signal_nuclei = _nuclei_texture(rng, density=5.5, radius=2.8)
        noise = rng.normal(0.0, 5.0, (TEXTURE, TEXTURE, 1)).astype(np.float32)
        plane = np.ones((TEXTURE, TEXTURE, 1), np.float32)
        shift = np.array([4, 10, 7], np.float32)
        self.textures = [
            np.clip(WHITE * plane + noise, 0, 255).astype(np.uint8),
            np.clip(_composite((STROMA - shift) * plane, NUCLEUS, nuclei) + noise, 0, 255).astype(np.uint8),
            np.clip(_composite((STROMA + shift) * plane, NUCLEUS, nuclei) + noise, 0, 255).astype(np.uint8),
        ]
        self.seed = int(rng.integers(0, 2**31))
        self._glands: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def glands(self, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Ring and lumen opacity of a whole signal box (cached across strips)."""
        if box not in self._glands:
            x0, y0, x1, y1 = box
            ring, lumen = _gland_field(np.random.default_rng([self.seed, x0, y0]), (y1 - y0) // 2, (x1 - x0) // 2, 80)
            up = lambda a: np.repeat(np.repeat(a, 2, 0), 2, 1)  # noqa: E731 - 2x nearest upsampling
            self._glands[box] = (up(ring), up(lumen))
        return self._glands[box]

    def strip(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 [r1-r0, size, 3], tissue bool [r1-r0, size]) of level-0 rows r0:r1 (multiples of 8)."""
        f = MASK_FACTOR
        low = self.labels[r0 // f : r1 // f, :, None, None]  # [h/8, W/8, 1, 1], broadcast over 8x8 blocks
        blocks = [_tiled(t, r0, r1, 0, self.size).reshape((r1 - r0) // f, f, self.size // f, f, 3).swapaxes(1, 2)
                  for t in self.textures]
        rgb = np.where(low[..., None] == 0, blocks[0], np.where(low[..., None] == 1, blocks[1], blocks[2]))
        rgb = rgb.swapaxes(1, 2).reshape(r1 - r0, self.size, 3)
        mask = np.repeat(np.repeat(self.labels[r0 // f : r1 // f] > 0, f, 0), f, 1)
        return rgb, mask

    def plant(self, rgb: np.ndarray, mask: np.ndarray, r0: int, box, scales, strength: float) -> None:
        """Blend the class signal into the strip ``rgb`` (rows from r0) inside ``box``, on tissue only."""
        x0, y0, x1, y1 = box
        a, b = max(y0, r0), min(y1, r0 + rgb.shape[0])
        if a >= b:
            return
        region = rgb[a - r0 : b - r0, x0:x1].astype(np.float32)
        on_tissue = mask[a - r0 : b - r0, x0:x1].astype(np.float32) * strength
        if "20x" in scales:
            region = _composite(region, SIGNAL_NUCLEUS, _tiled(self.signal_nuclei, a, b, x0, x1) * on_tissue)
        if "5x" in scales:
            ring, lumen = self.glands(box)
            region = _composite(region, EPITHELIUM, ring[a - y0 : b - y0] * on_tissue)
            region = _composite(region, LUMEN, lumen[a - y0 : b - y0] * on_tissue)
        rgb[a - r0 : b - r0, x0:x1] = np.clip(region, 0, 255)


def render_level0(size: int, *, label: int, seed: int, signal_strength: float, scales: Sequence[str],
                  n_blobs: int, n_signal_boxes: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Level-0 pixels, uint8 [size, size, 3] RGB, and the signal boxes (empty for label 0)."""
    rng = np.random.default_rng([seed, label])
    painter = _Painter(rng, size, n_blobs)
    boxes = _signal_boxes(rng, painter.mask, size, n_signal_boxes) if label and scales and signal_strength > 0 else []
    image = np.empty((size, size, 3), np.uint8)
    for r0 in range(0, size, STRIP):
        r1 = min(size, r0 + STRIP)
        rgb, mask = painter.strip(r0, r1)
        for box in boxes:
            painter.plant(rgb, mask, r0, box, scales, signal_strength)
        image[r0:r1] = rgb
    return image, boxes


ARRANGEMENT_TILE = 256  # level-0 px of one 20x tile (base 20x): the unit the tissue types are drawn on
ARRANGEMENT_KINDS = ("boxes", "arrangement")
EPITHELIUM_BASE = np.array([186, 120, 190], np.float32)


def _arrangement_mask(rng: np.random.Generator, side: int) -> np.ndarray:
    """One large wobbly ellipse covering about 60 % of the slide. bool [side, side]."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    wobble = _smooth_noise(rng, side, 10) * 0.10
    cx, cy = rng.uniform(0.47, 0.53, 2)
    rx, ry = rng.uniform(0.40, 0.46, 2)
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1.0 + wobble


def arrangement_types(rng: np.random.Generator, tissue: np.ndarray, label: int, cluster: float) -> np.ndarray:
    """Tissue type per 20x tile: int8 [cells, cells], 0 background, 1 stroma (A), 2 epithelium (B).

    ``tissue`` (bool per tile) says which tiles hold tissue. The share of B is drawn from U(0.35, 0.65) for
    both classes; ``label=1`` thresholds a smoothed random field (correlation ~``cluster`` tiles) at that
    share, ``label=0`` shuffles the same types over the tissue tiles (identical type counts, no clusters):
    from the same ``rng`` state, the ``label=0`` map is a permutation of the ``label=1`` map.
    """
    from scipy import ndimage

    cells = tissue.shape[0]
    share = rng.uniform(0.35, 0.65)
    field_ = ndimage.gaussian_filter(rng.standard_normal((cells, cells)), cluster / 2.0, mode="wrap")
    on = np.flatnonzero(tissue.ravel())
    types = np.zeros(cells * cells, np.int8)
    if len(on):
        values = field_.ravel()[on]
        is_b = values > np.quantile(values, 1.0 - share)
        if not label:
            is_b = rng.permutation(is_b)
        types[on] = np.where(is_b, 2, 1)
    return types.reshape(cells, cells)


def _arrangement_textures(rng: np.random.Generator, fine_grain: bool) -> dict[str, np.ndarray]:
    """Periodic uint8 textures [T, T, 3]: background, stroma (A), epithelium (B) and fine-grained epithelium
    (``B_fine``: nuclei ~6.5x as many and 2.5x smaller, with B's mean colour and pixel spread: only the grain
    differs. The spread of 4x4-px block means, what a 20x latent holds, is 7.3 against B's 12.4 grey levels;
    after the 4x reduction of the 5x view it is 2.2 against 4.9)."""
    noise = rng.normal(0.0, 5.0, (TEXTURE, TEXTURE, 1)).astype(np.float32)
    plane = np.ones((TEXTURE, TEXTURE, 1), np.float32)
    sparse = _nuclei_texture(rng, density=1.6, radius=4.5)
    dense = _nuclei_texture(rng, density=3.2, radius=3.5)
    to8 = lambda a: np.clip(a + noise, 0, 255).astype(np.uint8)  # noqa: E731
    textures = {
        "background": to8(WHITE * plane),
        "A": to8(_composite(STROMA * plane, NUCLEUS, sparse)),
        "B": to8(_composite(EPITHELIUM_BASE * plane, NUCLEUS, dense)),
    }
    if fine_grain:  # drawn last: the other textures do not depend on it
        fine = _nuclei_texture(rng, density=21.0, radius=1.4)  # the same mean opacity (0.07) and pixel spread
        textures["B_fine"] = to8(_composite(EPITHELIUM_BASE * plane, NUCLEUS, fine))
    return textures


def render_arrangement_level0(size: int, *, label: int, seed: int, cluster: float = 2.0,
                              tile_signal: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 pixels uint8 [size, size, 3] of an arrangement slide and its tile type map (see
    :func:`arrangement_types`; type 3 marks the ``B`` tiles of a ``label=1`` slide drawn with the cell-level
    cue: a share ``tile_signal`` of them, each with that probability, carry fine-grained nuclei of the same
    colour statistics). ``size`` must be a multiple of 1024 (whole 5x patches)."""
    if size < 1024 or size % 1024:
        raise ConfigError(f"arrangement slide size {size} must be a multiple of 1024 px")
    if not 0.0 <= tile_signal <= 1.0:
        raise ConfigError(f"tile signal {tile_signal} must lie in [0, 1]")
    if not 0.5 <= cluster <= 16:
        raise ConfigError(f"cluster size {cluster} (tiles) must lie in [0.5, 16]")
    rng = np.random.default_rng([seed, 7])  # the same mask, share and textures for either label
    t = ARRANGEMENT_TILE
    cells = size // t
    f = MASK_FACTOR
    mask = _arrangement_mask(rng, size // f)
    tissue = mask.reshape(cells, t // f, cells, t // f).mean(axis=(1, 3)) >= 0.25
    cue = bool(label and tile_signal > 0)
    textures = _arrangement_textures(rng, fine_grain=cue)
    types = arrangement_types(np.random.default_rng([seed, 11]), tissue, label, cluster)  # label 0: shuffled
    if cue:
        cued = np.random.default_rng([seed, 13]).random(types.shape) < tile_signal
        types = np.where((types == 2) & cued, 3, types).astype(np.int8)
    by_type = {0: textures["background"], 1: textures["A"], 2: textures["B"], 3: textures.get("B_fine")}
    image = np.empty((size, size, 3), np.uint8)
    for i in range(cells):
        for j in range(cells):
            r0, c0 = i * t, j * t
            tex = by_type[int(types[i, j])]
            block = _tiled(tex, r0, r0 + t, c0, c0 + t)
            if types[i, j]:  # tissue tiles keep the mask's wobbly edge: white outside it
                keep = np.repeat(np.repeat(mask[r0 // f : (r0 + t) // f, c0 // f : (c0 + t) // f], f, 0), f, 1)
                block = np.where(keep[..., None], block, _tiled(textures["background"], r0, r0 + t, c0, c0 + t))
            image[r0 : r0 + t, c0 : c0 + t] = block
    return image, types


def write_arrangement_slide(path: str | Path, *, size: int = 4096, label: int = 0, seed: int = 0,
                            fmt: str = "aperio", cluster: float = 2.0, tile_signal: float = 0.0,
                            mpp: float = 0.5, app_mag: float = 20.0) -> tuple[SyntheticSlideInfo, np.ndarray]:
    """Write one arrangement slide (base 20x, 256-px tiles); return its info and tile type map."""
    _validate(size, fmt, 256, 1.0, ())
    image, types = render_arrangement_level0(size, label=label, seed=seed, cluster=cluster,
                                             tile_signal=tile_signal)
    path = write_pyramid(path, image, fmt=fmt, mpp=mpp, app_mag=app_mag)
    boxes = [(0, 0, size, size)] if label else []
    info = SyntheticSlideInfo(path=path, slide_id=path.stem, size=size, label=int(label), fmt=fmt,
                              base_magnification=float(app_mag), mpp=float(mpp),
                              signal_scales=("5x", "20x") if tile_signal > 0 else ("5x",),
                              signal_boxes_level0=boxes)
    return info, types


def _pyramid(image: np.ndarray, factor: int = 4, min_side: int = 512) -> list[np.ndarray]:
    """Level 0 followed by box-filtered reductions by ``factor`` while the short side stays >= ``min_side``."""
    from PIL import Image

    levels = [image]
    while min(levels[-1].shape[:2]) // factor >= min_side:
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(factor)))
    return levels


def _aperio_description(width: int, height: int, tile: int, app_mag: float, mpp: float, extra: str = "") -> str:
    return (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
        f"JPEG/RGB Q=80{extra}|AppMag = {app_mag:g}|StripeWidth = 2040|ScanScope ID = SYNTH|"
        f"Filename = synthetic|MPP = {mpp:g}|Left = 25.0|Top = 18.0|LineCameraSkew = 0|Date = 11/21/26"
    )


def write_pyramid(path: str | Path, image: np.ndarray, *, fmt: str = "aperio", mpp: float = 0.5,
                  app_mag: float = 20.0, tile: int = 256, quality: int = 80) -> Path:
    """Write ``image`` (uint8 [H, W, 3]) as an Aperio-style or generic pyramidal TIFF that OpenSlide opens."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = _pyramid(image)
    height, width = image.shape[:2]
    common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": quality}, metadata=None)
    px_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        for i, level in enumerate(levels):
            h, w = level.shape[:2]
            if fmt == "aperio":
                extra = "" if i == 0 else f" -> {w}x{h}"
                desc = _aperio_description(width, height, tile, app_mag, mpp, extra)
                tif.write(level, tile=(tile, tile), description=desc, subfiletype=0 if i == 0 else 1, **common)
                if i == 0:  # Aperio's second page: a stripped thumbnail
                    from PIL import Image

                    thumb = Image.fromarray(image)
                    thumb.thumbnail((768, 768))
                    tif.write(np.asarray(thumb), description=desc, subfiletype=1, rowsperstrip=64, **common)
            else:
                scale = width / w
                tif.write(level, tile=(tile, tile), description="zoomfeat synthetic slide" if i == 0 else None,
                          resolution=(px_per_cm / scale, px_per_cm / scale), resolutionunit="CENTIMETER",
                          subfiletype=0 if i == 0 else 1, **common)
    return path


def write_synthetic_slide(path: str | Path, *, size: int = 8192, label: int = 0, seed: int = 0,
                          fmt: str = "aperio", signal_strength: float = 1.0,
                          signal_scales: Sequence[str] = ("20x", "5x"), n_blobs: int = 2,
                          n_signal_boxes: int = 2, mpp: float = 0.5, app_mag: float = 20.0,
                          tile: int = 256) -> SyntheticSlideInfo:
    """Write one synthetic slide of ``size`` x ``size`` level-0 px; return where its signal lies.

    ``label=1`` plants the signal (``signal_strength`` in [0, 1] blends it in) at ``signal_scales``
    (any of ``"20x"``, ``"5x"``) inside ``n_signal_boxes`` boxes; ``label=0`` plants none.
    """
    scales = _validate(size, fmt, tile, signal_strength, signal_scales)
    image, boxes = render_level0(size, label=label, seed=seed, signal_strength=signal_strength,
                                 scales=scales, n_blobs=n_blobs, n_signal_boxes=n_signal_boxes)
    path = write_pyramid(path, image, fmt=fmt, mpp=mpp, app_mag=app_mag, tile=tile)
    return SyntheticSlideInfo(path=path, slide_id=path.stem, size=size, label=int(label), fmt=fmt,
                              base_magnification=float(app_mag), mpp=float(mpp), signal_scales=scales,
                              signal_boxes_level0=boxes)


def patient_slide_counts(n: int, slides_per_patient: int | Sequence[int]) -> list[int]:
    """Slides of each patient for a cohort of ``n`` slides: a constant, or a pattern cycled over patients
    (``(1, 2, 3)``: one slide for patient 0, two for patient 1, ...; the last patient takes what is left)."""
    pattern = [slides_per_patient] if isinstance(slides_per_patient, int) else list(slides_per_patient)
    if n < 1 or not pattern or min(pattern) < 1:
        raise ConfigError(f"cohort needs n >= 1 and slides per patient >= 1 (got n={n}, {slides_per_patient})")
    counts: list[int] = []
    while sum(counts) < n:
        counts.append(min(pattern[len(counts) % len(pattern)], n - sum(counts)))
    return counts


def write_cohort(out_dir: str | Path, n: int = 8, size: int = 8192, seed: int = 0, *,
                 slides_per_patient: int | Sequence[int] = 1, fmt: str = "aperio", signal_strength: float = 1.0,
                 signal_scales: Sequence[str] = ("20x", "5x"), kind: str = "boxes", cluster: float = 2.0,
                 tile_signal: float = 0.0) -> Path:
    """Write ``n`` slides (labels alternate 0/1 by patient; ``slides_per_patient`` a number or a pattern cycled
    over patients, see :func:`patient_slide_counts`) + ``labels.csv`` + ``signal.json``; return ``out_dir``.

    ``kind="boxes"``: the signal of :func:`write_synthetic_slide` (``signal_strength``, ``signal_scales``).
    ``kind="arrangement"``: the multi-scale signal of :func:`render_arrangement_level0` (``cluster``,
    ``tile_signal``); it also writes ``tissue_types.json`` (slide_id -> tile type map, rows of 0/1/2, and 3 for
    the epithelium tiles with the cell-level cue).

    ``labels.csv`` has columns case_id,slide_id,label; ``signal.json`` maps slide_id -> list of level-0
    boxes [x0, y0, x1, y1] (empty for label 0; the whole slide for label-1 arrangement slides).
    """
    if kind not in ARRANGEMENT_KINDS:
        raise ConfigError(f"unknown cohort kind {kind!r}: use one of {', '.join(ARRANGEMENT_KINDS)}")
    counts = patient_slide_counts(n, slides_per_patient)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".svs" if fmt == "aperio" else ".tiff"
    rows, signal, types = [], {}, {}
    slide_of = [(p, k) for p, c in enumerate(counts) for k in range(c)]
    for i, (patient, k) in enumerate(slide_of):
        label = patient % 2
        case_id = f"case-{patient:03d}"
        slide_id = f"{case_id}-slide-{k}"
        if kind == "arrangement":
            info, type_map = write_arrangement_slide(out / f"{slide_id}{suffix}", size=size, label=label,
                                                     seed=seed * 100003 + i, fmt=fmt, cluster=cluster,
                                                     tile_signal=tile_signal)
            types[slide_id] = type_map.tolist()
        else:
            info = write_synthetic_slide(out / f"{slide_id}{suffix}", size=size, label=label,
                                         seed=seed * 100003 + i, fmt=fmt, signal_strength=signal_strength,
                                         signal_scales=signal_scales)
        rows.append((case_id, slide_id, label))
        signal[slide_id] = [list(b) for b in info.signal_boxes_level0]
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "slide_id", "label"])
        writer.writerows(rows)
    (out / "signal.json").write_text(json.dumps(signal, indent=2) + "\n")
    if types:
        (out / "tissue_types.json").write_text(json.dumps(types) + "\n")
    return out
