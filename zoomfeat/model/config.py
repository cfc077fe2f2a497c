"""Typed, frozen view of an official ZoomLDM ``config.yaml``.

The official file describes a ``LatentDiffusion`` model with ``target:`` strings; we read only the values
(never import the targets) into small frozen dataclasses and validate them before any module is built.
Defaults are the official constructors' defaults, so a config that omits a value builds the same network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from zoomfeat.errors import ConfigError, one_line


@dataclass(frozen=True)
class UNetConfig:
    """``unet_config.params`` (openaimodel UNetModel with spatial transformers)."""

    image_size: int
    in_channels: int
    out_channels: int
    model_channels: int
    attention_resolutions: tuple[int, ...]
    num_res_blocks: tuple[int, ...]          # per level (an int in the yaml is repeated)
    channel_mult: tuple[int, ...]
    context_dim: int
    num_heads: int = -1
    num_head_channels: int = -1
    transformer_depth: int = 1
    use_scale_shift_norm: bool = False
    conv_resample: bool = True
    use_linear_in_transformer: bool = False
    dropout: float = 0.0
    use_checkpoint: bool = False
    use_fp16: bool = False

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) of a spatial transformer on ``channels`` channels.

        ``num_head_channels`` wins when set; otherwise ``num_heads`` heads, so the legacy ``num_heads=1``
        is one head as wide as the layer.
        """
        if self.num_head_channels != -1:
            heads = channels // self.num_head_channels
        else:
            heads = self.num_heads
        return heads, channels // heads

    def level_channels(self) -> tuple[int, ...]:
        return tuple(m * self.model_channels for m in self.channel_mult)


@dataclass(frozen=True)
class FirstStageConfig:
    """``first_stage_config.params`` (VQModelInterface: VQ-f4 encoder/decoder + codebook)."""

    embed_dim: int
    n_embed: int
    z_channels: int
    resolution: int
    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    double_z: bool = False

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class SummarizerConfig:
    """``cond_stage_config.params`` (EmbeddingViT2_5: UNI grid + magnification -> context tokens)."""

    input_channels: int = 1024
    hidden_channels: int = 512
    vit_mlp_dim: int = 2048
    output_channels: int = 512
    seq_length: int = 64
    mag_levels: int = 8
    num_layers: int = 12
    num_heads: int = 8
    p_uncond: float = 0.0

    @property
    def grid_side(self) -> int:
        """Side of the square token grid the conditioning is pooled to (8 for 64 tokens)."""
        return int(round(self.seq_length**0.5))


@dataclass(frozen=True)
class DiffusionConfig:
    """``model.params`` of LatentDiffusion that the forward process and samplers use."""

    timesteps: int = 1000
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    beta_schedule: str = "linear"
    image_size: int = 64
    channels: int = 3
    scale_factor: float = 1.0
    parameterization: str = "eps"
    use_ema: bool = True
    conditioning_key: str = "crossattn"


@dataclass(frozen=True)
class ZoomLDMConfig:
    """Everything needed to build a ZoomLDM; ``source`` is the yaml path it came from (or ``None``)."""

    diffusion: DiffusionConfig
    unet: UNetConfig
    first_stage: FirstStageConfig
    summarizer: SummarizerConfig
    source: str | None = None


def _section(tree: Mapping[str, Any], path: tuple[str, ...], where: str) -> Mapping[str, Any]:
    node: Any = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise ConfigError(f"{where}: missing '{'.'.join(path)}' (is this an official ZoomLDM config.yaml?)")
        node = node[key]
    if node is None:
        return {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"{where}: '{'.'.join(path)}' must be a mapping, got {type(node).__name__}")
    return node


def _build(cls, values: Mapping[str, Any], where: str, section: str, convert: dict | None = None):
    """Pick the dataclass fields out of ``values``; convert lists to tuples; check required values."""
    convert = convert or {}
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        try:
            kwargs[f.name] = convert[f.name](value) if f.name in convert else value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: bad value {section}.{f.name}={value!r} ({e})") from e
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: incomplete '{section}' section ({e})") from e


def _ints(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (int, float)):
        return (int(value),)
    return tuple(int(v) for v in value)


def _check_positive(where: str, **values: int) -> None:
    for name, value in values.items():
        if int(value) <= 0:
            raise ConfigError(f"{where}: {name} must be positive, got {value}")


