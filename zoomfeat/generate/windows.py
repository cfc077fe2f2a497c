"""Overlapping windows over a large latent: the Gaussian window, window offsets, and the MultiDiffusion
sampler that is both the ``grid`` method (Graikos et al. 2024, §3.2) and the official refinement pass.

Every step of :func:`denoise_windows` (1-based t, the official large-image update; see
the golden files' README of ``tests/test_generate_golden.py``, ``postprocess_image``):
``a = abar[t-1]``, ``a_prev = abar[max(t-1-stride, 0)]``, ``beta_tilde = beta[t-1] (1-a_prev)/(1-a)``; every
latent window gets its guided eps (large-image form, the condition interpolated at its position, see
:mod:`zoomfeat.generate.interpolate`) and its clean estimate ``x0_w = x_w/sqrt(a) - eps_w sqrt((1-a)/a)``;
x0 is the **uniform** average of the overlapping ``x0_w`` (MultiDiffusion); then
``eps = (x - sqrt(a) x0)/sqrt(1-a)`` and ``x <- sqrt(a_prev) x0 + sqrt(1-a_prev-beta_tilde) eps + sqrt(beta_tilde) n``
(noise at every step, the last included). Windows are processed ``batch_size`` at a time, so memory holds
the latent-sized sums and one batch of activations, whatever the image size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from zoomfeat.errors import ConfigError
from zoomfeat.generate.guidance import Guidance, guided_eps
from zoomfeat.generate.interpolate import embeddings_at, contexts_20x

NoiseFn = Callable[[tuple], torch.Tensor]  # shape -> standard normal tensor (CPU float32 or on the device)


def gaussian_kernel(size: int, mu: float = 0.0, sigma: float = 1.0) -> torch.Tensor:
    """The official window: grid linspace(-1, 1, size)^2, ``exp(-d^2/sigma^2)`` (no 1/2), divided by its max.
    float32 [size, size]."""
    ax = np.linspace(-1.0, 1.0, size)
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    d2 = (xx - mu) ** 2 + (yy - mu) ** 2
    k = np.exp(-d2 / sigma**2)
    return torch.from_numpy((k / k.max()).astype(np.float32))


def window_offsets(size: int, window: int, stride: int, what: str = "latent") -> list[int]:
    """Window starts ``0, stride, ...`` up to ``size - window``; the last start ``size - window`` is added when
    the stride does not reach it (the official code then leaves those pixels uncovered: 0/0)."""
    if size < window:
        raise ConfigError(f"{what} side {size} is smaller than the window {window}: use a larger region")
    if stride < 1:
        raise ConfigError(f"window stride must be >= 1, got {stride}")
    offsets = list(range(0, size - window + 1, stride))
    if offsets[-1] != size - window:
        offsets.append(size - window)
    return offsets


def window_grid(height: int, width: int, window: int, stride: int) -> np.ndarray:
    """(row, col) starts of every window, rows outer and columns inner. int64 [N, 2]."""
    rows, cols = window_offsets(height, window, stride), window_offsets(width, window, stride)
    return np.array([(r, c) for r in rows for c in cols], dtype=np.int64).reshape(-1, 2)


def large_image_timesteps(t_start: int, stride: int, num_timesteps: int) -> list[int]:
    """The 1-based t visited by the official helpers: ``range(t_start, 0, -stride)`` (1000, 950, ..., 50)."""
    if not 1 <= t_start <= num_timesteps:
        raise ConfigError(f"start timestep must be in 1..{num_timesteps} (1-based), got {t_start}")
    if stride < 1:
        raise ConfigError(f"timestep stride must be >= 1, got {stride}")
    return list(range(int(t_start), 0, -int(stride)))


@dataclass(frozen=True)
class StepCoefficients:
    """Schedule values of one official large-image step at 1-based t."""

    a: float
    a_prev: float
    beta_tilde: float

    @classmethod
    def at(cls, model, t: int, stride: int) -> StepCoefficients:
        acp, betas = model.alphas_cumprod.detach().cpu(), model.betas.detach().cpu()
        a = acp[t - 1]
        a_prev = acp[max(t - 1 - stride, 0)]
        beta_tilde = betas[t - 1] * (1 - a_prev) / (1 - a)
        return cls(float(a), float(a_prev), float(beta_tilde))

    def x0(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return x / self.a**0.5 - eps * ((1 - self.a) / self.a) ** 0.5

    def eps(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (x - self.a**0.5 * x0) / (1 - self.a) ** 0.5

    def step(self, x0: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - beta_tilde) eps + sqrt(beta_tilde) noise."""
        return (self.a_prev**0.5 * x0 + (1 - self.a_prev - self.beta_tilde) ** 0.5 * eps
                + self.beta_tilde**0.5 * noise.to(x0.device, x0.dtype))


class SeededNoise:
    """Standard normal draws from one seeded CPU generator (the same numbers on every device)."""

    def __init__(self, seed: int, device="cpu"):
        self.generator = torch.Generator().manual_seed(int(seed))
        self.device = device

    def __call__(self, shape: tuple) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator).to(self.device)


