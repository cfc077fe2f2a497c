"""Tissue detection on a low-magnification thumbnail: saturation threshold (Otsu, with a floor) and
morphological clean-up with scipy.ndimage.

The mask is a bool [h, w] image of the whole slide at about ``TissueParams.mask_mag``; ``TissueMask``
keeps the level-0 px per mask px so tiles can look up their tissue fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from zoomfeat.errors import ConfigError


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection settings (all exposed on the CLI).

    min_tissue: fraction of a finest-magnification tile that must be tissue for the tile to be kept.
    mask_mag: magnification of the thumbnail the mask is computed on.
    saturation_threshold: HSV saturation (0-255) above which a pixel is tissue; None = Otsu per slide.
    min_saturation: floor for the Otsu threshold, so an all-white slide yields no tissue.
    closing_radius / opening_radius: radii (mask px) of the morphological closing (fills gaps) and
    opening (removes specks); fill_holes fills enclosed background.
    """

    min_tissue: float = 0.25
    mask_mag: float = 1.25
    saturation_threshold: float | None = None
    min_saturation: float = 20.0
    closing_radius: int = 2
    opening_radius: int = 1
    fill_holes: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue {self.min_tissue} must be a fraction in [0, 1]")
        if not (math.isfinite(self.mask_mag) and self.mask_mag > 0):
            raise ConfigError(f"tissue mask magnification {self.mask_mag} must be positive (e.g. 1.25)")
        for name in ("saturation_threshold", "min_saturation"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 255.0:
                raise ConfigError(f"--{name.replace('_', '-')} {value} must lie in [0, 255]")
        if self.closing_radius < 0 or self.opening_radius < 0:
            raise ConfigError("morphology radii must be >= 0")


@dataclass(frozen=True)
class TissueMask:
    """bool [h, w] tissue mask of the whole slide; ``scale_x``/``scale_y`` = level-0 px per mask px."""

    mask: np.ndarray
    scale_x: float
    scale_y: float
    threshold: float

    def fractions(self, coords_level0: np.ndarray, size_level0: int) -> np.ndarray:
        """Tissue fraction of each square tile (x, y, size in level-0 px). float64 [N] in [0, 1]."""
        coords = np.asarray(coords_level0, dtype=np.int64).reshape(-1, 2)
        h, w = self.mask.shape
        integral = np.zeros((h + 1, w + 1), np.int64)
        integral[1:, 1:] = np.cumsum(np.cumsum(self.mask, 0), 1)
        x0 = np.clip(np.floor(coords[:, 0] / self.scale_x).astype(np.int64), 0, w - 1)
        y0 = np.clip(np.floor(coords[:, 1] / self.scale_y).astype(np.int64), 0, h - 1)
        x1 = np.clip(np.ceil((coords[:, 0] + size_level0) / self.scale_x).astype(np.int64), x0 + 1, w)
        y1 = np.clip(np.ceil((coords[:, 1] + size_level0) / self.scale_y).astype(np.int64), y0 + 1, h)
        inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        return inside / ((x1 - x0) * (y1 - y0))


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of uint8 [h, w, 3] RGB, as float32 [h, w] in 0-255."""
    rgb = rgb.astype(np.float32)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(high > 0, (high - low) / np.maximum(high, 1e-6) * 255.0, 0.0).astype(np.float32)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of values in 0-255 (256-bin histogram), maximising between-class variance."""
    hist, edges = np.histogram(values, bins=256, range=(0.0, 256.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    mean0 = np.cumsum(hist * centers) / np.maximum(weight0, 1)
    mean1 = (np.sum(hist * centers) - np.cumsum(hist * centers)) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx * xx + yy * yy <= radius * radius


def mask_from_rgb(rgb: np.ndarray, params: TissueParams) -> tuple[np.ndarray, float]:
    """Tissue mask bool [h, w] of a thumbnail uint8 [h, w, 3], and the saturation threshold used."""
    from scipy import ndimage

    sat = saturation(rgb)
    threshold = params.saturation_threshold
    if threshold is None:
        threshold = max(otsu_threshold(sat), params.min_saturation)
    mask = sat > threshold
    if params.closing_radius:
        mask = ndimage.binary_closing(mask, _disk(params.closing_radius), border_value=0)
    if params.opening_radius:
        mask = ndimage.binary_opening(mask, _disk(params.opening_radius))
    if params.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask, float(threshold)


def tissue_mask(slide, params: TissueParams = TissueParams()) -> TissueMask:
    """Tissue mask of ``slide`` (a :class:`zoomfeat.slides.Slide`) from a thumbnail at ~``params.mask_mag``."""
    info = slide.info
    downsample = max(1.0, info.base_magnification / params.mask_mag)
    max_side = max(1, int(math.ceil(max(info.width, info.height) / downsample)))
    thumb = slide.thumbnail(max_side)
    mask, threshold = mask_from_rgb(thumb, params)
    h, w = mask.shape
    return TissueMask(mask=mask, scale_x=info.width / w, scale_y=info.height / h, threshold=threshold)
