"""Pooling baselines: mean of the embedded instances (``mean``) and max of the instance logits (``max``).

Attention for heatmaps: 1/N per instance (mean); each instance's logit for the predicted class (max).
"""

from __future__ import annotations

import torch
from torch import nn

from mil.layers import embedding
from mil.registry import MILHead, MILOutput, register_model


@register_model("mean")
class MeanPool(MILHead):
    """Baseline: Linear(D, 512) + ReLU + Dropout(0.25), mean over instances, Linear(512, C)."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, dropout: float = 0.25):
        super().__init__()
        self.embed = embedding(in_dim, hidden, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x, mask=None, label=None) -> MILOutput:
        h = self.embed(x)
        if mask is None:
            weights = torch.full(x.shape[:-1], 1.0 / x.shape[-2], device=x.device, dtype=h.dtype)
        else:
            weights = mask.to(h.dtype) / mask.sum(-1, keepdim=True).to(h.dtype)
        return MILOutput(self.classifier((weights.unsqueeze(-2) @ h).squeeze(-2)), weights)


@register_model("max")
class MaxPool(MILHead):
    """Baseline: Linear(D, 512) + ReLU + Dropout(0.25), instance logits Linear(512, C), max over instances."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, dropout: float = 0.25):
        super().__init__()
        self.embed = embedding(in_dim, hidden, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x, mask=None, label=None) -> MILOutput:
        inst = self.classifier(self.embed(x))  # [B, N, C]
        if mask is not None:
            inst = inst.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        logits = inst.max(dim=-2).values
        pred = logits.argmax(-1)
        attention = inst.gather(-1, pred[:, None, None].expand(*inst.shape[:-1], 1)).squeeze(-1)
        if mask is not None:
            attention = attention.masked_fill(~mask, 0.0)
        return MILOutput(logits, attention)
