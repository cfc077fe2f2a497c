"""Condition inversion (ZoomLDM §4.4 and its supplement): conditioning for an image that has no slide.

Given one patch image at magnification M, find a raw SSL grid (``M.grid_width`` x ``M.grid_width`` vectors of the
conditioner's width, as UNI would give) such that the FROZEN model denoises the image's latent well under the
grid's context. The grid goes through the model's own preprocessing (pooled to at most 8x8, standardised per
location: :meth:`ZoomLDM.preprocess_ssl`) and the Summarizer, exactly as a real grid does, so the result is a grid
in the conditioner's space that every other command accepts (it is saved in the conditioning file format).

Objective (the supplement's stated settings; its notebook is missing upstream, so this follows the text):

    L(g) = w(t) * mean((eps - eps_theta(sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, c(g)))^2)
           - W * mean_{i<j} cos(g_i, g_j),          w(t) = sqrt(abar_t) (1 - abar_t),  W = 0.05

optimised by Adam (lr 0.1) for 200 iterations, one timestep per iteration annealed linearly from 950 to 50 (the
supplement's; 0-based, ``linspace(t_high, t_low, iterations)`` rounded), fresh noise each iteration from a
seeded generator. The similarity term is the supplement's prior, "a penalty that maximizes the similarity
between the different vectors": with W > 0 it pulls the grid's vectors together (what makes the cells of an
inverted grid usable independently in super-resolution); W = 0 turns it off, and W < 0 pushes the vectors
apart (a diversity penalty, not the paper's). Only the grid receives gradients.

Because the timestep changes every iteration, the training loss is not comparable across iterations; the loss
CURVE reported is therefore a fixed probe: the same weighted denoising loss on a fixed set of timesteps and noise
draws, evaluated every ``eval_every`` iterations (and at the start and the end).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from zoomfeat.errors import ConfigError, DataError
from zoomfeat.mags import CONDITIONING_MAG, Magnification


@dataclass(frozen=True)
class InversionSettings:
    """Inversion hyper-parameters (defaults: the paper's), validated on construction."""

    iterations: int = 200
    lr: float = 0.1
    similarity: float = 0.05  # W: > 0 pulls the vectors together (the supplement's prior), < 0 pushes them apart
    t_high: int | None = 950  # None: the last timestep (T - 1)
    t_low: int = 50
    noise_batch: int = 1  # noise draws per iteration (all at the iteration's timestep)
    probe_timesteps: int = 8  # timesteps of the fixed probe loss (the reported curve)
    probe_draws: int = 1  # noise draws per probe timestep
    eval_every: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "noise_batch", "probe_timesteps", "probe_draws", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"inversion {name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ConfigError(f"inversion learning rate must be a positive number, got {self.lr!r}")
        if not np.isfinite(self.similarity):
            raise ConfigError(f"inversion similarity weight must be a finite number, got {self.similarity!r}")
        if self.t_low < 0 or (self.t_high is not None and self.t_high < self.t_low):
            raise ConfigError(f"inversion timesteps must satisfy 0 <= t_low <= t_high, got {self.t_low}, "
                              f"{self.t_high}")


@dataclass
class InversionResult:
    """The inverted raw grid [C, g, g] (float32, CPU), the per-iteration training losses and timesteps, and the
    probe curve (iteration, weighted denoising loss on fixed timesteps and noise)."""

    grid: torch.Tensor
    mag: Magnification
    losses: list[float]
    timesteps: list[int]
    probe: list[tuple[int, float]] = field(default_factory=list)

    @property
    def probe_losses(self) -> list[float]:
        return [v for _, v in self.probe]


def inversion_timesteps(num_timesteps: int, settings: InversionSettings) -> np.ndarray:
    """One 0-based timestep per iteration, linearly from ``t_high`` (default 950) down to ``t_low`` (default 50)."""
    high = num_timesteps - 1 if settings.t_high is None else settings.t_high
    if high >= num_timesteps or settings.t_low >= num_timesteps:
        raise ConfigError(f"inversion timesteps {high} -> {settings.t_low} go beyond the model's {num_timesteps} "
                          f"timesteps (0-based): lower --t-high/--t-low")
    return np.rint(np.linspace(high, settings.t_low, settings.iterations)).astype(np.int64)


def loss_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sqrt(abar_t) (1 - abar_t) per timestep (0-based)."""
    a = alphas_cumprod.to(t.device)[t.long()].float()
    return a.sqrt() * (1.0 - a)


def mean_pairwise_cosine(grid: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over the distinct pairs of a grid's vectors ([C, h, w] -> scalar; 0 for one vector)."""
    v = grid.reshape(grid.shape[0], -1).t()
    n = len(v)
    if n < 2:
        return grid.sum() * 0.0
    u = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = u @ u.t()
    return (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))


