"""DTFD-MIL (Zhang et al., CVPR 2022): double-tier feature distillation; registry id ``dtfd``.

Tier 1: the bag's instances are shuffled and split into M = 4 pseudo-bags (``numpy.array_split`` sizes;
M = N for bags of fewer than 4 instances). Each instance goes through Linear(D, 512, no bias) + ReLU; per
pseudo-bag j, gated attention (512 -> 128 -> 1, softmax within the pseudo-bag) pools a feature f_j, and a
Linear(512, C) classifier gives the pseudo-bag's logits; every pseudo-bag carries the bag's label.
AFS distillation (the paper's attention-based feature selection, its code's default): the distilled feature
of pseudo-bag j is f_j. Tier 2: gated attention (512 -> 128 -> 1, softmax over the M pseudo-bags) pools the
distilled features and Linear(512, C) gives the bag logits.

Loss: CE(tier 2) + mean_j CE(tier 1, pseudo-bag j). As in the reference code (tier 1 steps before tier 2
runs, and tier 2's gradient into tier 1 is discarded), tier 2 sees the distilled features detached; the
gradients of the four parts (dim_reduction, attention, classifier, att_classifier) are clipped to norm 5 each
(``clip_groups``). The random split is redrawn at every training step; in eval mode the split is a fixed
permutation (seed 0) so predictions are deterministic (the reference reshuffles at test time too).
Attention for heatmaps: an instance's tier-1 weight within its pseudo-bag times its pseudo-bag's tier-2
weight (sums to 1 over the bag). A padded batch runs bag by bag on each bag's real instances
(:func:`mil.registry.one_by_one`): each bag draws its own split. State-dict names follow the reference's saved
dict (classifier, dim_reduction, attention, att_classifier).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from mil.registry import MILHead, MILOutput, one_by_one, register_model
from zoomfeat.errors import ConfigError


class GatedScore(nn.Module):
    """DTFD's Attention_Gated without the softmax: raw scores [..., N, 1]."""

    def __init__(self, dim: int = 512, attn_dim: int = 128):
        super().__init__()
        self.attention_V = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh())
        self.attention_U = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid())
        self.attention_weights = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_weights(self.attention_V(h) * self.attention_U(h))


def classifier_1fc(dim: int, n_classes: int) -> nn.Sequential:
    """The reference's Classifier_1fc: one Linear, its parameters named ``fc.weight`` / ``fc.bias``."""
    return nn.Sequential(OrderedDict(fc=nn.Linear(dim, n_classes)))


class AttentionWithClassifier(nn.Module):
    """Tier 2: softmax-gated attention over the pseudo-bag features, then a linear classifier."""

    def __init__(self, dim: int, n_classes: int, attn_dim: int = 128):
        super().__init__()
        self.attention = GatedScore(dim, attn_dim)
        self.classifier = classifier_1fc(dim, n_classes)

    def forward(self, feats: torch.Tensor):
        w = torch.softmax(self.attention(feats).squeeze(-1), dim=-1)  # [B, M]
        return self.classifier((w.unsqueeze(-2) @ feats).squeeze(-2)), w


def split_sizes(n: int, groups: int) -> list[int]:
    """``numpy.array_split`` chunk sizes: the first n % g chunks get one more."""
    g = min(groups, n)
    return [n // g + (1 if j < n % g else 0) for j in range(g)]


@register_model("dtfd")
class DTFDMIL(MILHead):
    """DTFD-MIL with AFS distillation and the reference's sizes (see the module docstring)."""

    clip_groups = {"dim_reduction": 5.0, "attention": 5.0, "classifier": 5.0, "att_classifier": 5.0}

    def __init__(self, in_dim: int, n_classes: int = 2, dim: int = 512, attn_dim: int = 128,
                 pseudo_bags: int = 4, distill: str = "AFS"):
        super().__init__()
        if distill != "AFS":
            raise ConfigError(f"dtfd: distill {distill!r} is not implemented; use AFS")
        if pseudo_bags < 1:
            raise ConfigError(f"dtfd: pseudo_bags must be >= 1, got {pseudo_bags}")
        self.pseudo_bags = pseudo_bags
        # the reference's DimReduction: Linear(D, dim, no bias) + ReLU, named fc1 / relu1
        self.dim_reduction = nn.Sequential(OrderedDict(fc1=nn.Linear(in_dim, dim, bias=False), relu1=nn.ReLU()))
        self.attention = GatedScore(dim, attn_dim)
        self.classifier = classifier_1fc(dim, n_classes)
        self.att_classifier = AttentionWithClassifier(dim, n_classes, attn_dim)

    def combine(self, ce: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return ce + extra

    def _permutation(self, n: int, device) -> torch.Tensor:
        if self.training:
            return torch.randperm(n, device=device)
        return torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)

    def forward(self, x, mask=None, label=None) -> MILOutput:
        return one_by_one(self._forward_bag, x, mask, label)

    def _forward_bag(self, x, label=None) -> MILOutput:
        perm = self._permutation(x.shape[-2], x.device)
        mid = self.dim_reduction(x[:, perm])  # [1, N, dim]
        scores = self.attention(mid).squeeze(-1)  # [1, N]
        sizes = split_sizes(x.shape[-2], self.pseudo_bags)
        weights = [torch.softmax(s, dim=-1) for s in scores.split(sizes, dim=-1)]  # tier 1, per pseudo-bag
        feats = [(a.unsqueeze(-2) @ h).squeeze(-2) for a, h in zip(weights, mid.split(sizes, dim=-2))]
        pseudo = torch.stack(feats, dim=-2)  # [1, M, dim]
        logits, tier2 = self.att_classifier(pseudo.detach() if self.training else pseudo)
        inst = torch.cat([a * tier2[:, j:j + 1] for j, a in enumerate(weights)], dim=-1)
        attention = torch.zeros_like(inst).index_copy(-1, perm, inst)  # back to the bag's instance order
        extra = None
        if label is not None:
            sub = self.classifier(pseudo)  # [1, M, C]
            extra = F.cross_entropy(sub.transpose(-1, -2), label[:, None].expand(-1, sub.shape[1]),
                                    reduction="none").mean(-1)
        return MILOutput(logits, attention, extra)
