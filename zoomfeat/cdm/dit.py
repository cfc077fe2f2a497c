"""The CDM's Diffusion Transformer over the 65 Summarizer context tokens (official ``cdm_dit/models.py`` layout).

Input ``x`` is a context transposed to ``[B, C, 65]``; tokens are embedded by one linear layer plus a fixed 1-D
sin-cos position table, the conditioning vector ``c = t_emb + y_emb`` (timestep MLP of a 256-d sinusoid, and the
magnification embedding) drives adaLN-Zero blocks (shift, scale, gate for attention, then for the MLP), and
the final layer returns ``[B, 2C, 65]`` (first C channels: the x0 prediction; last C: the variance values of the
learned-range parameterisation). Parameter names are the official ones (Peebles & Xie's DiT, as adapted by
ZoomLDM), so official CDM weights load strictly.

An optional external conditioning vector (``cond_dim > 0``; a one-hot class or any embedding) is concatenated
to the magnification embedding and projected back to the hidden width by ``cond_embedder`` (the only key that
the official model lacks), which turns the CDM into Graikos et al.'s auxiliary model p(z | c).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zoomfeat.errors import CheckpointError, ConfigError
from zoomfeat.torch_files import load_torch_file

FREQUENCY_DIM = 256  # width of the sinusoidal timestep features fed to the timestep MLP
# official sizes (cdm_dit/models.py): depth, hidden, heads
PRESETS: dict[str, tuple[int, int, int]] = {
    "DiT-S": (12, 384, 6), "DiT-B": (12, 768, 12), "DiT-L": (24, 1024, 16), "DiT-XL": (28, 1152, 16),
}
_HEADS_BY_HIDDEN = {hidden: heads for _, hidden, heads in PRESETS.values()}


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a CDM DiT; the defaults are the official DiT-B over 512-wide ZoomLDM contexts."""

    in_channels: int = 512          # context width D
    num_tokens: int = 65            # context length (1 magnification token + 64 grid tokens)
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 8            # magnification levels
    class_dropout_prob: float = 0.0  # > 0 adds the null row used by classifier-free guidance
    learn_sigma: bool = True
    cond_dim: int = 0               # width of the optional external conditioning vector

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_tokens", "hidden_size", "depth", "num_heads", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} = {getattr(self, name)} must be at least 1")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size {self.hidden_size} is not divisible by model.num_heads "
                              f"{self.num_heads}: pick heads that divide it")
        if self.hidden_size % 2:
            raise ConfigError(f"model.hidden_size {self.hidden_size} must be even (sin-cos position table)")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"model.class_dropout_prob {self.class_dropout_prob} must be in [0, 1)")
        if self.mlp_ratio <= 0 or self.cond_dim < 0:
            raise ConfigError("model.mlp_ratio must be positive and model.cond_dim 0 or more")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def has_null_class(self) -> bool:
        """Whether the label table has the extra row that classifier-free guidance needs."""
        return self.class_dropout_prob > 0