def grid_context(model, grids: torch.Tensor | list[torch.Tensor], mag: Magnification) -> torch.Tensor:
    """Contexts [B, 65, D] of raw grids (each [C, g, g]) at ``mag``: the model's preprocessing, then the Summarizer."""
    grids = list(grids)
    mags = torch.full((len(grids),), mag.index, dtype=torch.long, device=model.alphas_cumprod.device)
    return model.summarize([model.preprocess_ssl(g) for g in grids], mags)


def denoising_loss(model, z: torch.Tensor, context: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   autocast: Callable | None = None) -> torch.Tensor:
    """Weighted noise-prediction error per sample [B]: w(t) * mean((noise - eps_theta(x_t, t, c))^2).

    ``z`` [1 or B, C, h, w], ``context`` [1 or B, 65, D], ``t`` [B] (0-based), ``noise`` [B, C, h, w]."""
    b = len(t)
    z = z.expand(b, *z.shape[1:])
    context = context.expand(b, *context.shape[1:])
    x_t = model.q_sample(z, t, noise)
    with (autocast or contextlib.nullcontext)():
        eps = model.unet(x_t, t, context).float()
    return loss_weight(model.alphas_cumprod, t) * ((noise - eps) ** 2).mean(dim=(1, 2, 3))


class Probe:
    """The fixed evaluation of the inversion objective: ``timesteps`` spread over [t_low, t_high] and one seeded
    noise draw per (timestep, draw), the same for every grid evaluated."""

    def __init__(self, model, z: torch.Tensor, settings: InversionSettings, autocast: Callable | None = None):
        high = model.num_timesteps - 1 if settings.t_high is None else min(settings.t_high, model.num_timesteps - 1)
        k = settings.probe_timesteps
        t = np.rint(np.linspace(settings.t_low, high, k + 2)[1:-1] if k > 1 else [(settings.t_low + high) / 2])
        t = np.repeat(t.astype(np.int64), settings.probe_draws)
        gen = torch.Generator().manual_seed(settings.seed + 1_000_003)
        self.model, self.z, self.autocast = model, z, autocast
        self.t = torch.from_numpy(t).to(z.device)
        self.noise = torch.randn((len(t), *z.shape[1:]), generator=gen).to(z.device)

    @torch.no_grad()
    def __call__(self, context: torch.Tensor) -> float:
        """Mean weighted denoising loss of one context [1, 65, D]."""
        return float(denoising_loss(self.model, self.z, context, self.t, self.noise, self.autocast).mean())


@contextlib.contextmanager
def frozen(model):
    """Every model parameter without gradients for the body (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def initial_grid(model, mag: Magnification, seed: int) -> torch.Tensor:
    """Standard-normal raw grid [C, g, g] from ``torch.Generator().manual_seed(seed)`` (CPU, float32)."""
    g = mag.grid_width
    return torch.randn((model.conditioning_dim, g, g), generator=torch.Generator().manual_seed(seed))


def invert_latent(model, z: torch.Tensor, mag: Magnification, settings: InversionSettings = InversionSettings(), *,
                  init: torch.Tensor | None = None, autocast: Callable | None = None,
                  progress: Callable[[int], None] | None = None) -> InversionResult:
    """Invert the conditioning of one clean latent ``z`` [1, C, h, w] (on the model's device) at ``mag``."""
    if z.dim() != 4 or len(z) != 1:
        raise DataError(f"inversion takes one latent [1, C, h, w], got {list(z.shape)}")
    device = z.device
    grid = (initial_grid(model, mag, settings.seed) if init is None else init.detach().float().clone()).to(device)
    if grid.shape != (model.conditioning_dim, mag.grid_width, mag.grid_width):
        raise DataError(f"initial grid {list(grid.shape)} does not match a {mag} grid "
                        f"[{model.conditioning_dim}, {mag.grid_width}, {mag.grid_width}]")
    grid.requires_grad_(True)
    optimiser = torch.optim.Adam([grid], lr=settings.lr)
    steps = inversion_timesteps(model.num_timesteps, settings)
    gen = torch.Generator().manual_seed(settings.seed)
    probe = Probe(model, z, settings, autocast)
    result = InversionResult(grid=grid, mag=mag, losses=[], timesteps=[int(t) for t in steps])
    with frozen(model), torch.enable_grad():
        result.probe.append((0, probe(grid_context(model, [grid.detach()], mag))))
        for i, step in enumerate(steps):
            t = torch.full((settings.noise_batch,), int(step), dtype=torch.long, device=device)
            noise = torch.randn((settings.noise_batch, *z.shape[1:]), generator=gen).to(device)
            context = grid_context(model, [grid], mag)
            loss = denoising_loss(model, z, context, t, noise, autocast).mean()
            if settings.similarity:
                loss = loss - settings.similarity * mean_pairwise_cosine(grid)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            value = float(loss.detach())
            if not np.isfinite(value):
                raise DataError(f"inversion diverged at iteration {i + 1} (loss {value}); lower the learning rate")
            result.losses.append(value)
            if (i + 1) % settings.eval_every == 0 or i + 1 == len(steps):
                result.probe.append((i + 1, probe(grid_context(model, [grid.detach()], mag))))
            if progress is not None:
                progress(1)
    result.grid = grid.detach().float().cpu()
    return result


def image_latent(model, image: np.ndarray) -> torch.Tensor:
    """Clean latent [1, C, h, w] of one uint8 RGB patch [H, W, 3] (square; resized to the first stage's
    resolution as extraction does, scaled to [-1, 1]); on the model's device."""
    from zoomfeat.extract.zoomldm import to_model_input

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"inversion takes a uint8 RGB image [H, W, 3], got {image.dtype} {list(image.shape)}")
    if image.shape[0] != image.shape[1]:
        raise DataError(f"inversion takes one square patch, got {image.shape[1]}x{image.shape[0]} px: "
                        f"use `zoomfeat superres` for larger images (it tiles them)")
    device = model.alphas_cumprod.device
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(device)
    with torch.no_grad():
        return model.encode_first_stage(to_model_input(x, model.first_stage_resolution)).float()


