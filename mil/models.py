"""MIL heads: plain ``nn.Module``s in one registry, filled by :func:`register_model`.

Every head maps one bag ``x`` [N, D] (float32) to a :class:`MILOutput`:
``logits`` [1, C]; ``attention`` [N], the per-instance score drawn in heatmaps; ``extra_loss``, a scalar
tensor or None. Heads with an auxiliary loss (CLAM's instance clustering, DSMIL's max-instance loss, DTFD's
first tier) compute it when ``label`` is given; the training loss is then
``bag_weight * CE(logits) + (1 - bag_weight) * extra_loss`` (:meth:`MILHead.combine`).

The one bag is a batch of one for :meth:`MILHead.forward_bags`, which every head implements on
``x`` [*F, B, N, D] with a padding ``mask`` [B, N] (True = real instance) and labels [B]: several bags per
optimiser step (padded, masked: a padded bag gives the numbers of that bag alone) and a leading fold axis F
when the engine trains several folds at once (:mod:`mil.layers`). Heads that cannot pad
(``max_bags_per_step = 1``: TransMIL, DTFD-MIL) take one bag per step.

Attention per head: ABMIL / CLAM-SB, the softmax attention weights (sum 1); CLAM-MB, the softmax weights of
the branch of the predicted class; DSMIL, the softmax weights of the predicted class's column of the bag
classifier's attention (similarity to the critical instance); mean pooling, 1/N; max pooling, each instance's
logit for the predicted class; TransMIL and DTFD-MIL: see their modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import inspect
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mil.layers import (Dropout, EmbedGatedAttention, Linear, Sigmoid, bce_with_logits, compiled_step,
                        embed_gated_backward, embed_gated_forward, fold_masks, keep_scale, linear, masked_softmax)
from mil.losses import smooth_top1_svm_rows
from zoomfeat.errors import ConfigError

MIL_MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: add a head to :data:`MIL_MODELS` under ``name`` (CLI choices come from it)."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MIL_MODELS:
            raise ValueError(f"MIL head {name!r} registered twice")
        cls.registry_name = name
        MIL_MODELS[name] = cls
        return cls

    return add


def build_model(name: str, in_dim: int, n_classes: int, **kwargs) -> nn.Module:
    """Instantiate a registered head; ConfigError for an unknown name or a bad keyword."""
    _load_all()
    if name not in MIL_MODELS:
        raise ConfigError(f"unknown MIL model {name!r}: use one of {', '.join(sorted(MIL_MODELS))}")
    params = inspect.signature(MIL_MODELS[name].__init__).parameters
    for key, value in kwargs.items():  # a JSON "false" string would otherwise switch a flag on
        if key in params and params[key].annotation in (bool, "bool") and not isinstance(value, bool):
            raise ConfigError(f"model argument {key}={value!r} of {name!r} must be true or false; "
                              "check --model-kwargs")
    try:
        return MIL_MODELS[name](in_dim=in_dim, n_classes=n_classes, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad model arguments for {name!r} ({exc}); check --model-kwargs") from exc


def _load_all() -> None:
    """Import the modules of the heads kept outside this file (they register themselves)."""
    import mil.dtfd  # noqa: F401
    import mil.transmil  # noqa: F401


class MILOutput(NamedTuple):
    logits: torch.Tensor  # [1, C]
    attention: torch.Tensor  # [N]
    extra_loss: torch.Tensor | None  # scalar or None


class BagsOutput(NamedTuple):
    logits: torch.Tensor  # [*F, B, C]
    attention: torch.Tensor  # [*F, B, N]
    extra_loss: torch.Tensor | None  # [*F, B] per-bag auxiliary loss, or None
    extra_valid: torch.Tensor | None = None  # [B] bool: bags the auxiliary loss applies to (None: all)


class MILHead(nn.Module, ABC):
    """Base of every head: the single-bag :meth:`forward` is :meth:`forward_bags` on a batch of one."""

    bag_weight = 1.0
    max_bags_per_step: int | None = None  # None: padded bags of any number; 1: one bag per step

    @abstractmethod
    def forward_bags(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                     label: torch.Tensor | None = None) -> BagsOutput:
        """Padded bags x [*F, B, N, D] with mask [B, N] (True = a real instance) -> logits, attention, extra loss."""

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        out = self.forward_bags(x.unsqueeze(0), None, None if label is None else label.reshape(1))
        extra = None
        if out.extra_loss is not None and (out.extra_valid is None or bool(out.extra_valid[0])):
            extra = out.extra_loss[0]
        return MILOutput(out.logits, out.attention[0], extra)

    def combine(self, ce: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """Training loss from the bag cross-entropy and the auxiliary loss."""
        return self.bag_weight * ce + (1.0 - self.bag_weight) * extra

    def bag_losses(self, out: BagsOutput, label: torch.Tensor) -> torch.Tensor:
        """Per-bag training loss [*F, B] (``label`` [B])."""
        logp = torch.log_softmax(out.logits, dim=-1)
        ce = -logp.gather(-1, label.reshape(*([1] * (logp.dim() - 2)), -1, 1).expand(*logp.shape[:-1], 1))
        ce = ce.squeeze(-1)
        if out.extra_loss is None:
            return ce
        mixed = self.combine(ce, out.extra_loss)
        return mixed if out.extra_valid is None else torch.where(out.extra_valid, mixed, ce)


def _embed(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(Linear(in_dim, hidden), nn.ReLU(), Dropout(dropout))


def _pool(a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Attention pooling: ``a`` [..., K, N] weights, ``h`` [..., N, H] -> [..., K, H]."""
    return a @ h


