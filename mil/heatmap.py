"""Attention heatmaps (CLAM style): a fold model's attention per instance drawn over the slide thumbnail.

Each tile of the bag (finest magnification of the feature set) is a rectangle on the thumbnail coloured by the
percentile rank of its attention (0 = least, 1 = most attended) and alpha-blended over the tissue. Ranks, not
raw scores, so heads whose "attention" is a softmax (ABMIL, CLAM), a similarity (DSMIL), an instance logit
(max pooling), the class token's Nystrom attention (TransMIL) or tier-1 x tier-2 weights (DTFD) all give
comparable maps: every registered head returns one (mil.registry). A montage of the top-attended patches, read from the slide at the
finest magnification, goes beside the PNG as ``<stem>_top.png``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from mil.record import read_record
from zoomfeat.errors import ConfigError, DataError
from zoomfeat.features import FeatureSpec
from zoomfeat.mags import PATCH_SIZE
from zoomfeat.slides import Slide
from zoomfeat.store import FeatureFile, atomic_write, fingerprint


@dataclass(frozen=True)
class HeatmapResult:
    """What ``build_heatmap`` wrote and drew: PNG paths, the (seed, fold) whose model was drawn, number of
    tiles, indices of the top-attended tiles."""

    heatmap_png: Path
    top_png: Path
    seed: int
    fold: int
    n_tiles: int
    top_indices: tuple[int, ...]


def check_slide_identity(feature_file: FeatureFile, slide_path: str | Path) -> None:
    """Refuse a slide that is not the file the features were made from (same stem, other file).

    The feature file stores the slide's fingerprint (path, size, mtime): the size and the modification time
    must match (a moved slide keeps both; another scan or a re-export does not)."""
    stored = feature_file.slide_fingerprint
    if not stored:
        return  # written without a slide file (imported features): nothing to check
    current = fingerprint(slide_path)
    if stored.get("size") != current["size"] or stored.get("mtime_ns") != current["mtime_ns"]:
        raise DataError(f"{slide_path} is not the slide the features in {feature_file.path} were made from "
                        f"({stored.get('path')}, {stored.get('size')} bytes; this one has {current['size']} bytes or "
                        "another modification time): give that slide file, or extract this slide's features")


def attention_map(run_dir: str | Path, fold: int, slide_path: str | Path, spec=None,
                  seed: int | None = None) -> tuple[FeatureSpec, np.ndarray, np.ndarray]:
    """The attention of the model of (``seed``, ``fold``) on one slide: the feature set read, coords int64
    [N, 2] (level-0 x, y) and attention float [N].

    ``seed`` None is the run's first recorded seed. ``spec`` is a FeatureSpec or its text (``DIR@20x+5x``), by
    default the one the run was trained on; its magnifications must be the run's. The slide must be the file the
    features were made from.
    """
    import torch

    from mil.bags import load_bag
    from mil.cv import load_fold_model

    model, record = load_fold_model(run_dir, fold, seed)
    trained = record.feature_spec
    spec = trained if spec is None else FeatureSpec.parse(spec)  # a FeatureSpec from the command passes through
    if trained.mags != spec.mags:
        raise ConfigError(f"fold {fold} of {run_dir} was trained on {trained}, not on {spec}: pass --features "
                          f"DIR@{trained.mags_text}")
    slide_id = Path(slide_path).stem
    with FeatureFile(spec.path(slide_id)) as f:
        check_slide_identity(f, slide_path)
    bag = load_bag(spec, slide_id)
    with torch.no_grad():
        out = model(bag.features.float().unsqueeze(0))  # a batch of one bag; the model is in eval mode
    attention = out.attention.detach().float().cpu().numpy().reshape(-1)
    if attention.shape[0] != len(bag.coords_level0):
        raise DataError(f"model of fold {fold} returned {attention.shape[0]} attention values for "
                        f"{len(bag.coords_level0)} tiles of {spec.path(bag.slide_id)}")
    return spec, bag.coords_level0, attention


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

    with atomic_write(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def build_heatmap(run_dir: str | Path, fold: int, slide_path: str | Path, spec, out_png: str | Path | None, *,
                  seed: int | None = None, top: int = 16, max_size: int = 2048, alpha: float = 0.5,
                  patch_px: int = PATCH_SIZE) -> HeatmapResult:
    """Write the heatmap PNG and ``<stem>_top.png`` (the ``top`` most attended patches at the finest mag).

    ``spec`` None = the fold's own feature set; ``seed`` None = the run's first recorded seed; ``out_png`` None =
    ``<run>/heatmaps/<slide_id>_fold<k>.png`` (``<slide_id>_seed<s>_fold<k>.png`` in a run of several seeds).
    The scale comes from the feature file (its base magnification and tile sizes), so a slide without
    usable metadata needs no ``--base-mag``.
    """
    if top < 1 or max_size < 16 or not 0 < alpha <= 1:
        raise ConfigError(f"bad heatmap settings (top={top}, max_size={max_size}, alpha={alpha}): "
                          "use top >= 1, max size >= 16, 0 < alpha <= 1")
    seeds = read_record(run_dir).seeds
    seed = seeds[0] if seed is None else seed
    spec, coords, attention = attention_map(run_dir, fold, slide_path, spec, seed)
    slide_id = Path(slide_path).stem
    if out_png is None:
        which = f"seed{seed}_fold{fold}" if len(seeds) > 1 else f"fold{fold}"
        out_png = Path(run_dir) / "heatmaps" / f"{slide_id}_{which}.png"
    out_png = Path(out_png)
    top_png = out_png.with_name(f"{out_png.stem}_top.png")
    mag = spec.mags[0]
    with FeatureFile(spec.path(slide_id)) as f:
        base_mag = f.base_magnification
        tile_level0 = f.grid().patch_size_level0.get(mag) or None
    if base_mag is None:
        raise DataError(f"{spec.path(slide_id)} records no base magnification: extract the slide again")
    tile_level0 = tile_level0 or mag.level0_size(base_mag)
    order = np.argsort(-attention, kind="stable")[: min(top, len(attention))]
    with Slide(slide_path, base_mag=base_mag) as slide:
        thumb = slide.thumbnail(max_size)
        size = (slide.info.width, slide.info.height)
        patches = [slide.read_patch(int(coords[i, 0]), int(coords[i, 1]), mag, patch_px) for i in order]
    _save_png(out_png, render_heatmap(thumb, coords, tile_level0, size, attention_percentiles(attention), alpha))
    _save_png(top_png, montage(patches))
    return HeatmapResult(out_png, top_png, seed, fold, len(attention), tuple(int(i) for i in order))
