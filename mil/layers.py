"""Building blocks of the MIL heads that also run with every parameter stacked over cross-validation folds.

A head normally holds ``weight`` [out, in]. The training engine (:mod:`mil.train`) calls the same head
with its parameters bound to tensors stacked over the folds it trains at once: ``weight``
[F, out, in], every activation then carries a leading fold axis [F, ...]. The blocks here accept both, and
their stacked form computes each fold's slice with the same kernels (batched matmul, grouped convolution,
row-wise reductions) whatever the number of folds, so a fold trained alone gives bit-identical numbers
to the same fold trained together with others. Two rules keep that true:

- no elementwise op whose vectorised and scalar code paths disagree in the last bit (``torch.sigmoid``,
  ``softplus``, ``log1p`` do on AVX-512): :class:`Sigmoid` and :func:`bce_with_logits` are written with
  ``exp``/``log``, whose two paths agree;
- randomness per fold: inside :func:`fold_generators`, :class:`Dropout` (and any head drawing random numbers
  through :func:`fold_randperm`) draws each fold's numbers from that fold's own generator.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

_STATE = threading.local()


@contextlib.contextmanager
def fold_generators(generators: list[torch.Generator]):
    """Within the block, stacked activations [F, ...] draw fold ``i``'s random numbers from ``generators[i]``."""
    previous = getattr(_STATE, "generators", None)
    _STATE.generators = list(generators)
    try:
        yield
    finally:
        _STATE.generators = previous


def active_generators() -> list[torch.Generator] | None:
    return getattr(_STATE, "generators", None)


def fold_randperm(n: int, device, stacked: bool) -> torch.Tensor:
    """A random permutation of ``n``: [F, n] (one per fold, from its generator) or [n]."""
    gens = active_generators()
    if not stacked or gens is None:
        return torch.randperm(n, device=device)
    return torch.stack([torch.randperm(n, generator=g, device=device) for g in gens])


def is_stacked(param: torch.Tensor, plain_dim: int) -> bool:
    return param.dim() > plain_dim


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias``; stacked ``weight`` [F, out, in] maps ``x`` [F, ..., in] fold by fold."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    folds, out_dim, in_dim = weight.shape
    flat = x.reshape(folds, -1, in_dim)
    if out_dim == 1:  # a batched matrix-vector product takes another kernel for one fold than for several
        y = (flat * weight).sum(-1, keepdim=True)
        y = y if bias is None else y + bias.unsqueeze(1)
    elif bias is None:
        y = torch.bmm(flat, weight.transpose(1, 2))
    else:
        y = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return y.reshape(*x.shape[:-1], out_dim)


def per_fold(param: torch.Tensor, plain_dim: int, x_dim: int) -> torch.Tensor:
    """A stacked ``param`` [F, *shape] viewed to broadcast against an activation [F, ..., *shape] of
    ``x_dim`` dimensions (a plain ``param`` is returned as is)."""
    if not is_stacked(param, plain_dim):
        return param
    return param.reshape(param.shape[0], *([1] * (x_dim - 1 - plain_dim)), *param.shape[1:])


class Linear(nn.Linear):
    """``nn.Linear`` (same state-dict names) that also maps stacked weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension that also takes stacked ``weight``/``bias`` [F, dim]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_stacked(self.weight, 1):
            return super().forward(x)
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        return y * per_fold(self.weight, 1, x.dim()) + per_fold(self.bias, 1, x.dim())


class Sigmoid(nn.Module):
    """``1 / (1 + exp(-x))``: the logistic function through ``exp`` (see the module docstring), with ``x``
    clamped at -80 first. Without the clamp exp(-x) overflows to inf for x < -88.7 in float32: the value is
    still 0, but its gradient is 0 * inf = NaN, and a gated-attention head on features of large scale (raw
    ZoomLDM U-Net features have a standard deviation of ~60) stopped with a NaN loss. At -80 the logistic
    function and its slope are below 2e-35, so the clamp changes nothing a float32 result can hold."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.reciprocal(1.0 + torch.exp(-torch.clamp(x, min=-80.0)))


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose stacked form draws each fold's mask from its own generator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if active_generators() is None:
            return F.dropout(x, self.p, True)
        noise = torch.stack([torch.rand(x.shape[1:], generator=g, device=x.device) for g in active_generators()])
        return x * (noise >= self.p).to(x.dtype) * (1.0 / (1.0 - self.p))  # rand + compare: faster than bernoulli_


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     padding: tuple[int, int]) -> torch.Tensor:
    """Depthwise 2-D convolution of ``x`` [..., C, H, W] with ``weight`` [C, 1, kh, kw] (or stacked
    [F, C, 1, kh, kw] with ``x`` [F, ..., C, H, W]: one grouped convolution over F * C channels)."""
    if weight.dim() == 4:
        channels = weight.shape[0]
        flat = x.reshape(-1, channels, *x.shape[-2:])
        return F.conv2d(flat, weight, bias, padding=padding, groups=channels).reshape(x.shape)
    folds, channels = weight.shape[:2]
    inner = x.shape[1:-3]
    flat = x.reshape(folds, -1, channels, *x.shape[-2:]).transpose(0, 1).reshape(-1, folds * channels,
                                                                                 *x.shape[-2:])
    y = F.conv2d(flat, weight.reshape(folds * channels, 1, *weight.shape[-2:]),
                 None if bias is None else bias.reshape(-1), padding=padding, groups=folds * channels)
    y = y.reshape(-1, folds, channels, *x.shape[-2:]).transpose(0, 1)
    return y.reshape(folds, *inner, channels, *x.shape[-2:])


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over instances; padded positions (``mask`` False) get weight 0."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=dim)


def bce_with_logits(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise binary cross-entropy of logits: ``max(z, 0) - z t + log(1 + exp(-|z|))``."""
    return torch.clamp(z, min=0) - z * target + torch.log(1.0 + torch.exp(-z.abs()))