def _unet_config(params: Mapping[str, Any], where: str) -> UNetConfig:
    if not params.get("use_spatial_transformer", False):
        raise ConfigError(f"{where}: unet_config.params.use_spatial_transformer must be true (ZoomLDM layout)")
    for key, ok in (("dims", 2), ("num_classes", None), ("n_embed", None), ("resblock_updown", False),
                    ("legacy", True), ("disable_self_attentions", None), ("num_attention_blocks", None),
                    ("disable_middle_self_attn", False)):
        if params.get(key, ok) != ok:
            raise ConfigError(f"{where}: unet_config.params.{key}={params[key]!r} is not supported (use {ok!r})")
    channel_mult = _ints(params.get("channel_mult", (1, 2, 4, 8)))
    nrb = params.get("num_res_blocks")
    nrb = (int(nrb),) * len(channel_mult) if isinstance(nrb, int) else _ints(nrb)
    cfg = _build(UNetConfig, {**params, "num_res_blocks": nrb, "channel_mult": channel_mult}, where,
                 "unet_config.params", {"attention_resolutions": _ints, "context_dim": int})
    if len(cfg.num_res_blocks) != len(cfg.channel_mult):
        raise ConfigError(f"{where}: num_res_blocks {cfg.num_res_blocks} must be one int or one per channel_mult level")
    if cfg.num_heads == -1 and cfg.num_head_channels == -1:
        raise ConfigError(f"{where}: set unet_config.params.num_heads or num_head_channels")
    _check_positive(where, model_channels=cfg.model_channels, transformer_depth=cfg.transformer_depth)
    for ch in cfg.level_channels():
        heads, _ = cfg.heads_at(ch)
        if ch % 32 or heads <= 0 or ch % heads:
            raise ConfigError(f"{where}: {ch} U-Net channels must be a multiple of 32 and of the head count {heads}")
    return cfg


def _first_stage_config(params: Mapping[str, Any], where: str) -> FirstStageConfig:
    dd = _section(params, ("ddconfig",), where)
    cfg = _build(FirstStageConfig, {**dd, **{k: params[k] for k in ("embed_dim", "n_embed") if k in params}},
                 where, "first_stage_config.params", {"ch_mult": _ints, "attn_resolutions": _ints})
    if cfg.double_z:
        raise ConfigError(f"{where}: ddconfig.double_z=true is a KL autoencoder; ZoomLDM uses a VQ first stage")
    for c in (cfg.ch, *(cfg.ch * m for m in cfg.ch_mult)):
        if c % 32:
            raise ConfigError(f"{where}: first-stage widths must be multiples of 32 (GroupNorm), got {c}")
    return cfg


def _summarizer_config(params: Mapping[str, Any], where: str) -> SummarizerConfig:
    cfg = _build(SummarizerConfig, params, where, "cond_stage_config.params")
    side = cfg.grid_side
    if side * side != cfg.seq_length:
        raise ConfigError(f"{where}: cond_stage_config.params.seq_length={cfg.seq_length} must be a square")
    if cfg.hidden_channels % cfg.num_heads:
        raise ConfigError(f"{where}: hidden_channels {cfg.hidden_channels} not divisible by num_heads {cfg.num_heads}")
    if cfg.output_channels != cfg.hidden_channels:
        raise ConfigError(f"{where}: output_channels must equal hidden_channels (the final LayerNorm is that wide)")
    return cfg


def parse_config(tree: Mapping[str, Any], where: str = "<config>") -> ZoomLDMConfig:
    """Validate an official config tree (the yaml as loaded) into a :class:`ZoomLDMConfig`."""
    params = _section(tree, ("model", "params"), where)
    diffusion = _build(DiffusionConfig, params, where, "model.params",
                       {"timesteps": int, "linear_start": float, "linear_end": float, "scale_factor": float})
    if diffusion.beta_schedule != "linear" or diffusion.parameterization != "eps":
        raise ConfigError(f"{where}: only beta_schedule=linear and parameterization=eps are supported")
    if diffusion.conditioning_key != "crossattn":
        raise ConfigError(f"{where}: conditioning_key must be 'crossattn', got {diffusion.conditioning_key!r}")
    unet = _unet_config(_section(params, ("unet_config", "params"), where), where)
    first = _first_stage_config(_section(params, ("first_stage_config", "params"), where), where)
    summ = _summarizer_config(_section(params, ("cond_stage_config", "params"), where), where)
    if unet.context_dim != summ.output_channels:
        raise ConfigError(f"{where}: unet context_dim {unet.context_dim} != summarizer output {summ.output_channels}")
    if unet.in_channels != first.embed_dim:
        raise ConfigError(f"{where}: unet in_channels {unet.in_channels} != first-stage embed_dim {first.embed_dim}")
    return ZoomLDMConfig(diffusion, unet, first, summ, source=None if where == "<config>" else where)


def config_path(config: str | Path) -> Path:
    """The yaml file named by ``config`` (a file, or a folder holding ``config.yaml``)."""
    path = Path(config)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"ZoomLDM config {path} not found: pass the official config.yaml or its folder")
    return path


def read_config(config: str | Path | Mapping[str, Any] | ZoomLDMConfig) -> ZoomLDMConfig:
    """Read an official ZoomLDM ``config.yaml`` (path, folder, loaded mapping, or an already parsed config)."""
    if isinstance(config, ZoomLDMConfig):
        return config
    if isinstance(config, Mapping):
        return parse_config(config)
    import yaml

    path = config_path(config)
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({one_line(e)})") from e
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top of the file")
    return parse_config(tree, str(path))