def _gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t`` [..., N, H] rows at ``idx`` [..., K] -> [..., K, H]."""
    return t.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1]))


class GatedAttention(nn.Module):
    """Gated attention (Ilse et al. 2018): score = W (tanh(V h) * sigmoid(U h)); h [..., N, H] -> [..., N, branches]."""

    def __init__(self, hidden: int = 512, attn_dim: int = 256, dropout: float = 0.25, branches: int = 1):
        super().__init__()
        self.tanh_gate = nn.Sequential(Linear(hidden, attn_dim), nn.Tanh(), Dropout(dropout))
        self.sigmoid_gate = nn.Sequential(Linear(hidden, attn_dim), Sigmoid(), Dropout(dropout))
        self.score = Linear(attn_dim, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.score(self.tanh_gate(h) * self.sigmoid_gate(h))


def _gate_masks(embed: nn.Sequential, attention: GatedAttention, rows: int, device) -> list:
    """The dropout masks [F, rows, out] of the embedding, tanh gate and sigmoid gate, drawn in that order (the
    modules' order) from the active fold generators; Nones in eval mode or for p = 0."""
    layers = ((embed[0], embed[2]), (attention.tanh_gate[0], attention.tanh_gate[2]),
              (attention.sigmoid_gate[0], attention.sigmoid_gate[2]))
    return [fold_masks((rows, layer.out_features), drop.p, device) if embed.training else None
            for layer, drop in layers]


def embed_and_attend(embed: nn.Sequential, attention: GatedAttention, x: torch.Tensor):
    """``h = embed(x)`` and ``attention(h)``: with parameters stacked over folds (the training engine) one
    :class:`mil.layers.EmbedGatedAttention` node, the same numbers up to rounding, with the dropout masks drawn
    in the composition's order (embedding, tanh gate, sigmoid gate); under autocast its products run in the
    autocast dtype. Otherwise the modules themselves."""
    first, gate_t, gate_s = embed[0], attention.tanh_gate[0], attention.sigmoid_gate[0]
    if first.weight.dim() != 3:
        h = embed(x)
        return h, attention(h)
    device = x.device.type
    low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    folds, rows = x.shape[0], x.shape[1:-1]
    flat = x.reshape(folds, -1, x.shape[-1])
    masks = _gate_masks(embed, attention, flat.shape[1], x.device)
    with torch.autocast(device, enabled=False):
        h, scores = EmbedGatedAttention.apply(flat, first.weight, first.bias, gate_t.weight, gate_t.bias,
                                              gate_s.weight, gate_s.bias, attention.score.weight,
                                              attention.score.bias, *masks, keep_scale(embed[2].p), low)
    return h.reshape(folds, *rows, h.shape[-1]), scores.reshape(folds, *rows, scores.shape[-1])


def _attention_pool(x, mask, w1, b1, wa, ba, wb, bb, wc, bc, m1, ma, mb, low):
    """Forward shared by the written-out steps: the embedding and gated attention of padded bags ``x``
    [F, B, N, D], softmax attention over each bag's real instances and the pooled embeddings. Returns
    (saved for :func:`_attention_pool_backward`, h [F, B, N, H], attention [F, B, K, N], pooled [F, B, K, H])."""
    folds, bags, n, dim = x.shape
    h, scores, saved = embed_gated_forward(x.reshape(folds, bags * n, dim), w1, b1, wa, ba, wb, bb, wc, bc,
                                           m1, ma, mb, low)
    hb = h.reshape(folds, bags, n, h.shape[-1])
    a = masked_softmax(scores.reshape(folds, bags, n, -1).transpose(-1, -2),
                       None if mask is None else mask.unsqueeze(-2))
    return saved, hb, a, _pool(a, hb)


def _attention_pool_backward(saved, hb, a, dpooled, dh, m1, scale1, low):
    """Gradients of (w1, b1, wa, ba, wb, bb, wc, bc) from ``dpooled`` [F, B, K, H] and ``dh`` [F, B, N, H], the
    gradient reaching h by other paths (CLAM's instance loss; None for none)."""
    folds, bags, n, hidden = hb.shape
    branches = a.shape[-2]
    if branches == 1:  # one product per element: the outer product written elementwise
        pooled_dh = a.transpose(-1, -2) * dpooled
    else:
        pooled_dh = a.transpose(-1, -2) @ dpooled
    dh = pooled_dh if dh is None else dh.add_(pooled_dh)
    da = dpooled @ hb.transpose(-1, -2)  # [F, B, K, N]
    dscores = (a * (da - (a * da).sum(-1, keepdim=True))).transpose(-1, -2).reshape(folds, bags * n, branches)
    grads = embed_gated_backward(saved, dh.reshape(folds, bags * n, hidden), dscores,
                                 None if m1 is None else scale1, low, False)
    return grads[1:]


def _cross_entropy(logits, label):
    """Per-bag cross-entropy [F, B] of ``logits`` [F, B, C] and its gradient with respect to the logits
    (softmax - one-hot)."""
    logp = torch.log_softmax(logits, dim=-1)
    index = label.reshape(1, -1, 1).expand(*logp.shape[:-1], 1)
    ce = -logp.gather(-1, index).squeeze(-1)
    return ce, logp.exp().scatter_add_(-1, index, torch.full_like(ce, -1.0).unsqueeze(-1))


def _linear_backward(inputs, dout, weight):
    """Gradients of ``linear(inputs, weight, bias)`` (``inputs`` [F, M, in], ``weight`` bound [F, out, in]) from
    ``dout`` [F, M, out]: (d inputs, d weight as a view of a product laid out [F, in, out], d bias)."""
    if weight.shape[1] == 1:  # as mil.layers.linear: no matrix-vector kernel
        return dout * weight, (dout * inputs).sum(1, keepdim=True), dout.sum(1)
    return torch.bmm(dout, weight), torch.bmm(inputs.transpose(1, 2), dout).transpose(1, 2), dout.sum(1)


def gated_attention_step(x, mask, label, weight, w1, b1, wa, ba, wb, bb, wc, bc, wcls, bcls, m1, ma, mb,
                         scale1: float, low):
    """One training step of ABMIL on stacked folds, forward and backward written out (no autograd graph).

    ``x`` [F, B, N, D] (padded bags), ``mask`` [B, N] (True = a real instance) or None, ``label`` [B],
    ``weight`` [F, B] (1 for the fold's own bags of the step, 0 for others); weights bound as the engine binds
    them ([F, out, in] views), biases [F, out]; dropout masks as :func:`mil.layers.embed_gated_forward` takes
    them; ``low``: None or the dtype of the bag-sized products (the pooling, classifier and loss stay in
    float32). Returns each fold's loss [F], the weighted mean of its bags' cross-entropies, and the gradients
    of (w1, b1, wa, ba, wb, bb, wc, bc, wcls, bcls) in those shapes, weight gradients as transposed views of
    products laid out [F, in, out]. The same arithmetic as autograd of :class:`ABMIL` (tested against it in
    float64), without its ~30 nodes; each fold's slice uses the same kernels whatever F (see mil.layers)."""
    saved, hb, a, pooled = _attention_pool(x, mask, w1, b1, wa, ba, wb, bb, wc, bc, m1, ma, mb, low)
    pooled = pooled.squeeze(-2)  # [F, B, H]
    ce, dce = _cross_entropy(linear(pooled, wcls, bcls), label)
    total = weight.sum(-1, keepdim=True)
    loss = (ce * weight).sum(-1) / total.squeeze(-1)
    dlogits = dce.mul_((weight / total).unsqueeze(-1))
    dpooled, dwcls, dbcls = _linear_backward(pooled, dlogits, wcls)
    grads = _attention_pool_backward(saved, hb, a, dpooled.unsqueeze(-2), None, m1, scale1, low)
    return loss, grads + (dwcls, dbcls)


def clam_step(x, mask, label, weight, w1, b1, wa, ba, wb, bb, wc, bc, bag_w: list, bag_b: list, inst_w: list,
              inst_b: list, m1, ma, mb, scale1: float, low, k_sample: int, subtyping: bool, bag_weight: float):
    """One training step of CLAM-SB (``bag_w`` one Linear(H, C)) or CLAM-MB (one Linear(H, 1) per class, one
    attention branch each) on stacked folds, written out as :func:`gated_attention_step` is, with CLAM's
    instance clustering (``inst_w``/``inst_b``: one Linear(H, 2) per class; :class:`_CLAMBase` defines it).

    Each bag's loss is ``bag_weight * CE + (1 - bag_weight) * instance loss`` (CE alone for a bag too small
    for it); returns each fold's weighted mean loss [F] and the gradients of (w1, b1, wa, ba, wb, bb, wc, bc,
    *bag classifiers' (weight, bias), *instance classifiers' (weight, bias)), as autograd of the head gives
    them (tested in float64). The most / least attended instances are chosen by ``topk``, as in the head; the
    gradient does not flow through the choice."""
    saved, hb, a, pooled = _attention_pool(x, mask, w1, b1, wa, ba, wb, bb, wc, bc, m1, ma, mb, low)
    folds, bags, n, hidden = hb.shape
    n_classes, branches = len(inst_w), a.shape[-2]
    if branches == 1:
        logits = linear(pooled[..., 0, :], bag_w[0], bag_b[0])
    else:
        logits = torch.cat([linear(pooled[..., c, :], w, b) for c, (w, b) in enumerate(zip(bag_w, bag_b))], -1)
    ce, dce = _cross_entropy(logits, label)
    # the instance loss, as _CLAMBase._instance_loss computes it
    sizes = torch.full(label.shape, n, device=x.device) if mask is None else mask.sum(-1)
    k_bag = torch.clamp(sizes // 2, max=k_sample)
    k = int(min(k_sample, n // 2))
    terms = []  # per class: None (not needed) or ([(indices, rows, logits) of top, bottom], need_in, need_out, own)
    extra = None
    if k >= 1:
        valid = (torch.arange(k, device=x.device) < k_bag.unsqueeze(-1)).to(hb.dtype)  # [B, k]
        count = k_bag.to(hb.dtype)
        extra = 0.0
        for c, (wi, bi) in enumerate(zip(inst_w, inst_b)):
            own = label == c
            need_in, need_out = bool(own.any()), subtyping and not bool(own.all())
            if not (need_in or need_out):
                terms.append(None)
                continue
            a_c = a[..., c if branches > 1 else 0, :]
            chosen = []
            for sign in ((1.0, -1.0) if need_in else (1.0,)):
                ranked = sign * a_c if mask is None else (sign * a_c).masked_fill(~mask, float("-inf"))
                idx = torch.topk(ranked, k, dim=-1).indices  # [F, B, k]
                rows = _gather_rows(hb, idx)
                chosen.append((idx, rows, linear(rows, wi, bi)))
            ones = torch.ones(chosen[0][2].shape[:-1], dtype=torch.long, device=x.device)
            own_f = own.to(hb.dtype)
            if need_in:
                pos = smooth_top1_svm_rows(chosen[0][2], ones)
                neg = smooth_top1_svm_rows(chosen[1][2], ones * 0)
                extra = extra + own_f * (((pos * valid).sum(-1) + (neg * valid).sum(-1)) / (2 * count).clamp(min=1))
            if need_out:
                out = smooth_top1_svm_rows(chosen[0][2], ones * 0)
                extra = extra + (1.0 - own_f) * ((out * valid).sum(-1) / count.clamp(min=1))
            terms.append((chosen, need_in, need_out, own_f))
        if subtyping:
            extra = extra / n_classes
    total = weight.sum(-1, keepdim=True)
    share = weight / total
    if extra is None:
        loss_bag, dce_coef, dextra = ce, share, None
    else:
        applies = k_bag >= 1  # [B]
        loss_bag = torch.where(applies, bag_weight * ce + (1.0 - bag_weight) * extra, ce)
        dce_coef = torch.where(applies, share * bag_weight, share)  # (where of two Python floats is float32)
        dextra = torch.where(applies, share * (1.0 - bag_weight), torch.zeros_like(share))
        if subtyping:
            dextra = dextra / n_classes
    loss = (loss_bag * weight).sum(-1) / total.squeeze(-1)
    # backward: the bag classifier(s), then the instance classifiers into h, then pooling, attention, embedding
    dlogits = dce.mul_(dce_coef.unsqueeze(-1))
    bag_grads = []
    if branches == 1:
        dp, dw, db = _linear_backward(pooled[..., 0, :], dlogits, bag_w[0])
        dpooled = dp.unsqueeze(-2)
        bag_grads += [dw, db]
    else:
        parts = []
        for c, w in enumerate(bag_w):
            dp, dw, db = _linear_backward(pooled[..., c, :], dlogits[..., c:c + 1], w)
            parts.append(dp)
            bag_grads += [dw, db]
        dpooled = torch.stack(parts, dim=-2)
    dh = None
    inst_grads = []
    for c, term in enumerate(terms if extra is not None else [None] * n_classes):
        if term is None:
            inst_grads += [torch.zeros_like(inst_w[c]), torch.zeros_like(inst_b[c])]
            continue
        chosen, need_in, need_out, own_f = term
        top_logits = chosen[0][2]
        onehot1 = torch.tensor([0.0, 1.0], dtype=hb.dtype, device=x.device)
        # d/ds of CLAM's smooth top-1 SVM (alpha = tau = 1) for target y: softmax(s + 1 - onehot_y) - onehot_y
        dtop = torch.zeros_like(top_logits)
        dlogit_rows = []
        if need_in:
            coef = (dextra * own_f / (2 * count).clamp(min=1)).unsqueeze(-1) * valid  # [F, B, k]
            dtop += coef.unsqueeze(-1) * (torch.softmax(top_logits + 1.0 - onehot1, -1) - onehot1)
            low_logits = chosen[1][2]
            onehot0 = 1.0 - onehot1
            dlow = coef.unsqueeze(-1) * (torch.softmax(low_logits + 1.0 - onehot0, -1) - onehot0)
        if need_out:
            onehot0 = 1.0 - onehot1
            coef = (dextra * (1.0 - own_f) / count.clamp(min=1)).unsqueeze(-1) * valid
            dtop += coef.unsqueeze(-1) * (torch.softmax(top_logits + 1.0 - onehot0, -1) - onehot0)
        dlogit_rows.append(dtop)
        if need_in:
            dlogit_rows.append(dlow)
        dw = db = None
        for (idx, rows, _), drow in zip(chosen, dlogit_rows):
            flat_rows, flat_d = rows.reshape(folds, -1, hidden), drow.reshape(folds, -1, 2)
            drows, gw, gb = _linear_backward(flat_rows, flat_d, inst_w[c])
            dw, db = (gw, gb) if dw is None else (dw + gw, db + gb)
            if dh is None:
                dh = torch.zeros_like(hb)
            dh.scatter_add_(-2, idx.unsqueeze(-1).expand(*idx.shape, hidden), drows.reshape(rows.shape))
        inst_grads += [dw, db]
    grads = _attention_pool_backward(saved, hb, a, dpooled, dh, m1, scale1, low)
    return loss, grads + tuple(bag_grads) + tuple(inst_grads)


@register_model("abmil")
class ABMIL(MILHead):
    """Gated-attention MIL: Linear(D, 512) + ReLU + Dropout(0.25), attention 512 -> 256 -> 1, Linear(512, C)."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25):
        super().__init__()
        self.embed = _embed(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, dropout)
        self.classifier = Linear(hidden, n_classes)

    def forward_bags(self, x, mask=None, label=None) -> BagsOutput:
        h, scores = embed_and_attend(self.embed, self.attention, x)  # [*F, B, N, H], [*F, B, N, 1]
        a = masked_softmax(scores.squeeze(-1), mask)  # [*F, B, N]
        pooled = _pool(a.unsqueeze(-2), h).squeeze(-2)  # [*F, B, H]
        return BagsOutput(self.classifier(pooled), a, None)

    compilable = True  # its written-out step compiles to one graph (--compile)

    def fused_step(self, x, mask, label, weight, low=None, compiled: bool = False):
        """The engine's training step (parameters bound stacked, inside :func:`mil.layers.fold_generators`):
        each fold's loss [F] and {parameter name: gradient} from :func:`gated_attention_step`, with the dropout
        masks the modules would draw; ``compiled``: that function through ``torch.compile``."""
        first, gate_t, gate_s = self.embed[0], self.attention.tanh_gate[0], self.attention.sigmoid_gate[0]
        masks = _gate_masks(self.embed, self.attention, x.shape[-3] * x.shape[-2], x.device)
        step = compiled_step(gated_attention_step) if compiled else gated_attention_step
        loss, grads = step(x, mask, label, weight, first.weight, first.bias, gate_t.weight, gate_t.bias,
                           gate_s.weight, gate_s.bias, self.attention.score.weight, self.attention.score.bias,
                           self.classifier.weight, self.classifier.bias, *masks, keep_scale(self.embed[2].p), low)
        names = ["embed.0.weight", "embed.0.bias", "attention.tanh_gate.0.weight", "attention.tanh_gate.0.bias",
                 "attention.sigmoid_gate.0.weight", "attention.sigmoid_gate.0.bias", "attention.score.weight",
                 "attention.score.bias", "classifier.weight", "classifier.bias"]
        return loss, dict(zip(names, grads))


class _CLAMBase(MILHead):
    """Shared parts of CLAM-SB / CLAM-MB (Lu et al. 2021, 'small' size: D -> 512 -> 256).

    Instance clustering: for the bag's class, the ``k_sample`` most attended instances are pseudo-positive
    and the ``k_sample`` least attended pseudo-negative for that class's instance classifier. Only with
    ``subtyping`` (mutually exclusive classes, as in CLAM's reference code) are the most attended instances
    also pseudo-negative for every other class's classifier, and the summed loss is then divided by the
    number of classes; without it the other classes are skipped. Loss: smooth top-1 SVM. Bags with fewer
    than 2 instances skip it; k = min(k_sample, N // 2) otherwise.
    """

    bag_weight = 0.7

    def __init__(self, in_dim: int, n_classes: int, hidden: int, attn_dim: int, dropout: float,
                 k_sample: int, subtyping: bool, branches: int, bag_weight: float):
        super().__init__()
        self.embed = _embed(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, dropout, branches)
        self.instance_classifiers = nn.ModuleList(Linear(hidden, 2) for _ in range(n_classes))
        self.k_sample = k_sample
        self.subtyping = subtyping
        self.n_classes = n_classes
        self.bag_weight = bag_weight

    def _attend(self, x, mask):
        """h [*F, B, N, H] and attention [*F, B, branches, N]."""
        h, scores = embed_and_attend(self.embed, self.attention, x)
        scores = scores.transpose(-1, -2)
        return h, masked_softmax(scores, None if mask is None else mask.unsqueeze(-2))

    def _bag_classifiers(self) -> list[tuple[str, nn.Module]]:
        """(name, Linear) of the bag classifier(s): CLAM-SB's one, CLAM-MB's one per class."""
        if hasattr(self, "classifiers"):
            return [(f"classifiers.{c}", m) for c, m in enumerate(self.classifiers)]
        return [("classifier", self.classifier)]

    def fused_step(self, x, mask, label, weight, low=None, compiled: bool = False):
        """The engine's training step, as :meth:`ABMIL.fused_step`, from :func:`clam_step`, always eager: its
        per-class choices depend on the step's labels and break a compiled graph (measured slower compiled)."""
        first, gate_t, gate_s = self.embed[0], self.attention.tanh_gate[0], self.attention.sigmoid_gate[0]
        masks = _gate_masks(self.embed, self.attention, x.shape[-3] * x.shape[-2], x.device)
        bags = self._bag_classifiers()
        loss, grads = clam_step(x, mask, label, weight, first.weight, first.bias, gate_t.weight, gate_t.bias,
                           gate_s.weight, gate_s.bias, self.attention.score.weight, self.attention.score.bias,
                           [m.weight for _, m in bags], [m.bias for _, m in bags],
                           [m.weight for m in self.instance_classifiers], [m.bias for m in self.instance_classifiers],
                           *masks, keep_scale(self.embed[2].p), low, self.k_sample, self.subtyping, self.bag_weight)
        names = ["embed.0.weight", "embed.0.bias", "attention.tanh_gate.0.weight", "attention.tanh_gate.0.bias",
                 "attention.sigmoid_gate.0.weight", "attention.sigmoid_gate.0.bias", "attention.score.weight",
                 "attention.score.bias"]
        names += [f"{n}.{p}" for n, _ in bags for p in ("weight", "bias")]
        names += [f"instance_classifiers.{c}.{p}" for c in range(len(self.instance_classifiers))
                  for p in ("weight", "bias")]
        return loss, dict(zip(names, grads))

    def _cluster_losses(self, h, a, classifier, k, k_bag, mask, need_in: bool, need_out: bool):
        """Per-bag (in-class, out-of-class) instance losses of one class; ``a`` [*F, B, N]; either is None when
        not needed (no bag of the step has the class, or every bag has it, or no ``subtyping``)."""
        valid = (torch.arange(k, device=h.device) < k_bag.unsqueeze(-1)).to(h.dtype)  # [B, k]
        fill = float("-inf")
        top_a = a if mask is None else a.masked_fill(~mask, fill)
        top = classifier(_gather_rows(h, torch.topk(top_a, k, dim=-1).indices))  # [*F, B, k, 2]
        ones = torch.ones(top.shape[:-1], dtype=torch.long, device=h.device)
        count = k_bag.to(h.dtype)
        in_class = out_class = None
        if need_in:
            low_a = -a if mask is None else (-a).masked_fill(~mask, fill)
            low = classifier(_gather_rows(h, torch.topk(low_a, k, dim=-1).indices))
            pos, neg = smooth_top1_svm_rows(top, ones), smooth_top1_svm_rows(low, ones * 0)
            in_class = ((pos * valid).sum(-1) + (neg * valid).sum(-1)) / (2 * count).clamp(min=1)
        if need_out:
            out_class = (smooth_top1_svm_rows(top, ones * 0) * valid).sum(-1) / count.clamp(min=1)
        return in_class, out_class

    def _instance_loss(self, h, attn, label, mask):
        """Per-bag loss [*F, B] and the bags it applies to [B] (``attn`` [*F, B, branches, N]). As CLAM's
        reference, a class's in-class clustering is computed only for its own bags and the out-of-class one
        (subtyping) only for the other bags: a step skips what none of its bags uses."""
        n = h.shape[-2] if mask is None else None
        sizes = torch.full(label.shape, n, device=h.device) if mask is None else mask.sum(-1)
        k_bag = torch.clamp(sizes // 2, max=self.k_sample)
        k = int(min(self.k_sample, h.shape[-2] // 2))
        if k < 1:
            return None, None
        total = 0.0
        for c, classifier in enumerate(self.instance_classifiers):
            own = label == c
            need_in, need_out = bool(own.any()), self.subtyping and not bool(own.all())
            if not (need_in or need_out):
                continue
            a = attn[..., c if attn.shape[-2] > 1 else 0, :]
            in_class, out_class = self._cluster_losses(h, a, classifier, k, k_bag, mask, need_in, need_out)
            own = own.to(h.dtype)
            if in_class is not None:
                total = total + own * in_class
            if out_class is not None:
                total = total + (1.0 - own) * out_class
        if self.subtyping:
            total = total / self.n_classes
        return total, k_bag >= 1


@register_model("clam_sb")
class CLAMSB(_CLAMBase):
    """CLAM single-branch: one gated attention branch, Linear(512, C) bag classifier."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25, k_sample: int = 8, subtyping: bool = False, bag_weight: float = 0.7):
        super().__init__(in_dim, n_classes, hidden, attn_dim, dropout, k_sample, subtyping, 1, bag_weight)
        self.classifier = Linear(hidden, n_classes)

    def forward_bags(self, x, mask=None, label=None) -> BagsOutput:
        h, attn = self._attend(x, mask)  # attn [*F, B, 1, N]
        logits = self.classifier(_pool(attn, h).squeeze(-2))  # [*F, B, C]
        extra, valid = self._instance_loss(h, attn, label, mask) if label is not None else (None, None)
        return BagsOutput(logits, attn[..., 0, :], extra, valid)


@register_model("clam_mb")
class CLAMMB(_CLAMBase):
    """CLAM multi-branch: one attention branch and one Linear(512, 1) bag classifier per class."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25, k_sample: int = 8, subtyping: bool = False, bag_weight: float = 0.7):
        super().__init__(in_dim, n_classes, hidden, attn_dim, dropout, k_sample, subtyping, n_classes,
                         bag_weight)
        self.classifiers = nn.ModuleList(Linear(hidden, 1) for _ in range(n_classes))

    def forward_bags(self, x, mask=None, label=None) -> BagsOutput:
        h, attn = self._attend(x, mask)  # attn [*F, B, C, N]
        pooled = _pool(attn, h)  # [*F, B, C, H]
        logits = torch.cat([clf(pooled[..., c, :]) for c, clf in enumerate(self.classifiers)], dim=-1)
        pred = logits.argmax(-1)  # [*F, B]
        chosen = attn.gather(-2, pred[..., None, None].expand(*pred.shape, 1, attn.shape[-1])).squeeze(-2)
        extra, valid = self._instance_loss(h, attn, label, mask) if label is not None else (None, None)
        return BagsOutput(logits, chosen, extra, valid)


def _logistic(z: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(-z))`` through ``exp``, as :class:`mil.layers.Sigmoid` (the same bits for any F)."""
    return torch.clamp(z, min=-80.0).neg_().exp_().add_(1.0).reciprocal_()


def dsmil_step(x, mask, label, weight, wi, bi, wq1, bq1, wq2, bq2, wh, bh, negative_stream: bool,
               bag_weight: float):
    """One training step of DSMIL (``passing_v`` off: the values are the instances) on stacked folds, forward
    and backward written out as :func:`gated_attention_step` is.

    Parameters as the engine binds them: instance classifier ``wi`` [F, S, D], query MLP ``wq1`` [F, Q, D],
    ``wq2`` [F, Q, Q], the bag classifier's Conv1d weight ``wh`` [F, S, S, D] (S streams). Each bag's loss is
    ``bag_weight * CE(bag logits) + (1 - bag_weight) * BCE(max instance logits)``, as :meth:`DSMIL.forward_bags`
    and :meth:`MILHead.bag_losses` compute it; returns each fold's weighted mean loss [F] and the gradients of
    (wi, bi, wq1, bq1, wq2, bq2, wh, bh) (tested against autograd of the head in float64). The critical instance
    is chosen by ``argmax``; the gradient does not flow through the choice."""
    folds, bags, n, dim = x.shape
    flat = x.reshape(folds, bags * n, dim)
    inst = linear(flat, wi, bi).reshape(folds, bags, n, -1)  # [F, B, N, S]
    if mask is not None:
        inst = inst.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    z1 = linear(flat, wq1, bq1)
    r = z1.clamp(min=0.0)
    q = linear(r, wq2, bq2).tanh_()  # [F, B * N, Q]
    qb = q.reshape(folds, bags, n, -1)
    critical = inst.argmax(dim=-2)  # [F, B, S]
    q_max = _gather_rows(qb, critical)  # [F, B, S, Q]
    root = math.sqrt(q.shape[-1])
    a = masked_softmax(qb @ q_max.transpose(-1, -2) / root, None if mask is None else mask.unsqueeze(-1), dim=-2)
    pooled = (a.transpose(-1, -2) @ x).flatten(-2)  # [F, B, S * D]
    streams = inst.shape[-1]
    w_flat = wh.reshape(folds, streams, -1)
    logits = linear(pooled, w_flat, bh)  # [F, B, S]
    if not negative_stream:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
    ce, dce = _cross_entropy(logits, label)
    max_logits = inst.gather(-2, critical.unsqueeze(-2)).squeeze(-2)  # [F, B, S], = the max over instances
    if negative_stream:
        target = F.one_hot(label.long(), streams).to(max_logits.dtype)
    else:
        target = label.to(max_logits.dtype).unsqueeze(-1)
    extra = bce_with_logits(max_logits, target).mean(-1)
    total = weight.sum(-1, keepdim=True)
    loss = ((bag_weight * ce + (1.0 - bag_weight) * extra) * weight).sum(-1) / total.squeeze(-1)
    share = weight / total
    # backward: the bag classifier, attention pooling, the query MLP (through the scores and the critical
    # instance's query), and the instance classifier through the max
    dlogits = dce.mul_((share * bag_weight).unsqueeze(-1))
    if not negative_stream:
        dlogits = dlogits[..., 1:].contiguous()
    dpooled, dwh, dbh = _linear_backward(pooled, dlogits, w_flat)
    da = x @ dpooled.reshape(folds, bags, streams, dim).transpose(-1, -2)  # [F, B, N, S]
    dscores = a * (da - (a * da).sum(-2, keepdim=True)) / root
    dq = dscores @ q_max  # [F, B, N, Q]
    dq.scatter_add_(-2, critical.unsqueeze(-1).expand(*critical.shape, q.shape[-1]),
                    dscores.transpose(-1, -2) @ qb)
    dz2 = dq.reshape(folds, bags * n, -1).mul_(1.0 - q * q)
    dr, dwq2, dbq2 = _linear_backward(r, dz2, wq2)
    _, dwq1, dbq1 = _linear_backward(flat, dr.mul_(torch.sign(r)), wq1)
    dmax = (share * (1.0 - bag_weight) / streams).unsqueeze(-1) * (_logistic(max_logits) - target)
    dinst = torch.zeros_like(inst).scatter_(-2, critical.unsqueeze(-2), dmax.unsqueeze(-2))
    _, dwi, dbi = _linear_backward(flat, dinst.reshape(folds, bags * n, streams), wi)
    return loss, (dwi, dbi, dwq1, dbq1, dwq2, dbq2, dwh.reshape(wh.shape), dbh)


def _two_stream_log_probs(bag_logits: torch.Tensor, max_logits: torch.Tensor, negative_stream: bool) -> torch.Tensor:
    """log of the mean of DSMIL's two streams' class probabilities [*F, B, C] (see :class:`DSMIL`), from the
    bag logits [*F, B, C] and the max instance logits [*F, B, S], in log space (finite for any logits)."""
    half = math.log(2.0)
    if not negative_stream:  # bag logits (0, s): P(1) = (sigmoid(m) + sigmoid(s)) / 2, P(0) its complement
        s, m = bag_logits[..., 1], max_logits[..., 0]
        positive = torch.logaddexp(F.logsigmoid(s), F.logsigmoid(m))
        negative = torch.logaddexp(F.logsigmoid(-s), F.logsigmoid(-m))
        return torch.stack([negative, positive], dim=-1) - half
    instance = F.logsigmoid(max_logits)
    instance = instance - instance.logsumexp(-1, keepdim=True)
    return torch.logaddexp(bag_logits.log_softmax(-1), instance) - half


@register_model("dsmil")
class DSMIL(MILHead):
    """Dual-stream MIL (Li, Li & Eliceiri 2021).

    Instance stream: Linear(D, C) per instance, bag score = max over instances. Bag stream: queries
    Q = q(x) with q = Linear(D, 128) + ReLU + Linear(128, 128) + Tanh; the critical instance of each class
    (highest instance score) gives q_max; A = softmax_N(Q q_max^T / sqrt(128)) [N, C]; B = A^T V [C, D]
    (V = x, or Linear(D, D) + ReLU with ``passing_v``); logits = Conv1d(C, C, kernel D)(B). Loss 0.5 bag +
    0.5 max-instance: cross-entropy on the bag logits, and, as in DSMIL, per-class binary cross-entropy of
    the max instance logits against the one-hot label (a softmax over class maxima does not learn: the
    class-0 maximum has no instance-level meaning).

    ``negative_stream=False`` (binary tasks only) is DSMIL's setting for a positive/negative task
    (``--num_classes 1``, "the number of non-negative classes", as its Camelyon16 runs): one instance
    classifier, one critical instance and one bag score s for class 1; the logits are (0, s), so the
    softmax cross-entropy is DSMIL's binary cross-entropy of s. With two streams a negative bag's class-0
    maximum is asked to be high and a positive bag's to be low, although a positive bag's other instances
    look like a negative bag's. ``--task hrd`` sets it (``mil.config.effective_model_kwargs``); subtyping
    keeps a stream per class, as DSMIL's TCGA runs.

    ``average=True``: the prediction (eval mode) is the mean of the two streams' probabilities, the bag score
    c(B) = (c_m(B) + c_b(B)) / 2 of the paper and the default (``--average True``) of DSMIL's current
    train_tcga.py, which scores a bag by ``0.5 sigmoid(max instance logit) + 0.5 sigmoid(bag logit)``. With one
    positive stream that is the probability of class 1; with a stream per class the instance stream's
    sigmoids are normalised over the classes (the engine predicts a distribution) and averaged with the bag
    stream's softmax. ``logits`` are then the log of those probabilities; training (train mode) is unchanged.
    The class default ``False`` scores by the bag stream alone, as DSMIL's 2021 train_tcga.py did (and what
    checkpoints written before this option were evaluated with); ``train-mil`` builds the head with ``True``
    (:func:`mil.config.effective_model_kwargs`). Where the bag stream's attention never finds the witnesses
    the instance stream still does (RESULTS.md: 2% witnesses, 500 slides).
    """

    bag_weight = 0.5

    def __init__(self, in_dim: int, n_classes: int = 2, query_dim: int = 128, passing_v: bool = False,
                 dropout_v: float = 0.0, negative_stream: bool = True, average: bool = False):
        super().__init__()
        if not negative_stream and n_classes != 2:
            raise ConfigError(f"dsmil: negative_stream=False needs a binary task, not {n_classes} classes; "
                              "drop it from --model-kwargs")
        streams = n_classes if negative_stream else 1
        self.instance_classifier = Linear(in_dim, streams)
        self.query = nn.Sequential(Linear(in_dim, query_dim), nn.ReLU(), Linear(query_dim, query_dim),
                                   nn.Tanh())
        self.value = (nn.Sequential(Dropout(dropout_v), Linear(in_dim, in_dim), nn.ReLU())
                      if passing_v else nn.Identity())
        self.head = nn.Conv1d(streams, streams, kernel_size=in_dim)
        self.query_dim = query_dim
        self.negative_stream = negative_stream
        self.average = average

    fused_bf16 = False  # dsmil_step computes in float32: under --precision bf16 the engine keeps autocast

    @property
    def fused_step(self):
        """The engine's training step from :func:`dsmil_step` (as :meth:`ABMIL.fused_step`); None with
        ``passing_v`` (its value MLP is not written out: the engine then uses autograd)."""
        return self._fused_step if isinstance(self.value, nn.Identity) else None

    def _fused_step(self, x, mask, label, weight, low=None, compiled: bool = False):
        q1, q2 = self.query[0], self.query[2]
        loss, grads = dsmil_step(x, mask, label, weight, self.instance_classifier.weight,
                                 self.instance_classifier.bias, q1.weight, q1.bias, q2.weight, q2.bias,
                                 self.head.weight, self.head.bias, self.negative_stream, self.bag_weight)
        names = ["instance_classifier.weight", "instance_classifier.bias", "query.0.weight", "query.0.bias",
                 "query.2.weight", "query.2.bias", "head.weight", "head.bias"]
        return loss, dict(zip(names, grads))

    def forward_bags(self, x, mask=None, label=None) -> BagsOutput:
        inst = self.instance_classifier(x)  # [*F, B, N, C]
        if mask is not None:
            inst = inst.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        q = self.query(x)  # [*F, B, N, Q]
        critical = inst.argmax(dim=-2)  # [*F, B, C]
        q_max = _gather_rows(q, critical)  # [*F, B, C, Q]
        scores = q @ q_max.transpose(-1, -2) / math.sqrt(self.query_dim)  # [*F, B, N, C]
        a = masked_softmax(scores, None if mask is None else mask.unsqueeze(-1), dim=-2)
        b = a.transpose(-1, -2) @ self.value(x)  # [*F, B, C, D]
        w = self.head.weight
        logits = linear(b.flatten(-2), w.reshape(*w.shape[:-3], w.shape[-3], -1), self.head.bias)  # [*F, B, C]
        if not self.negative_stream:  # one positive stream: attention of class 1, logits (0, s)
            attention = a.squeeze(-1)
            logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
        else:
            pred = logits.argmax(-1)
            attention = a.gather(-1, pred[..., None, None].expand(*a.shape[:-1], 1)).squeeze(-1)
        max_logits = inst.max(dim=-2).values  # [*F, B, streams]
        if self.average and not self.training:
            logits = _two_stream_log_probs(logits, max_logits, self.negative_stream)
        extra = None
        if label is not None:
            if self.negative_stream:
                target = F.one_hot(label.long(), inst.shape[-1]).to(max_logits.dtype)
            else:
                target = label.to(max_logits.dtype).unsqueeze(-1)
            extra = bce_with_logits(max_logits, target).mean(-1)
        return BagsOutput(logits, attention, extra)


@register_model("mean")
class MeanPool(MILHead):
    """Baseline: Linear(D, 512) + ReLU + Dropout(0.25), mean over instances, Linear(512, C)."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, dropout: float = 0.25):
        super().__init__()
        self.embed = _embed(in_dim, hidden, dropout)
        self.classifier = Linear(hidden, n_classes)

    def forward_bags(self, x, mask=None, label=None) -> BagsOutput:
        h = self.embed(x)
        if mask is None:
            weights = torch.full(x.shape[:-1], 1.0 / x.shape[-2], device=x.device, dtype=h.dtype)
        else:
            weights = mask.to(h.dtype) / mask.sum(-1, keepdim=True).to(h.dtype)
            weights = weights.expand(h.shape[:-1])
        pooled = _pool(weights.unsqueeze(-2), h).squeeze(-2)
        return BagsOutput(self.classifier(pooled), weights, None)


@register_model("max")
class MaxPool(MILHead):
    """Baseline: Linear(D, 512) + ReLU + Dropout(0.25), instance logits Linear(512, C), max over instances."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, dropout: float = 0.25):
        super().__init__()
        self.embed = _embed(in_dim, hidden, dropout)
        self.classifier = Linear(hidden, n_classes)

    def forward_bags(self, x, mask=None, label=None) -> BagsOutput:
        inst = self.classifier(self.embed(x))  # [*F, B, N, C]
        if mask is not None:
            inst = inst.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        logits = inst.max(dim=-2).values
        pred = logits.argmax(-1)
        attention = inst.gather(-1, pred[..., None, None].expand(*inst.shape[:-1], 1)).squeeze(-1)
        return BagsOutput(logits, attention, None)
