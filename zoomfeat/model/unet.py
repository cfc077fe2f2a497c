"""The ZoomLDM denoising U-Net in the official openaimodel ``UNetModel`` layout and parameter names.

``input_blocks`` / ``middle_block`` / ``output_blocks`` are lists of :class:`TimestepEmbedSequential`
(ResBlock, optional SpatialTransformer, optional Down/Upsample) exactly as the official constructor builds
them, so the state_dict keys match. :meth:`UNetModel.features` stops after ``output_blocks[block]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoomfeat.errors import ConfigError
from zoomfeat.model.attention import SpatialTransformer
from zoomfeat.model.config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of timesteps [B]: cosines first, then sines (zero-padded when odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _zero(module: nn.Module) -> None:
    for p in module.parameters():
        nn.init.zeros_(p)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in float32 and cast back (as the official ``normalization``)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-dropout-conv, skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0,
                 use_scale_shift_norm: bool = False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv (``op``), or 2x2 average pooling when ``conv_resample`` is off."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv (``conv``) when ``conv_resample`` is on."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """eps-predicting U-Net: x_t [B,in,H,W], t [B], context [B,M,context_dim] -> [B,out,H,W]."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks[level]):
                layers = [self._res(ch, mult * mc, emb_dim)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(self._transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, cfg.conv_resample)))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            self._res(ch, ch, emb_dim), self._transformer(ch), self._res(ch, ch, emb_dim)
        )
        self.output_blocks = nn.ModuleList()
        self.output_channels: list[int] = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks[level] + 1):
                layers = [self._res(ch + skip_chans.pop(), mc * mult, emb_dim)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(self._transformer(ch))
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(Upsample(ch, cfg.conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self.output_channels.append(ch)
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        self._zero_init()

    def _zero_init(self) -> None:
        """Zero the last layer of every residual branch and the output conv, as the official init does."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                _zero(m.out_layers[-1])
            elif isinstance(m, SpatialTransformer):
                _zero(m.proj_out)
        _zero(self.out[-1])

    def _res(self, ch_in: int, ch_out: int, emb_dim: int) -> ResBlock:
        return ResBlock(ch_in, emb_dim, ch_out, self.cfg.dropout, self.cfg.use_scale_shift_norm)

    def _transformer(self, ch: int) -> SpatialTransformer:
        heads, dim_head = self.cfg.heads_at(ch)
        return SpatialTransformer(ch, heads, dim_head, self.cfg.transformer_depth, self.cfg.context_dim,
                                  self.cfg.use_linear_in_transformer)

    def _encode(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
        """Timestep embedding, input blocks (keeping skips) and middle block."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        skips, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        return self.middle_block(h, emb, context), emb, skips

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h, emb, skips = self._encode(x, t, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def features(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, block: int | None) -> torch.Tensor:
        """Activation of ``output_blocks[block]`` (``None``: the middle block); later blocks never run."""
        n = len(self.output_blocks)
        if block is not None and not 0 <= block < n:
            raise ConfigError(f"block {block} out of range: this U-Net has output blocks 0..{n - 1} (use --block 0..{n - 1})")
        h, emb, skips = self._encode(x, t, context)
        if block is None:
            return h
        for module in self.output_blocks[: block + 1]:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        return h
