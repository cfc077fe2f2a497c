"""ABMIL: gated-attention MIL (Ilse, Tomczak & Welling, ICML 2018); registry id ``abmil``.

Linear(D, 512) + ReLU + Dropout(0.25) embeds each instance h_k; gated attention (section 2.4, eq. 9)
a_k = softmax_k(w^T (tanh(V h_k) * sigm(U h_k))) with V, U: 512 -> 256; the bag is z = sum_k a_k h_k (eq. 7);
Linear(512, C) gives the logits. Attention for heatmaps: a_k.
"""

from __future__ import annotations

from mil.layers import GatedAttention, embedding, masked_softmax
from mil.registry import MILHead, MILOutput, register_model

from torch import nn


@register_model("abmil")
class ABMIL(MILHead):
    """Gated-attention MIL: Linear(D, 512) + ReLU + Dropout(0.25), attention 512 -> 256 -> 1, Linear(512, C)."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25):
        super().__init__()
        self.embed = embedding(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x, mask=None, label=None) -> MILOutput:
        h = self.embed(x)  # [B, N, H]
        a = masked_softmax(self.attention(h).squeeze(-1), mask)  # [B, N]
        return MILOutput(self.classifier((a.unsqueeze(-2) @ h).squeeze(-2)), a)
