"""Attention heatmaps (CLAM style): a fold model's attention per instance drawn over the slide thumbnail.

Each tile of the bag (finest magnification of the feature set) is a rectangle on the thumbnail coloured by the
percentile rank of its attention (0 = least, 1 = most attended) and alpha-blended over the tissue. Ranks, not
raw scores, so heads whose "attention" is a softmax (ABMIL, CLAM), a similarity (DSMIL) or an instance logit
(max pooling) all give comparable maps. A montage of the top-attended patches, read from the slide at the
finest magnification, goes beside the PNG as ``<stem>_top.png``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from zoomfeat.errors import ConfigError, DataError
from zoomfeat.mags import PATCH_SIZE, parse_mag


@dataclass(frozen=True)
class HeatmapResult:
    """What ``build_heatmap`` wrote and drew: PNG paths, number of tiles, indices of the top-attended tiles."""

    heatmap_png: Path
    top_png: Path
    n_tiles: int
    top_indices: tuple[int, ...]


def attention_map(run_dir: str | Path, fold: int, slide_path: str | Path, spec) -> tuple[np.ndarray, np.ndarray]:
    """The fold model's attention on one slide: coords int64 [N, 2] (level-0 x, y) and attention float [N].

    ``spec`` is a FeatureSpec or its text (``DIR@20x+5x``); its magnifications must be the run's.
    """
    import torch

    from mil.bags import FeatureSpec, load_bag
    from mil.cv import load_fold_model

    spec = spec if isinstance(spec, FeatureSpec) else FeatureSpec.parse(str(spec))
    model, config = load_fold_model(run_dir, fold)
    trained = config.get("checkpoint", {}).get("features") or config.get("config", {}).get("features")
    if trained and FeatureSpec.parse(str(trained)).mags != spec.mags:
        raise ConfigError(f"fold {fold} of {run_dir} was trained on {trained}, not on {spec}: pass --features "
                          f"DIR@{'+'.join(FeatureSpec.parse(str(trained)).mags)}")
    bag = load_bag(spec, Path(slide_path).stem)
    model.eval()
    with torch.no_grad():
        out = model(bag.features.float())
    attention = out.attention.detach().float().cpu().numpy().reshape(-1)
    if attention.shape[0] != len(bag.coords_level0):
        raise DataError(f"model of fold {fold} returned {attention.shape[0]} attention values for "
                        f"{len(bag.coords_level0)} tiles of {spec.path(bag.slide_id)}")
    return bag.coords_level0, attention


def attention_percentiles(attention: np.ndarray) -> np.ndarray:
    """Percentile rank of each score in [0, 1] (ties share their mean rank); [N] -> [N]."""
    n = len(attention)
    if n == 1:
        return np.ones(1)
    return (rankdata(attention) - 1) / (n - 1)


def render_heatmap(thumb: np.ndarray, coords_level0: np.ndarray, tile_level0: float,
                   slide_size: tuple[int, int], scores: np.ndarray, alpha: float = 0.5,
                   cmap: str = "jet") -> np.ndarray:
    """uint8 [h, w, 3]: ``thumb`` with every tile rectangle coloured by ``scores`` (in [0, 1]) and blended.

    coords_level0 [N, 2] top-left (x, y); tile_level0 = tile side in level-0 px; slide_size = (width, height).
    """
    from matplotlib import colormaps

    h, w = thumb.shape[:2]
    sx, sy = w / slide_size[0], h / slide_size[1]
    colours = colormaps[cmap](np.asarray(scores, dtype=float))[:, :3]  # [N, 3] in [0, 1]
    layer = np.zeros((h, w, 3))
    covered = np.zeros((h, w, 1))
    for (x, y), colour in zip(np.asarray(coords_level0), colours):
        c0, r0 = int(math.floor(x * sx)), int(math.floor(y * sy))
        c1 = max(int(math.ceil((x + tile_level0) * sx)), c0 + 1)
        r1 = max(int(math.ceil((y + tile_level0) * sy)), r0 + 1)
        layer[r0:r1, c0:c1] = colour
        covered[r0:r1, c0:c1] = 1.0
    base = thumb.astype(float) / 255.0
    blended = base * (1 - alpha * covered) + alpha * covered * layer
    return np.clip(np.round(blended * 255), 0, 255).astype(np.uint8)


def montage(patches: list[np.ndarray], border: int = 4) -> np.ndarray:
    """uint8 grid (about square, row-major, white borders) of equally sized uint8 [s, s, 3] patches."""
    n = len(patches)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    s = patches[0].shape[0]
    grid = np.full((rows * (s + border) + border, cols * (s + border) + border, 3), 255, np.uint8)
    for i, patch in enumerate(patches):
        r, c = divmod(i, cols)
        y, x = border + r * (s + border), border + c * (s + border)
        grid[y:y + s, x:x + s] = patch
    return grid


def _save_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def build_heatmap(run_dir: str | Path, fold: int, slide_path: str | Path, spec, out_png: str | Path, *,
                  top: int = 16, max_size: int = 2048, alpha: float = 0.5, patch_px: int = PATCH_SIZE) -> HeatmapResult:
    """Write the heatmap PNG and ``<stem>_top.png`` (the ``top`` most attended patches at the finest mag)."""
    from mil.bags import FeatureSpec
    from zoomfeat.slides import Slide

    if top < 1 or max_size < 16 or not 0 < alpha <= 1:
        raise ConfigError(f"bad heatmap settings (top={top}, max_size={max_size}, alpha={alpha}): "
                          "use top >= 1, max size >= 16, 0 < alpha <= 1")
    spec = spec if isinstance(spec, FeatureSpec) else FeatureSpec.parse(str(spec))
    coords, attention = attention_map(run_dir, fold, slide_path, spec)
    out_png = Path(out_png)
    top_png = out_png.with_name(f"{out_png.stem}_top.png")
    mag = parse_mag(spec.mags[0])
    order = np.argsort(-attention, kind="stable")[: min(top, len(attention))]
    with Slide(slide_path) as slide:
        tile_level0 = PATCH_SIZE * slide.downsample(mag)
        thumb = slide.thumbnail(max_size)
        size = (slide.info.width, slide.info.height)
        patches = [slide.read_patch(int(coords[i, 0]), int(coords[i, 1]), mag, patch_px) for i in order]
    _save_png(out_png, render_heatmap(thumb, coords, tile_level0, size, attention_percentiles(attention), alpha))
    _save_png(top_png, montage(patches))
    return HeatmapResult(out_png, top_png, len(attention), tuple(int(i) for i in order))
