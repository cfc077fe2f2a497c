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
import math
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


class _Logistic(torch.autograd.Function):
    """The logistic function as one autograd node: forward through ``exp`` in place on one buffer, backward
    ``grad * s * (1 - s)`` from the saved output (autograd of the five elementwise ops costs ~3x as much)."""

    @staticmethod
    def forward(ctx, x):
        s = torch.clamp(x, min=-80.0).neg_().exp_().add_(1.0).reciprocal_()
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        return grad * (s - s * s)


class Sigmoid(nn.Module):
    """``1 / (1 + exp(-x))``: the logistic function through ``exp`` (see the module docstring), with ``x``
    clamped at -80 first. Without the clamp exp(-x) overflows to inf for x < -88.7 in float32: the value is
    still 0, but its gradient is 0 * inf = NaN, and a gated-attention head on features of large scale (raw
    ZoomLDM U-Net features have a standard deviation of ~60) stopped with a NaN loss. At -80 the logistic
    function and its slope are below 2e-35, so the clamp changes nothing a float32 result can hold (the
    gradient below -80 is that slope, not the clamp's 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Logistic.apply(x)


def keep_mask(shape: tuple[int, ...], p: float, generator: torch.Generator, device) -> torch.Tensor:
    """A dropout mask of ``shape``: 0 (dropped) or ``1 / (1 - p')``, float32, from ``generator``.

    Each element is a 16-bit slice of 64-bit random words: one word gives four elements, ~4x fewer and cheaper
    draws than ``torch.rand``'s one float per element (the masks were ~25% of a default ABMIL step). An element
    is dropped when its 16-bit value is among the lowest ``round(p * 65536)``, so the drop rate is
    ``p' = round(p * 65536) / 65536`` (exact for p = 0.25 or 0.5; within 8e-6 of p otherwise), and the kept
    elements are scaled by ``1 / (1 - p')`` so that the expectation is unchanged. ``random_(-2**63, None)``
    draws the full 64 bits; a plain ``random_()`` on int64 leaves the top bit 0, which would bias every fourth
    element."""
    n = math.prod(shape)
    dropped = round(p * 65536)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None, generator=generator)
    value = words.view(torch.int16)[:n].reshape(shape).to(torch.float32)  # integers in [-32768, 32767]
    # value >= -32768 + dropped <=> value - (-32768 + dropped - 1) >= 1; for integers the clamp is that 0/1 test
    return value.sub_(dropped - 32769).clamp_(0.0, 1.0).mul_(keep_scale(p))


def keep_scale(p: float) -> float:
    """The value of a kept element of :func:`keep_mask` for drop probability ``p``."""
    dropped = round(p * 65536)
    return 0.0 if dropped >= 65536 else 65536 / (65536 - dropped)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose stacked form draws each fold's mask from its own generator (:func:`keep_mask`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if active_generators() is None:
            return F.dropout(x, self.p, True)
        return x * fold_masks(x.shape[1:], self.p, x.device).to(x.dtype)


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


def fold_masks(shape: tuple[int, ...], p: float, device) -> torch.Tensor | None:
    """Dropout masks [F, *shape] from the active fold generators (:func:`keep_mask`); None when ``p`` is 0 or
    no generators are active."""
    gens = active_generators()
    if gens is None or p == 0.0:
        return None
    return torch.stack([keep_mask(shape, p, g, device) for g in gens])


_COMPILED: dict = {}


def compiled_step(fn):
    """``fn`` through ``torch.compile`` with dynamic shapes (bags of every size share one compiled graph), made
    once per process. Elementwise passes are fused into generated loops; the matrix products stay the library's."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _mm(a: torch.Tensor, b: torch.Tensor, low: torch.dtype | None, add: torch.Tensor | None = None) -> torch.Tensor:
    """``add + a @ b`` (batched) in float32; with ``low`` (bf16) the product of the operands cast to it."""
    if low is None:
        return torch.bmm(a, b) if add is None else torch.baddbmm(add, a, b)
    y = torch.bmm(a.to(low), b.to(low)).float()
    return y if add is None else y.add_(add)


def embed_gated_forward(x, w1, b1, wa, ba, wb, bb, wc, bc, m1, ma, mb, low):
    """Forward of :class:`EmbedGatedAttention` as a plain function: ``(h, scores, saved)``, ``saved`` being what
    :func:`embed_gated_backward` needs (also used by whole training steps written out, :mod:`mil.models`)."""
    cast = (lambda t: t) if low is None else (lambda t: t.to(low))
    x, w1, wa, wb = cast(x), cast(w1), cast(wa), cast(wb)
    h = _mm(x, w1.transpose(1, 2), low, b1.unsqueeze(1)).clamp_(min=0.0)
    if m1 is not None:
        h.mul_(m1)
    hl = cast(h)
    t = _mm(hl, wa.transpose(1, 2), low, ba.unsqueeze(1)).tanh_()
    s = _mm(hl, wb.transpose(1, 2), low, bb.unsqueeze(1)).clamp_(min=-80.0).neg_().exp_().add_(1.0)
    s.reciprocal_()
    ta = t if ma is None else t * ma
    sb = s if mb is None else s * mb
    g = ta * sb
    if wc.shape[1] == 1:  # as mil.layers.linear: no matrix-vector kernel, whose choice depends on F
        scores = (g * wc).sum(-1, keepdim=True) + bc.unsqueeze(1)
    else:
        scores = _mm(g, wc.transpose(1, 2), low, bc.unsqueeze(1))
    return h, scores, (x, w1, h, hl, wa, t, ta, wb, s, sb, g, wc, ma, mb)


def embed_gated_backward(saved, dh, dscores, keep_scale, low, need_dx: bool):
    """Backward of :class:`EmbedGatedAttention` as a plain function: the gradients of (x, w1, b1, wa, ba, wb,
    bb, wc, bc) from ``dh`` and ``dscores`` (``keep_scale``: the value of the embedding mask's kept elements,
    None without that mask; dx only with ``need_dx``). Weight gradients are transposed views of products laid
    out like the engine's held weights ([F, in, out])."""
    x, w1, h, hl, wa, t, ta, wb, s, sb, g, wc, ma, mb = saved
    if wc.shape[1] == 1:
        dg = dscores * wc
        dwc = (g * dscores).sum(-2, keepdim=True)
    else:
        dg = _mm(dscores, wc, low)
        dwc = _mm(g.transpose(1, 2), dscores, low).transpose(1, 2)
    dbc = dscores.sum(-2)
    da = dg * sb  # d tanh output
    if ma is not None:
        da.mul_(ma)
    da.mul_(1.0 - t * t)
    db = dg * ta  # d sigmoid output
    if mb is not None:
        db.mul_(mb)
    db.mul_(s - s * s)
    dba, dbb = da.sum(-2), db.sum(-2)
    if low is not None:  # each cast once: both are used twice
        da, db = da.to(low), db.to(low)
    dh = _mm(db, wb, low, _mm(da, wa, low, dh))
    dpre = dh.mul_(torch.sign(h))  # h > 0 exactly where the ReLU passed and the mask kept
    if keep_scale is not None:
        dpre.mul_(keep_scale)
    dx = _mm(dpre, w1, low) if need_dx else None
    dw1 = _mm(x.transpose(1, 2), dpre, low).transpose(1, 2)
    dwa = _mm(hl.transpose(1, 2), da, low).transpose(1, 2)
    dwb = _mm(hl.transpose(1, 2), db, low).transpose(1, 2)
    return dx, dw1, dpre.sum(-2), dwa, dba, dwb, dbb, dwc, dbc


class EmbedGatedAttention(torch.autograd.Function):
    """``h = Dropout(ReLU(x W1 + b1))`` and gated-attention scores ``(Dropout(tanh(h Wa + ba)) *
    Dropout(sigmoid(h Wb + bb))) wc + bc`` of stacked folds as one autograd node (the shared first stage of
    ABMIL and CLAM), with the backward written out (:func:`embed_gated_forward`, :func:`embed_gated_backward`).

    ``x`` [F, M, D]; weights as bound by the engine ([F, out, in] views of weights held [F, in, out]),
    biases [F, out]; dropout masks [F, M, out] or None (:func:`fold_masks`), ``scale1`` the value of ``m1``'s
    kept elements (:func:`keep_scale`); ``low``: None (float32 throughout) or the dtype of the matrix products
    (bf16 autocast: operands cast once, elementwise work and outputs in float32). Returns ``h`` [F, M, H] and
    scores [F, M, K]. Autograd of the same composition records ~20 nodes, saves every intermediate and runs
    their backward one by one; here the backward is 5 matrix products of the bag's size and ~15 elementwise
    passes. The gradients are those of the composition (tested against autograd in float64); the derivative
    of ReLU at 0 is 0, as in PyTorch."""

    @staticmethod
    def forward(ctx, x, w1, b1, wa, ba, wb, bb, wc, bc, m1, ma, mb, scale1, low):
        h, scores, saved = embed_gated_forward(x, w1, b1, wa, ba, wb, bb, wc, bc, m1, ma, mb, low)
        ctx.save_for_backward(*saved)
        ctx.keep_scale, ctx.low = (None if m1 is None else scale1), low
        return h, scores

    @staticmethod
    def backward(ctx, dh, dscores):
        grads = embed_gated_backward(ctx.saved_tensors, dh, dscores, ctx.keep_scale, ctx.low, ctx.needs_input_grad[0])
        return grads + (None,) * 5
