"""Building blocks shared by several MIL heads (plain ``nn.Module``s and functions of padded bags)."""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over instances; padded positions (``mask`` False) get weight 0."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=dim)


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t`` [..., N, H] rows at ``idx`` [..., K] -> [..., K, H]."""
    return t.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1]))


def embedding(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """The instance embedding of ABMIL, CLAM and the pooling baselines: Linear + ReLU + Dropout."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))


class GatedAttention(nn.Module):
    """Gated attention (Ilse et al. 2018, eq. 9): score = w^T (tanh(V h) * sigmoid(U h)), with CLAM's dropout
    after each gate; ``h`` [..., N, H] -> raw scores [..., N, branches]."""

    def __init__(self, hidden: int = 512, attn_dim: int = 256, dropout: float = 0.25, branches: int = 1):
        super().__init__()
        self.tanh_gate = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.sigmoid_gate = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.score = nn.Linear(attn_dim, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.score(self.tanh_gate(h) * self.sigmoid_gate(h))