def preset(name: str, **overrides) -> DiTConfig:
    """``DiTConfig`` of an official size (``DiT-S``, ``DiT-B``, ``DiT-L``, ``DiT-XL``) with other fields set."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model.size {name!r}: use one of {', '.join(PRESETS)}")
    depth, hidden, heads = PRESETS[name]
    return DiTConfig(**{"depth": depth, "hidden_size": hidden, "num_heads": heads, **overrides})


def sincos_table(dim: int, positions: int) -> np.ndarray:
    """Fixed 1-D position table float64 [positions, dim]: ``[sin(p w_d), cos(p w_d)]``, ``w_d = 10000^(-2d/dim)``."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.arange(positions, dtype=np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def timestep_features(t: torch.Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of (integer or fractional) timesteps: ``[cos(t f_k), sin(t f_k)]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Magnification embedding; with dropout the table has a null row (index ``num_classes``)."""

    def __init__(self, num_classes: int, hidden: int, with_null: bool):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(with_null), hidden)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            labels = torch.where(drop.bool(), torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm ``Attention`` names: ``qkv``, ``proj``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> tanh-approximated GELU -> fc2 (timm ``Mlp`` names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: chunks (shift, scale, gate) for attention, then for the MLP."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """``forward(x [B,C,T], t [B], y [B], cond [B,E] | None, drop [B] | None) -> [B, out_channels, T]``.

    ``drop`` marks samples whose conditions are replaced by the null ones (the null magnification row and a
    zero external vector): label dropout during training, the unconditional half under guidance.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.x_embedder = nn.Linear(cfg.in_channels, h)
        self.t_embedder = TimestepEmbedder(h)
        self.y_embedder = LabelEmbedder(cfg.num_classes, h, cfg.has_null_class)
        if cfg.cond_dim:
            self.cond_embedder = nn.Linear(h + cfg.cond_dim, h)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, h), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(h, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(h, cfg.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The official initialisation: Xavier linears with zero biases, N(0, 0.02) label table and timestep
        MLP weights, zeroed adaLN modulations and output layer (so a fresh model predicts x0 = 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.copy_(torch.from_numpy(sincos_table(self.cfg.hidden_size, self.cfg.num_tokens))[None])
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                     self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.cfg.cond_dim:  # starts as the magnification-only model: identity on y_emb, zero on cond
            h = self.cfg.hidden_size
            self.cond_embedder.weight.zero_()
            self.cond_embedder.weight[:, :h].copy_(torch.eye(h))

    def condition(self, t: torch.Tensor, y: torch.Tensor, cond: torch.Tensor | None = None,
                  drop: torch.Tensor | None = None) -> torch.Tensor:
        """The adaLN conditioning vector c [B, hidden]."""
        y_emb = self.y_embedder(y, drop)
        if self.cfg.cond_dim:
            if cond is None or cond.shape != (len(y), self.cfg.cond_dim):
                got = None if cond is None else tuple(cond.shape)
                raise ConfigError(f"this CDM takes an external conditioning vector [B, {self.cfg.cond_dim}], "
                                  f"got {got}: pass cond")
            cond = cond.to(y_emb.dtype)
            if drop is not None:
                cond = cond * (~drop.bool()).to(cond.dtype)[:, None]
            y_emb = self.cond_embedder(torch.cat([y_emb, cond], dim=1))
        elif cond is not None:
            raise ConfigError("this CDM was built without an external condition (model.cond_dim 0): drop cond")
        return self.t_embedder(t) + y_emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cond: torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        c = self.condition(t, y, cond, drop)
        h = self.x_embedder(x.transpose(1, 2)) + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h, c).transpose(1, 2)


# -- weights -------------------------------------------------------------------------------------------------

def read_dit_checkpoint(path: str | Path, entry: str = "ema") -> tuple[dict[str, torch.Tensor], DiTConfig | None]:
    """(flat DiT state_dict, architecture or None) of a flat file or of the official training checkpoint
    ``{"model","ema","opt","args"}`` (its ``entry``: ``"ema"`` as the official evaluation loads it, or ``"model"``
    for the raw weights). The architecture comes from ``args`` when it is a dict of :class:`DiTConfig` fields
    (train-cdm's exports); the official ``args`` (an argparse Namespace) names only the size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"CDM weights {path} not found: pass a train-cdm run folder or an official .pt")
    obj = load_torch_file(path, "CDM weights", allowed=[argparse.Namespace],  # the official "args" entry
                          fix="pass a train-cdm run folder or an official CDM .pt")
    cfg = None
    if isinstance(obj, Mapping) and "ema" in obj and "model" in obj:
        args = obj.get("args")
        if isinstance(args, Mapping) and set(args) == {f.name for f in fields(DiTConfig)}:
            cfg = DiTConfig(**args)
        obj = obj[entry]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is neither a DiT state_dict nor an official CDM checkpoint with 'ema'")
    return {k.removeprefix("module."): v for k, v in obj.items()}, cfg


def read_dit_state(path: str | Path, entry: str = "ema") -> dict[str, torch.Tensor]:
    """The flat DiT state_dict of :func:`read_dit_checkpoint`."""
    return read_dit_checkpoint(path, entry)[0]


def infer_config(state: Mapping[str, torch.Tensor], num_heads: int | None = None, **overrides) -> DiTConfig:
    """Architecture from a state_dict's shapes; heads come from the official sizes unless given."""
    try:
        hidden, in_channels = state["x_embedder.weight"].shape
        num_tokens = state["pos_embed"].shape[1]
        rows = state["y_embedder.embedding_table.weight"].shape[0]
        out_channels = state["final_layer.linear.weight"].shape[0]
        fc1 = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a CDM DiT state_dict: key {e.args[0]} missing") from e
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    heads = num_heads or _HEADS_BY_HIDDEN.get(int(hidden))
    if heads is None:
        raise CheckpointError(f"hidden size {hidden} is not an official DiT size: give model.num_heads")
    cond = state.get("cond_embedder.weight")
    values = dict(in_channels=int(in_channels), num_tokens=int(num_tokens), hidden_size=int(hidden), depth=depth,
                  num_heads=int(heads), mlp_ratio=fc1 / hidden, learn_sigma=out_channels == 2 * in_channels,
                  cond_dim=0 if cond is None else int(cond.shape[1] - hidden))
    values.update(overrides)
    null = rows - int(values.get("num_classes", 8))
    if null not in (0, 1):
        raise CheckpointError(f"label table has {rows} rows: expected num_classes (8) or num_classes + 1")
    values.setdefault("num_classes", rows - null)
    if null and not values.get("class_dropout_prob"):
        values["class_dropout_prob"] = 0.1  # trained with label dropout; the rate only matters for training
    return DiTConfig(**values)


def load_dit(cfg: DiTConfig | None, weights: str | Path, num_heads: int | None = None) -> DiT:
    """A DiT with ``weights`` loaded strictly (official key names); ``cfg=None`` takes the checkpoint's recorded
    architecture, else infers it from the shapes."""
    from zoomfeat.model.checkpoint import load_strict

    state, recorded = read_dit_checkpoint(weights)
    cfg = cfg or recorded or infer_config(state, num_heads)
    if num_heads is not None:
        cfg = replace(cfg, num_heads=num_heads)
    model = DiT(cfg)
    load_strict(model, state, str(weights))
    return model.eval()
