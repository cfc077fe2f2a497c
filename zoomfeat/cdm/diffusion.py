"""The CDM's Gaussian diffusion, as the official CDM builds it (OpenAI improved-diffusion / DiT conventions).

``create_diffusion(respacing=None)``: 1000 steps of the ``squaredcos_cap_v2`` schedule, x0-prediction, learned-
range variance and the hybrid loss ``mse + vb`` (Nichol & Dhariwal 2021): ``vb`` is the variational-bound term
with the model mean frozen (it trains only the variance), in bits, KL(q(x_{t-1} | x_t, x0) || p) for t > 0 and the
discretised-Gaussian decoder NLL at t = 0. Respacing keeps a subset of the steps (``"200"`` as the official
evaluation); the respaced betas are ``1 - abar_k / abar_{k-1}`` and the model always receives the original
timestep. Sampling is DDIM with eta 0 (the last step returns the x0 prediction).

Schedules are computed in float64 and gathered to float32 per step, as the official code does. ``model`` below
is any callable ``model(x_t [B,C,T], t [B] original timesteps) -> [B, 2C, T]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from zoomfeat.errors import ConfigError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SCHEDULES = ("squaredcos_cap_v2", "linear")


def cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """``squaredcos_cap_v2``: beta_i = min(1 - f((i+1)/T) / f(i/T), max_beta), f(s) = cos^2((s+0.008)/1.008 pi/2)."""
    def f(s: np.ndarray) -> np.ndarray:
        return np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    i = np.arange(steps, dtype=np.float64)
    return np.minimum(1.0 - f((i + 1) / steps) / f(i / steps), max_beta)


def named_betas(schedule: str, steps: int) -> np.ndarray:
    if schedule == "squaredcos_cap_v2":
        return cosine_betas(steps)
    if schedule == "linear":  # the DDPM linear schedule, scaled to the number of steps
        scale = 1000 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    raise ConfigError(f"unknown noise schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")


def space_timesteps(num_timesteps: int, sections: str | int) -> list[int]:
    """Kept timesteps of a respacing such as ``"200"`` or ``"10,10"`` (sections of equal length, each strided
    evenly from its first to its last step, rounded half to even)."""
    counts = [int(sections)] if isinstance(sections, int) else [int(s) for s in str(sections).split(",") if s.strip()]
    size, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        length = size + (1 if i < extra else 0)
        if not 1 <= count <= length:
            raise ConfigError(f"cannot take {count} sampling steps from a section of {length} steps: "
                              f"use 1..{length}")
        stride = 1.0 if count <= 1 else (length - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += length
    return sorted(set(kept))


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] as float32 [B, 1, ...] (the official code gathers float64 tables, then casts)."""
    return values.to(t.device)[t.long()].float().reshape(-1, *([1] * (ndim - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) of data on 256 bins of width 2/255 in [-1, 1], the edge bins open-ended (beyond +-0.999)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


@dataclass(frozen=True)
class MeanVariance:
    """Output of :meth:`GaussianDiffusion.p_mean_variance`, each [B, C, T] float32."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_xstart: torch.Tensor


class GaussianDiffusion:
    """Forward process, learned-range posterior, hybrid loss and DDIM over ``betas`` (float64 [K]).

    ``timestep_map[k]`` is the original timestep of step ``k`` (the identity unless respaced); the model
    is called with it.
    """

    def __init__(self, betas: np.ndarray, timestep_map: list[int] | None = None, learn_sigma: bool = True):
        self.learn_sigma = learn_sigma
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ConfigError("diffusion betas must be a 1-D array in (0, 1]")
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(len(betas)))
        acp = np.cumprod(1.0 - betas)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        tables = {
            "betas": betas, "alphas_cumprod": acp, "alphas_cumprod_prev": acp_prev,
            "sqrt_alphas_cumprod": np.sqrt(acp), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp), "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1),
            "log_betas": np.log(betas), "posterior_variance": post_var,
            # fixed ("large") variance of a model that does not learn it: beta_t, with the posterior's at t = 0
            "fixed_log_variance": np.log(np.append(post_var[1], betas[1:])) if len(betas) > 1 else np.log(betas),
            # the posterior variance is 0 at t = 0: its log takes the t = 1 value there
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:]))
            if len(betas) > 1 else np.zeros(0),
            "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
            "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp),
        }
        self.tables = {k: torch.from_numpy(v) for k, v in tables.items()}

    def _at(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return _gather(self.tables[name], t, ndim)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timesteps of step indices ``t`` (what the network is conditioned on)."""
        return self.timestep_map.to(t.device)[t.long()].to(t.dtype)

    # -- forward process and posterior -------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        n = x_start.dim()
        return self._at("sqrt_alphas_cumprod", t, n) * x_start + self._at("sqrt_one_minus_alphas_cumprod", t, n) * noise

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
        n = x_t.dim()
        mean = self._at("posterior_mean_coef1", t, n) * x_start + self._at("posterior_mean_coef2", t, n) * x_t
        return mean, self._at("posterior_variance", t, n), self._at("posterior_log_variance_clipped", t, n)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        n = x_t.dim()
        recip, recipm1 = self._at("sqrt_recip_alphas_cumprod", t, n), self._at("sqrt_recipm1_alphas_cumprod", t, n)
        return (recip * x_t - x_start) / recipm1

    def p_mean_variance(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> MeanVariance:
        """p(x_{t-1} | x_t) from the network output [B, 2C, T] (x0 prediction, variance values v):
        ``log var = frac log(beta_t) + (1 - frac) log(clipped posterior var)``, ``frac = (v + 1) / 2``;
        without a learned variance the output is the x0 prediction [B, C, T] and the variance is fixed."""
        c, n = x_t.shape[1], x_t.dim()
        want = 2 * c if self.learn_sigma else c
        if output.shape[1] != want:
            raise ConfigError(f"the CDM returned {output.shape[1]} channels for {c}-channel inputs, the diffusion "
                              f"expects {want}: build both with the same learn_sigma")
        if self.learn_sigma:
            pred_xstart, v = output.float().split(c, dim=1)
            frac = (v + 1) / 2
            log_var = frac * self._at("log_betas", t, n) + (1 - frac) * self._at("posterior_log_variance_clipped", t, n)
        else:
            pred_xstart = output.float()
            log_var = self._at("fixed_log_variance", t, n).expand_as(pred_xstart)
        mean, _, _ = self.q_posterior(pred_xstart, x_t, t)
        return MeanVariance(mean, torch.exp(log_var), log_var, pred_xstart)

    # -- training -------------------------------------------------------------------------------------
    def vb_terms_bits(self, output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                      t: torch.Tensor) -> torch.Tensor:
        """Variational-bound term per sample [B] in bits: the KL for t > 0, the decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        p = self.p_mean_variance(output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, p.mean, 0.5 * p.log_variance)
        return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)

    def training_losses(self, model: ModelFn, x_start: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample ``mse`` (x0 target), ``vb`` (mean frozen, so it trains the variance only) and
        ``loss = mse + vb``, each float32 [B]; without a learned variance ``loss = mse`` (no ``vb``)."""
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, self.model_timesteps(t)).float()
        if not self.learn_sigma:
            mse = mean_flat((x_start.float() - output) ** 2)
            return {"mse": mse, "loss": mse}
        c = x_start.shape[1]
        pred_xstart, v = output.split(c, dim=1)
        vb = self.vb_terms_bits(torch.cat([pred_xstart.detach(), v], dim=1), x_start, x_t, t)
        mse = mean_flat((x_start.float() - pred_xstart) ** 2)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    # -- sampling -------------------------------------------------------------------------------------
    def ddim_step(self, model: ModelFn, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM (eta 0) step from step index ``k``: (next x, x0 prediction)."""
        t = torch.full((len(x),), k, dtype=torch.long, device=x.device)
        p = self.p_mean_variance(model(x, self.model_timesteps(t)), x, t)
        eps = self.predict_eps_from_xstart(x, t, p.pred_xstart)
        abar_prev = self._at("alphas_cumprod_prev", t, x.dim())
        return p.pred_xstart * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev) * eps, p.pred_xstart

    def ddim_steps(self, model: ModelFn, noise: torch.Tensor) -> Iterator[torch.Tensor]:
        """The sample after each step, from step K-1 down to 0 (the last one is the sample)."""
        x = noise.float()
        with torch.no_grad():
            for k in reversed(range(self.num_timesteps)):
                x, _ = self.ddim_step(model, x, k)
                yield x

    def ddim_sample(self, model: ModelFn, noise: torch.Tensor) -> torch.Tensor:
        x = noise
        for x in self.ddim_steps(model, noise):
            pass
        return x


def create_diffusion(respacing: str | int | None = None, steps: int = 1000,
                     schedule: str = "squaredcos_cap_v2", learn_sigma: bool = True) -> GaussianDiffusion:
    """The official CDM diffusion; ``respacing`` (``"200"``) keeps that many evenly spaced steps for sampling.
    ``learn_sigma=False`` is the official option of a fixed variance and the x0-MSE loss alone."""
    betas = named_betas(schedule, steps)
    if respacing in (None, "", steps, str(steps)):
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    kept = space_timesteps(steps, respacing)
    acp = np.cumprod(1.0 - betas)
    previous = np.append(1.0, acp[kept][:-1])
    return GaussianDiffusion(1.0 - acp[kept] / previous, kept, learn_sigma=learn_sigma)
