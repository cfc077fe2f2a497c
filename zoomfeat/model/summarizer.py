"""Summarizer (official ``EmbeddingViT2_5``): a UNI grid + magnification index -> context tokens [B, 1+S, D].

Each grid [C,h,w] of conditioning embeddings is projected (``dim_reduce``) to D channels; grids with fewer
than S = seq_length positions sit at the centre of S tokens, the rest filled with the learned ``pad_token``;
the magnification embedding is prepended, then a ViT encoder, ``final_proj`` and a final LayerNorm.
:func:`preprocess_ssl` is the official dataset-side preprocessing of a raw grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import Encoder as ViTEncoder

from zoomfeat.errors import DataError
from zoomfeat.model.config import SummarizerConfig


def preprocess_ssl(grid: torch.Tensor, side: int = 8) -> torch.Tensor:
    """Raw grid [C,h,w] (or a batch [B,C,h,w]) -> adaptive-average-pooled to ``side`` x ``side`` when wider,
    then standardised per location over channels: (x - mean) / (std + 1e-8), unbiased std. Float32."""
    if grid.dim() not in (3, 4):
        raise DataError(f"conditioning grid must be [C,h,w] or [B,C,h,w], got shape {tuple(grid.shape)}")
    x = grid.float()
    if x.shape[-2] > side or x.shape[-1] > side:
        x = F.adaptive_avg_pool2d(x, (side, side))
    mean = x.mean(dim=-3, keepdim=True)
    std = x.std(dim=-3, keepdim=True, unbiased=True)
    return (x - mean) / (std + 1e-8)


class Summarizer(nn.Module):
    """UNI grids + magnification indices -> context [B, 1+seq_length, output_channels]."""

    def __init__(self, cfg: SummarizerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_channels
        self.mag_embedding = nn.Embedding(cfg.mag_levels, d)
        self.dim_reduce = nn.Linear(cfg.input_channels, d)
        self.pad_token = nn.Parameter(torch.randn(1, 1, d))
        # torchvision's ViT Encoder, as the official Summarizer: its parameter names are the checkpoint's
        self.encoder = ViTEncoder(seq_length=cfg.seq_length + 1, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                                  hidden_dim=d, mlp_dim=cfg.vit_mlp_dim, dropout=0.0, attention_dropout=0.0)
        self.final_proj = nn.Linear(d, cfg.output_channels)
        self.layer_norm = nn.LayerNorm(d)

    def tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """One preprocessed grid [C,h,w] -> [seq_length, D]: projected positions, centred among pad tokens."""
        if grid.dim() == 2:
            grid = grid[None]
        grid = grid.to(device=self.pad_token.device, dtype=self.pad_token.dtype)
        c, h, w = grid.shape
        s = self.cfg.seq_length
        if c != self.cfg.input_channels:
            raise DataError(f"conditioning grid has {c} channels, the Summarizer expects {self.cfg.input_channels}")
        n = h * w
        side = self.cfg.grid_side
        if h >= side and w >= side:
            if n != s:
                raise DataError(f"conditioning grid {h}x{w} must be pooled to {side}x{side} (use preprocess_ssl)")
            return self.dim_reduce(grid.reshape(c, n).t())
        x = self.dim_reduce(grid.reshape(c, n).t())
        start = s // 2 - n // 2
        out = self.pad_token[0].expand(s, -1).clone()
        out[start:start + n] = x
        return out

    def forward(self, grids: list[torch.Tensor] | torch.Tensor, mags: torch.Tensor) -> torch.Tensor:
        """Preprocessed grids (list of [C,h,w], or a [B,C,h,w] tensor) + LongTensor [B] -> [B, 1+S, D]."""
        x = torch.stack([self.tokens(g) for g in grids])
        if len(mags) != len(x):
            raise DataError(f"{len(x)} conditioning grids but {len(mags)} magnification indices")
        if int(mags.min()) < 0 or int(mags.max()) >= self.cfg.mag_levels:
            raise DataError(f"magnification index out of 0..{self.cfg.mag_levels - 1}: {mags.tolist()}")
        mag = self.mag_embedding(mags.to(x.device).long())[:, None]
        x = self.encoder(torch.cat([mag, x], dim=1))
        return self.layer_norm(self.final_proj(x))
