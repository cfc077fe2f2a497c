"""Deterministic DDIM and PLMS samplers (eta 0) with classifier-free guidance, as the official samplers.

Timesteps: the official 'uniform' DDIM discretisation, ``range(0, T, T // steps) + 1`` (1, 101, ..., 901 for
10 of 1000 steps), visited from the last; alpha_prev of the first visited step is alphas_cumprod[0].
Guidance: eps = eps_u + g (eps_c - eps_u) with the unconditional context given by the caller (zeros for
ZoomLDM); with g == 1 only the conditional pass runs. A sampler is registered in :data:`SAMPLERS`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from zoomfeat.errors import ConfigError

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, context) -> eps
SAMPLERS: dict[str, Callable] = {}


def register_sampler(name: str):
    def wrap(fn):
        SAMPLERS[name] = fn
        return fn
    return wrap


def ddim_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """The official 'uniform' DDIM timesteps, ascending: range(0, T, T // steps) + 1."""
    if not 0 < steps <= num_timesteps:
        raise ConfigError(f"sampler steps must be in 1..{num_timesteps}, got {steps}")
    timesteps = np.arange(0, num_timesteps, num_timesteps // steps) + 1
    if len(timesteps) != steps or timesteps[-1] >= num_timesteps:
        # e.g. 3 of 1000: the official spacing gives 1, 334, 667, 1000, one step too many and past the schedule
        good = [s for s in (10, 20, 25, 50, 100, 200, 250) if s <= num_timesteps and num_timesteps % s == 0]
        raise ConfigError(f"--steps {steps} does not divide the {num_timesteps}-step schedule evenly (the official "
                          f"DDIM spacing would take {len(timesteps)} steps, the last past the schedule): use a "
                          f"divisor such as {', '.join(map(str, good[:5]))}")
    return timesteps


class _Schedule:
    """alpha_t, alpha_prev per DDIM index (float32, as the official sampler computes them)."""

    def __init__(self, alphas_cumprod: torch.Tensor, steps: int):
        acp = alphas_cumprod.detach().float().cpu()
        self.timesteps = ddim_timesteps(len(acp), steps)
        self.alphas = acp[self.timesteps]
        self.alphas_prev = torch.cat([acp[:1], acp[self.timesteps[:-1]]])
        self.sqrt_one_minus = torch.sqrt(1.0 - self.alphas)

    def step(self, x: torch.Tensor, eps: torch.Tensor, index: int) -> torch.Tensor:
        """x_prev = sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev) * eps (eta 0)."""
        a_t = float(self.alphas[index])
        a_prev = float(self.alphas_prev[index])
        pred_x0 = (x - float(self.sqrt_one_minus[index]) * eps) / a_t**0.5
        return a_prev**0.5 * pred_x0 + (1.0 - a_prev) ** 0.5 * eps


def guided_eps(eps_fn: EpsFn, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
               uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free-guided eps; one batched pass over [uncond; cond] when guidance != 1."""
    if guidance == 1.0:
        return eps_fn(x, t, context)
    e_u, e_c = eps_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, context])).chunk(2)
    return e_u + guidance * (e_c - e_u)


def _time(step: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), int(step), device=x.device, dtype=torch.long)


@register_sampler("ddim")
def ddim_sample(eps_fn: EpsFn, alphas_cumprod: torch.Tensor, x_T: torch.Tensor, context: torch.Tensor,
                uncond: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    """DDIM (eta 0) from x_T [B,C,h,w] to a clean latent."""
    sched = _Schedule(alphas_cumprod, steps)
    x = x_T
    n = len(sched.timesteps)
    for i, step in enumerate(sched.timesteps[::-1]):
        eps = guided_eps(eps_fn, x, _time(step, x), context, uncond, guidance)
        x = sched.step(x, eps, n - i - 1)
    return x


def _plms_eps(e_t: torch.Tensor, old: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the current and previous eps (orders 2-4)."""
    if len(old) == 1:
        return (3 * e_t - old[-1]) / 2
    if len(old) == 2:
        return (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
    return (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24


@register_sampler("plms")
def plms_sample(eps_fn: EpsFn, alphas_cumprod: torch.Tensor, x_T: torch.Tensor, context: torch.Tensor,
                uncond: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    """PLMS (pseudo linear multistep) from x_T; the first step is a pseudo improved-Euler step."""
    sched = _Schedule(alphas_cumprod, steps)
    times = sched.timesteps[::-1]
    n = len(times)
    x, old = x_T, []
    for i, step in enumerate(times):
        index = n - i - 1
        e_t = guided_eps(eps_fn, x, _time(step, x), context, uncond, guidance)
        if not old:
            x_next = sched.step(x, e_t, index)
            t_next = times[min(i + 1, n - 1)]
            e_next = guided_eps(eps_fn, x_next, _time(t_next, x), context, uncond, guidance)
            e_prime = (e_t + e_next) / 2
        else:
            e_prime = _plms_eps(e_t, old)
        x = sched.step(x, e_prime, index)
        old = (old + [e_t])[-3:]
    return x
