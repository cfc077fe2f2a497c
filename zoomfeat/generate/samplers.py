"""Batch patch sampling: contexts in, clean latents out (no files), DDIM/PLMS from the one sampler registry.

The samplers are the CompVis-style DDIM (eta 0) and PLMS of :mod:`zoomfeat.model.samplers` (registry
``zoomfeat.model.samplers.SAMPLERS``, which also gives the CLI choices): 0-based timesteps
``range(0, T, T // steps) + 1``, standard guidance ``e_u + s (e_c - e_u)`` with zeros as the unconditional
context. A large-image-form weight w is passed on as the equal standard scale ``1 + w``.

:func:`sample_patches` is the library call other stages use (e.g. regenerating every tile of a slide from its
own conditioning): contexts [N, 65, D] and one seed per patch in, latents [N, C, h, w] out. Each patch's
starting noise comes from its own seed (``torch.Generator().manual_seed(seed)``, CPU, float32), so a patch can
be regenerated alone; regenerating with the same batch size is bit-identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from zoomfeat.errors import ConfigError
from zoomfeat.generate.guidance import Guidance
from zoomfeat.model.samplers import SAMPLERS


def sampler_names() -> list[str]:
    return sorted(SAMPLERS)


@dataclass(frozen=True)
class SamplerSettings:
    """Patch sampler: ``sampler`` (a registry name), ``steps``, ``guidance`` (value + form)."""

    sampler: str = "ddim"
    steps: int = 50
    guidance: Guidance = field(default_factory=lambda: Guidance(2.0, "standard"))

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}: use one of {', '.join(sampler_names())}")
        if self.steps < 1:
            raise ConfigError(f"bad --steps {self.steps}: use 1 or more sampler steps")


def patch_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Starting noise x_T of one patch: float32 ``shape`` from ``torch.Generator().manual_seed(seed)`` (CPU)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


def latent_shape(model) -> tuple[int, int, int]:
    side = int(model.config.diffusion.image_size)
    return (int(model.latent_channels), side, side)


def sample_batch(model, contexts: torch.Tensor, x_T: torch.Tensor, settings: SamplerSettings, *,
                 autocast: Callable | None = None, tick: Callable[[int], None] | None = None) -> torch.Tensor:
    """One batch: contexts [B,65,D] + x_T [B,C,h,w] (on the model's device) -> clean latents (float32)."""
    if len(contexts) != len(x_T):
        raise ConfigError(f"{len(contexts)} contexts but {len(x_T)} starting latents")
    scale = settings.guidance.standard_scale

    def eps_fn(x, t, c):
        with (autocast or contextlib.nullcontext)():
            out = model.unet(x, t, c).float()
        if tick is not None:
            tick(len(x) // (2 if scale != 1.0 else 1))
        return out

    fn = SAMPLERS[settings.sampler]
    with torch.no_grad():
        return fn(eps_fn, model.alphas_cumprod, x_T.float(), contexts, torch.zeros_like(contexts),
                  settings.steps, scale)


def sample_patches(model, contexts: torch.Tensor, seeds: Sequence[int], settings: SamplerSettings, *,
                   batch_size: int = 8, autocast: Callable | None = None,
                   tick: Callable[[int], None] | None = None) -> torch.Tensor:
    """Latents [N,C,h,w] (CPU float32) for contexts [N,65,D] and one seed per patch, ``batch_size`` at a time.

    ``tick(n)`` is called after every network evaluation with the number of patches it advanced (a progress
    bar of steps x patches has ``steps * N`` ticks, plus N for PLMS's extra first evaluation).
    """
    if len(seeds) != len(contexts):
        raise ConfigError(f"{len(contexts)} contexts but {len(seeds)} seeds: give one seed per patch")
    if batch_size < 1:
        raise ConfigError(f"bad --batch-size {batch_size}: use 1 or more")
    shape = latent_shape(model)
    device = model.alphas_cumprod.device
    out = []
    for start in range(0, len(contexts), batch_size):
        ctx = contexts[start:start + batch_size].to(device)
        x_T = torch.stack([patch_noise(s, shape) for s in seeds[start:start + batch_size]]).to(device)
        out.append(sample_batch(model, ctx, x_T, settings, autocast=autocast, tick=tick).cpu())
    return torch.cat(out) if out else torch.zeros((0, *shape))


def network_evaluations(settings: SamplerSettings) -> int:
    """Network evaluations per patch (each a batched [uncond; cond] pass when guided)."""
    return settings.steps + (1 if settings.sampler == "plms" else 0)
