"""Where generation conditions come from, and the context sources registry.

A *context source* turns a :class:`ConditionRequest` into :class:`Conditions`: Summarizer contexts
[P, 65, D] for one magnification, plus what is needed to record them. Sources are registered with
:func:`register_context_source` in :data:`CONTEXT_SOURCES` (the commands' choices come from it); a new source,
e.g. a CDM that draws contexts instead of reading them (``--cdm DIR``), is one decorated function
``fn(model, request, runtime) -> Conditions``. The grid -> context function is :func:`contexts_for_mag`.

The built-in ``"grid"`` source reads real conditions: the raw 20x embedding grid under each requested patch of
a slide, from

* the slide itself: patches at ``mag`` given by level-0 ``coords`` or the first tissue patches of its tile
  grid (made on the fly, or read from a tile store ``tiles_dir``), their 20x tiles embedded by the conditioner
  (``uni=PATH`` or ``toy``), reusing the conditioning tables of extraction (:mod:`zoomfeat.conditioning`);
* a saved conditioning folder (``conditioning_dir``, written by ``zoomfeat extract``): no conditioner runs;
* a generation manifest's own saved grids (:func:`conditions_from_saved`), so an image is regenerated without
  the slide.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from zoomfeat.errors import ConfigError, DataError
from zoomfeat.mags import CONDITIONING_MAG, Magnification, parse_mag

CONTEXT_SOURCES: dict[str, Callable] = {}


def register_context_source(name: str):
    """Decorator: ``@register_context_source("cdm") def fn(model, request, runtime) -> Conditions``."""
    def wrap(fn):
        CONTEXT_SOURCES[name] = fn
        return fn
    return wrap


@dataclass(frozen=True)
class ConditionRequest:
    """What to condition on: a slide and patches at ``mag`` (``coords`` level-0 (x, y) corners, or the first
    ``n_patches`` tissue patches), where the embeddings come from, and the slide overrides."""

    mag: Magnification
    slide: Path | None = None
    coords: tuple[tuple[int, int], ...] | None = None
    n_patches: int = 1
    tiles_dir: Path | None = None
    conditioning_dir: Path | None = None
    conditioner: str = "uni"
    conditioner_weights: Path | None = None
    toy_seed: int = 0
    base_mag: float | None = None
    mpp: float | None = None
    tissue: object = None  # zoomfeat.tissue.TissueParams (None: the defaults)
    batch_size: int = 32
    extra: dict = field(default_factory=dict)  # options of sources added later (e.g. a CDM folder)


@dataclass
class Conditions:
    """Contexts of P patches at ``mag`` and their provenance; ``grids`` (raw, float32 [P, C, g, g]) and
    ``coords_level0`` (int64 [P, 2]) when they come from a slide, None for drawn contexts."""

    mag: Magnification
    contexts: torch.Tensor
    grids: np.ndarray | None
    coords_level0: np.ndarray | None
    record: dict


def contexts_for_mag(model, grids: np.ndarray | torch.Tensor, mag) -> torch.Tensor:
    """Summarizer contexts [P, 65, D] of raw grids [P, C, g, g] at ``mag`` (``preprocess_ssl`` then ``summarize``)."""
    mag = parse_mag(mag)
    device = model.alphas_cumprod.device
    g = torch.as_tensor(np.asarray(grids, dtype=np.float32)) if not isinstance(grids, torch.Tensor) else grids
    g = g.to(device)
    if g.dim() != 4 or g.shape[1] != model.conditioning_dim:
        raise DataError(f"conditioning grids must be [P, {model.conditioning_dim}, g, g], got {tuple(g.shape)}: "
                        "use the conditioner the checkpoint was trained with")
    prepped = [model.preprocess_ssl(x) for x in g]
    mags = torch.full((len(prepped),), mag.index, dtype=torch.long, device=device)
    with torch.no_grad():
        return model.summarize(prepped, mags)


def tile_contexts_20x(model, grid: np.ndarray) -> torch.Tensor:
    """Contexts [g*g, 65, D] of the 20x tiles of one raw grid [C, g, g], row-major (each its own [C,1,1] grid)."""
    c, gh, gw = grid.shape
    tiles = np.ascontiguousarray(np.asarray(grid, np.float32).transpose(1, 2, 0).reshape(gh * gw, c, 1, 1))
    return contexts_for_mag(model, tiles, CONDITIONING_MAG)


def _tile_grid(slide, request: ConditionRequest):
    from zoomfeat.store import h5_path, is_complete, read_grid
    from zoomfeat.tiling import make_grid
    from zoomfeat.tissue import TissueParams

    name = request.mag.name
    if request.tiles_dir is None:
        grid = make_grid(slide, [request.mag], request.tissue or TissueParams())
    else:
        path = h5_path(request.tiles_dir, slide.info.slide_id)
        if not is_complete(path):
            raise DataError(f"no complete tile store {path}: run `zoomfeat tile` for this slide or drop --tiles")
        grid = read_grid(path)
        if name not in grid.coords:
            raise DataError(f"tile store {path} has no {name} tiles: re-run `zoomfeat tile --mags {name}` or drop --tiles")
    return np.asarray(grid.coords.get(name, np.zeros((0, 2), np.int64)), np.int64).reshape(-1, 2)


def select_patches(slide, request: ConditionRequest) -> np.ndarray:
    """Level-0 corners int64 [P, 2] of the requested patches, checked against the slide's extent."""
    info = slide.info
    size = request.mag.level0_size(info.base_magnification)
    if request.coords:
        coords = np.asarray(request.coords, dtype=np.int64).reshape(-1, 2)
        for x, y in coords:
            if x < 0 or y < 0 or x + size > info.width or y + size > info.height:
                raise DataError(f"{info.path}: a {request.mag.name} patch at level-0 ({x}, {y}) covers {size} px and "
                                f"leaves the {info.width}x{info.height} slide: give --x/--y inside it")
        return coords
    coords = _tile_grid(slide, request)
    if len(coords) == 0:
        raise DataError(f"{info.path}: no {request.mag.name} tissue patch (the slide is smaller than one {size}-px "
                        "patch or has no tissue): give --x/--y or another slide")
    return coords[: request.n_patches]


