"""Classifier-free guidance and timestep conventions, both forms named explicitly.

Two conventions coexist in the official ZoomLDM code (as recorded in the golden files of ``tests/test_generate_golden.py``):

* ``"standard"`` guidance (the CompVis DDIM/PLMS samplers): ``eps = e_u + s (e_c - e_u)``, scale ``s``
  (2.0 in the notebooks); timesteps ``"zero_based"``: the U-Net gets the integer index t and the schedule entry
  is ``alphas_cumprod[t]``.
* ``"large_image"`` guidance (the official large-image helpers): ``eps = (1 + w) e_c - w e_u``, weight ``w``
  (2.0 there, which equals a standard scale of 3); timesteps ``"one_based"``: the U-Net gets the float value t
  itself (t = 1..T) and the schedule entry is ``alphas_cumprod[t - 1]``.

The unconditional context is always all zeros. :class:`Guidance` carries a value with its form, so a number
is never read in the wrong convention; ``Guidance.standard_scale`` converts (``s = 1 + w``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoomfeat.errors import ConfigError

GUIDANCE_FORMS = ("standard", "large_image")
TIME_CONVENTIONS = ("zero_based", "one_based")


@dataclass(frozen=True)
class Guidance:
    """A guidance value and the form it is written in (``"standard"``: s; ``"large_image"``: w)."""

    value: float = 2.0
    form: str = "standard"

    def __post_init__(self) -> None:
        if self.form not in GUIDANCE_FORMS:
            raise ConfigError(f"unknown guidance form {self.form!r}: use one of {', '.join(GUIDANCE_FORMS)}")
        if not float(self.value) == float(self.value) or abs(float(self.value)) == float("inf"):
            raise ConfigError(f"guidance must be a finite number, got {self.value!r}")

    @property
    def standard_scale(self) -> float:
        """The same guidance as a standard scale s (``e_u + s (e_c - e_u)``)."""
        return float(self.value) if self.form == "standard" else 1.0 + float(self.value)

    @property
    def needs_uncond(self) -> bool:
        """False when the combination is the plain conditional eps (s = 1, or w = 0)."""
        return self.standard_scale != 1.0

    def combine(self, e_c: torch.Tensor, e_u: torch.Tensor) -> torch.Tensor:
        """Guided eps from conditional and unconditional predictions, in this form's own arithmetic."""
        v = float(self.value)
        if self.form == "standard":
            return e_u + v * (e_c - e_u)
        return (v + 1.0) * e_c - v * e_u


def unet_time(t: float | int, batch: int, device, convention: str) -> torch.Tensor:
    """The tensor the U-Net receives for timestep ``t``: long t (``zero_based``) or float t (``one_based``)."""
    if convention == "zero_based":
        return torch.full((batch,), int(t), dtype=torch.long, device=device)
    if convention == "one_based":
        return torch.full((batch,), float(t), dtype=torch.float32, device=device)
    raise ConfigError(f"unknown timestep convention {convention!r}: use one of {', '.join(TIME_CONVENTIONS)}")


def schedule_index(t: int, convention: str) -> int:
    """Index into ``alphas_cumprod`` of timestep ``t`` (t itself, or t - 1 for ``one_based``)."""
    return int(t) if convention == "zero_based" else int(t) - 1


def guided_eps(model, x: torch.Tensor, t: float | int, context: torch.Tensor, guidance: Guidance,
               convention: str = "one_based") -> torch.Tensor:
    """Guided eps [B,C,h,w] of x_t [B,C,h,w] for contexts [B,65,D]; zeros as the unconditional context.

    With guidance one batched pass over ``[x; x]`` with ``[cond; 0]``; without (s = 1 or w = 0) only the
    conditional pass runs.
    """
    if not guidance.needs_uncond:
        return model.unet(x, unet_time(t, len(x), x.device, convention), context)
    tt = unet_time(t, 2 * len(x), x.device, convention)
    e_c, e_u = model.unet(torch.cat([x, x]), tt, torch.cat([context, torch.zeros_like(context)])).chunk(2)
    return guidance.combine(e_c, e_u)


@torch.no_grad()
def model_pred(model, x_t: torch.Tensor, t: int, context: torch.Tensor, w: float) -> torch.Tensor:
    """The official ``model_pred``: large-image guidance weight ``w``, the U-Net gets float t, EMA weights."""
    with model.ema_swap():
        return guided_eps(model, x_t, t, context, Guidance(w, "large_image"), "one_based")
