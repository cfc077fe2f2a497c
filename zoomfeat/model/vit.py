"""The Summarizer's transformer: torchvision's ViT ``Encoder`` (official key names), with a stand-in.

The official Summarizer embeds ``torchvision.models.vision_transformer.Encoder``; we use it too. Where
torchvision cannot be imported (a torchvision build that does not match the installed torch), an
equivalent module with the same parameter names and the same computation is used instead
(pre-LayerNorm blocks, eps 1e-6, ``nn.MultiheadAttention``, GELU MLP, learned position embedding).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class _MLP(nn.Sequential):
    def __init__(self, dim: int, mlp_dim: int):
        super().__init__(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim), nn.Dropout(0.0))


class _EncoderBlock(nn.Module):
    def __init__(self, num_heads: int, dim: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, num_heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MLP(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = self.dropout(y) + x
        return x + self.mlp(self.ln_2(x))


class FallbackEncoder(nn.Module):
    """Same parameters and computation as torchvision's ViT ``Encoder`` (dropout 0)."""

    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", _EncoderBlock(num_heads, hidden_dim, mlp_dim)) for i in range(num_layers)
        ))
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


def torchvision_encoder_class():
    """torchvision's ``Encoder`` class, or ``None`` when torchvision cannot be imported here."""
    try:
        from torchvision.models.vision_transformer import Encoder
    except (ImportError, RuntimeError, OSError):
        return None
    return Encoder


def vit_encoder(seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int) -> nn.Module:
    """A ViT encoder over [B, seq_length, hidden_dim] tokens: torchvision's when available."""
    cls = torchvision_encoder_class()
    if cls is None:
        return FallbackEncoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim)
    return cls(seq_length=seq_length, num_layers=num_layers, num_heads=num_heads, hidden_dim=hidden_dim,
               mlp_dim=mlp_dim, dropout=0.0, attention_dropout=0.0)