@register_context_source("grid")
def grid_source(model, request: ConditionRequest, runtime=None, encoder=None) -> Conditions:
    """Real conditions: the raw 20x embedding grids under the requested patches of ``request.slide``; ``encoder``:
    the conditioner already loaded by :func:`zoomfeat.extract.loading.load_conditioner` (a caller that asks for
    many regions loads it once), else it is loaded here."""
    from zoomfeat.conditioning import ConditioningGrids
    from zoomfeat.slides import Slide

    if request.slide is None:
        raise ConfigError("real conditions need a slide: pass --slide SLIDE")
    device = runtime.device if runtime is not None else "cpu"
    overrides = {"base_mag": request.base_mag, "mpp": request.mpp}
    with Slide(request.slide, **overrides) as slide:
        info = slide.info
        coords = select_patches(slide, request)
    name = request.mag.name
    if request.conditioning_dir is not None:
        from zoomfeat.extract.conditioning_io import read_conditioning

        cond = read_conditioning(Path(request.conditioning_dir), info, {name: coords}, model.conditioning_dim)
        embedder = {"conditioning_dir": str(request.conditioning_dir)}
    else:
        from zoomfeat.extract.loading import load_conditioner  # the one conditioner loader (reads the same fields)

        if encoder is None:
            encoder = load_conditioner(request, model.conditioning_dim).to(device)
        autocast = runtime.autocast() if runtime is not None else None
        cond = ConditioningGrids(info.path, {name: coords}, encoder, batch_size=request.batch_size, workers=0,
                                 device=device, base_mag=info.base_magnification, slide_kwargs=overrides,
                                 autocast=autocast)
        embedder = {"conditioner": request.conditioner, "toy_seed": request.toy_seed if request.conditioner == "toy"
                    else None, "conditioner_weights": str(request.conditioner_weights)
                    if request.conditioner_weights else None}
    grids = cond.grid(name)
    record = {"source": "grid", "slide": str(info.path), "slide_id": info.slide_id,
              "base_magnification": info.base_magnification, "mag": name,
              "coords_level0": coords.tolist(), "tiles_dir": str(request.tiles_dir) if request.tiles_dir else None,
              **embedder}
    return Conditions(request.mag, contexts_for_mag(model, grids, request.mag), grids, coords, record)


def conditions_from_saved(model, grids: np.ndarray, mag, coords_level0=None, record: dict | None = None) -> Conditions:
    """Conditions from saved raw grids [P, C, g, g] (a manifest's ``conditions.npz``)."""
    mag = parse_mag(mag)
    coords = None if coords_level0 is None else np.asarray(coords_level0, np.int64).reshape(-1, 2)
    return Conditions(mag, contexts_for_mag(model, grids, mag), np.asarray(grids, np.float32), coords,
                      dict(record or {"source": "saved"}))


def context_source(name: str) -> Callable:
    if name not in CONTEXT_SOURCES:
        raise ConfigError(f"unknown condition source {name!r}: use one of {', '.join(sorted(CONTEXT_SOURCES))}")
    return CONTEXT_SOURCES[name]