def invert_image(model, image: np.ndarray, mag: Magnification, settings: InversionSettings = InversionSettings(),
                 **kw) -> InversionResult:
    """:func:`invert_latent` of a uint8 RGB patch image."""
    return invert_latent(model, image_latent(model, image), mag, settings, **kw)


# ----- the conditioning file of an inverted grid -----------------------------------------------------------------
def grid_tile_coords(g: int, tile: int = 256) -> np.ndarray:
    """Level-0 (x, y) corners of the g x g 20x tiles of one patch at level 0 = 20x, row-major."""
    ys, xs = np.mgrid[0:g, 0:g]
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1).astype(np.int64) * tile


def save_grid(path, result: InversionResult, provenance: dict) -> "Path":
    """Write the inverted grid as a conditioning file (the format ``extract --conditioning`` reads): a feature file
    of a 20x-based pseudo-slide whose ``20x`` group holds one row per grid cell (tile corners from
    :func:`grid_tile_coords`); ``extractor`` = "inversion", ``extractor_config`` = settings, loss curve, provenance."""
    from pathlib import Path

    from zoomfeat.store import write_feature_file

    path = Path(path)
    grid = result.grid.numpy()
    c, g, _ = grid.shape
    config = {"method": "inversion", "magnification": str(result.mag), "grid_width": g, "dim": c,
              "losses": result.losses, "timesteps": result.timesteps, "probe": result.probe, **provenance}
    return write_feature_file(path.parent, path.name[:-3] if path.name.endswith(".h5") else path.stem,
                              {CONDITIONING_MAG: grid.reshape(c, g * g).T}, {CONDITIONING_MAG: grid_tile_coords(g)},
                              base_magnification=20.0, extractor="inversion", extractor_config=config,
                              slide_path=provenance.get("image"))


def load_grid(path) -> tuple[torch.Tensor, Magnification, dict]:
    """(raw grid [C, g, g], magnification, extractor_config) of a file written by :func:`save_grid`."""
    from pathlib import Path

    from zoomfeat.store import FeatureFile

    path = Path(path)
    with FeatureFile(path) as f:
        config = f.extractor_config or {}
        if f.extractor != "inversion" or CONDITIONING_MAG not in f.mags:
            raise DataError(f"{path} is not an inverted grid (written by `zoomfeat invert`)")
        coords, feats = f.coords(CONDITIONING_MAG), f.features(CONDITIONING_MAG)
    g = int(config["grid_width"])
    if len(coords) != g * g or not np.array_equal(coords, grid_tile_coords(g)):
        raise DataError(f"{path}: its 20x tiles do not form the {g}x{g} grid it declares")
    grid = torch.from_numpy(np.ascontiguousarray(feats.T.reshape(-1, g, g)))
    return grid, Magnification(config["magnification"]), config
