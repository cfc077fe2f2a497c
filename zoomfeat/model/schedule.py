"""Noise schedule of the official LatentDiffusion (``register_schedule``) and the forward process.

Linear schedule in sqrt space: betas = linspace(sqrt(start), sqrt(end), T)**2 in float64, every derived
quantity computed in float64 and stored as float32 buffers under the official names.
"""

from __future__ import annotations

import numpy as np
import torch

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def linear_schedule(timesteps: int, linear_start: float, linear_end: float) -> dict[str, torch.Tensor]:
    """The 12 official schedule buffers, each float32 [timesteps]."""
    betas = np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    acp = np.cumprod(alphas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    values = {
        "betas": betas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": np.sqrt(acp),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
        "log_one_minus_alphas_cumprod": np.log(1.0 - acp),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
        "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
    }
    return {name: torch.tensor(values[name], dtype=torch.float32) for name in SCHEDULE_BUFFERS}


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] shaped [B, 1, ..., 1] to broadcast against a tensor with ``ndim`` dimensions."""
    return values.gather(0, t.to(values.device).long()).reshape(-1, *([1] * (ndim - 1)))


def q_sample(sqrt_acp: torch.Tensor, sqrt_one_minus_acp: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) z + sqrt(1 - abar_t) noise, for latents z [B,...] and integer timesteps t [B]."""
    return (extract(sqrt_acp, t, z.dim()).to(z.dtype) * z
            + extract(sqrt_one_minus_acp, t, z.dim()).to(z.dtype) * noise)