@dataclass
class WindowConditions:
    """Where the windows are and what conditions each: (row, col) starts and standardised 20x embeddings."""

    positions: np.ndarray  # int64 [N, 2]
    embeddings: np.ndarray  # float32 [N, D]

    @classmethod
    def from_grid(cls, grid, height: int, width: int, window: int, stride: int) -> WindowConditions:
        """Windows over an ``height x width`` latent conditioned on the raw 20x embedding grid [D, h, w]
        (one tile per ``window`` latent pixels)."""
        positions = window_grid(height, width, window, stride)
        return cls(positions, embeddings_at(grid, positions, window))


def windowed_x0(model, x: torch.Tensor, t: int, coef: StepCoefficients, windows: WindowConditions,
                window: int, guidance: Guidance, batch_size: int, autocast=None, tick=None) -> torch.Tensor:
    """Uniform average over overlapping windows of each window's clean estimate. Same shape as ``x``."""
    total = torch.zeros_like(x)
    count = torch.zeros_like(x[:1, :1])
    b = x.shape[0]
    for start in range(0, len(windows.positions), batch_size):
        pos = windows.positions[start:start + batch_size]
        crops = torch.cat([x[:, :, r:r + window, c:c + window] for r, c in pos])  # [n*b, C, w, w] (window-major)
        ctx = contexts_20x(model, windows.embeddings[start:start + batch_size]).repeat_interleave(b, dim=0)
        with autocast() if autocast else _null():
            eps = guided_eps(model, crops, t, ctx, guidance, "one_based").float()
        x0_w = coef.x0(crops, eps)
        for k, (r, c) in enumerate(pos):
            total[:, :, r:r + window, c:c + window] += x0_w[k * b:(k + 1) * b]
            count[:, :, r:r + window, c:c + window] += 1
        if tick is not None:
            tick(len(pos))
    return total / count


def denoise_windows(model, x: torch.Tensor, timesteps: list[int], stride: int, windows: WindowConditions,
                    guidance: Guidance, noise: NoiseFn, *, window: int | None = None, batch_size: int = 16,
                    autocast=None, tick=None, on_step=None) -> torch.Tensor:
    """Run the MultiDiffusion loop from ``x`` (noisy at ``timesteps[0]``) through every t of ``timesteps``."""
    window = int(window or model.config.diffusion.image_size)
    for k, t in enumerate(timesteps):
        if on_step is not None:
            on_step(k, t, x)
        coef = StepCoefficients.at(model, t, stride)
        with torch.no_grad():
            x0 = windowed_x0(model, x, t, coef, windows, window, guidance, batch_size, autocast, tick)
        x = coef.step(x0, coef.eps(x, x0), noise(tuple(x.shape)))
    return x


def renoise(model, x0: torch.Tensor, t0: int, noise: torch.Tensor) -> torch.Tensor:
    """``sqrt(abar[t0-1]) x0 + sqrt(1 - abar[t0-1]) n`` (1-based t0)."""
    a = float(model.alphas_cumprod[t0 - 1])
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise.to(x0.device, x0.dtype)


@dataclass(frozen=True)
class WindowSettings:
    """Settings of the windowed sampler. Defaults: the official refinement call (stride 100 from t0 300 in the
    golden harness; the paper's 20 steps of 50 for sampling from scratch), guidance w=2 in the large-image form,
    window stride a quarter window (16 latent px for 64-px latents)."""

    t_start: int = 1000
    stride: int = 50
    guidance: Guidance = Guidance(2.0, "large_image")
    window_stride: int | None = None
    batch_size: int = 16


def refine(model, latent: torch.Tensor, grid, settings: WindowSettings, noise: NoiseFn, **kw) -> torch.Tensor:
    """The official refinement pass: re-noise a stitched latent [B,C,H,W] to ``settings.t_start`` and denoise
    it with stride ``settings.stride``, every window conditioned on the raw 20x grid [D, h, w]."""
    window = model.config.diffusion.image_size
    windows = WindowConditions.from_grid(grid, latent.shape[-2], latent.shape[-1], window,
                                         settings.window_stride or window // 4)
    x = renoise(model, latent, settings.t_start, noise(tuple(latent.shape)))
    steps = large_image_timesteps(settings.t_start, settings.stride, model.num_timesteps)
    return denoise_windows(model, x, steps, settings.stride, windows, settings.guidance, noise,
                           batch_size=settings.batch_size, **kw)


def grid_sample(model, grid, settings: WindowSettings, noise: NoiseFn, batch: int = 1, **kw) -> torch.Tensor:
    """The ``grid`` method: a latent of ``h x w`` 20x tiles from pure noise, each window conditioned on the
    embedding grid [D, h, w] interpolated at its position, overlapping updates averaged at every step."""
    window = model.config.diffusion.image_size
    d, h, w = np.shape(grid)
    shape = (batch, model.latent_channels, h * window, w * window)
    windows = WindowConditions.from_grid(grid, shape[2], shape[3], window, settings.window_stride or window // 4)
    device = model.alphas_cumprod.device
    x = noise(shape).to(device)
    steps = large_image_timesteps(settings.t_start, settings.stride, model.num_timesteps)
    return denoise_windows(model, x, steps, settings.stride, windows, settings.guidance, noise,
                           batch_size=settings.batch_size, **kw)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
