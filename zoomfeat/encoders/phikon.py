"""``phikon``: Owkin Phikon, an iBOT ViT-B/16 published in the Hugging Face ``ViTModel`` layout.

Official files (one folder): ``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``. There is
no transformers package here, so the model is timm's ``VisionTransformer`` built from ``config.json``
(hidden size, layers, heads, MLP size, patch size, image size, ``layer_norm_eps``, default 1e-6 when
absent) and the HF keys are mapped onto timm's: ``attn.qkv`` = cat(query, key, value) on dim 0, an
optional ``vit.`` prefix is stripped and ``pooler.*`` is ignored (``add_pooling_layer=False``). The
embedding is the CLS token of the last hidden state (768-d).

Preprocessing ASSUMPTION: Phikon's Hub ``preprocessor_config.json`` could not be read here; we assume
the ViT image processor's usual values for this model, resize to 224 px with ImageNet mean and std.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from zoomfeat.encoders.specs import PHIKON
from zoomfeat.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, ModuleEncoder, register_encoder
from zoomfeat.encoders.weights import (build_on_meta, fill_random, import_timm, load_strict, read_state_dict,
                                       resolve_file)
from zoomfeat.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class PhikonConfig:
    """The supported subset of a HF ``ViTConfig``: sizes in tokens/channels, ``image_size`` in px."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    patch_size: int = 16
    image_size: int = 224
    layer_norm_eps: float = 1e-6


# values other than these are refused: the timm build would silently compute something else
_REQUIRED = {"model_type": "vit", "hidden_act": "gelu", "qkv_bias": True, "num_channels": 3}


def parse_config(path: Path) -> PhikonConfig:
    """``config.json`` -> PhikonConfig; ConfigError naming the file and the unsupported field."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read Phikon config {path}: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"Phikon config {path} is not a JSON object")
    for field, value in _REQUIRED.items():
        if raw.get(field, value) != value:
            raise ConfigError(f"Phikon config {path}: {field}={raw[field]!r} is not supported (need {value!r})")
    values = {}
    for field, default in PhikonConfig.__dataclass_fields__.items():
        value = raw.get(field, default.default)
        kind = float if field == "layer_norm_eps" else int
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
                kind is int and value != int(value)):
            raise ConfigError(f"Phikon config {path}: {field}={value!r} must be a positive {kind.__name__}")
        values[field] = kind(value)
    config = PhikonConfig(**values)
    if config.hidden_size % config.num_attention_heads or config.image_size % config.patch_size:
        raise ConfigError(f"Phikon config {path}: hidden_size must divide by num_attention_heads and "
                          f"image_size by patch_size")
    return config


def phikon_architecture(config: PhikonConfig = PhikonConfig()) -> nn.Module:
    """timm VisionTransformer with the HF ViT's computation: CLS pooling, final LayerNorm, no head."""
    import_timm("phikon")
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.hidden_size,
        depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size, qkv_bias=True, num_classes=0,
        global_pool="token", norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
    )


_RENAMES = (  # HF ViTModel suffix -> timm suffix, inside encoder.layer.N / blocks.N
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.output.dense.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_QKV = re.compile(r"^attention\.attention\.(query|key|value)\.(weight|bias)$")


def hf_to_timm(state_dict: Mapping[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """HF ViTModel keys -> timm VisionTransformer keys; keys it does not know are kept as they are.

    Strips an optional ``vit.`` prefix, drops ``pooler.*``, concatenates query/key/value (dim 0) into
    ``blocks.N.attn.qkv``; CheckpointError when a layer has only some of query/key/value.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("vit.")
        if key.startswith("pooler."):
            continue
        layer = _LAYER.match(key)
        if key in _TOP:
            out[_TOP[key]] = tensor
        elif layer and _QKV.match(layer.group(2)):
            part, kind = _QKV.match(layer.group(2)).groups()
            qkv.setdefault((layer.group(1), kind), {})[part] = tensor
        elif layer and any(layer.group(2).startswith(hf) for hf, _ in _RENAMES):
            hf, tm = next((hf, tm) for hf, tm in _RENAMES if layer.group(2).startswith(hf))
            out[f"blocks.{layer.group(1)}.{tm}{layer.group(2)[len(hf):]}"] = tensor
        else:
            out[key] = tensor
    for (index, kind), parts in sorted(qkv.items()):
        absent = [p for p in ("query", "key", "value") if p not in parts]
        if absent:
            raise CheckpointError(f"{source}: encoder.layer.{index}.attention.attention has no "
                                  f"{'/'.join(absent)} {kind}; pass the official, unmodified Phikon file")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out


@register_encoder(PHIKON)
class PhikonEncoder(ModuleEncoder):
    """float [B, 3, 224, 224] -> CLS token of the last hidden state [B, 768]."""

    def __init__(self, spec: EncoderSpec, model: nn.Module, config: PhikonConfig) -> None:
        super().__init__(spec, model)
        self.config = config

    @classmethod
    def build(cls, spec: EncoderSpec, *, dim: int | None = None, seed: int = 0) -> "PhikonEncoder":
        return cls(spec, fill_random(build_on_meta(phikon_architecture), seed), PhikonConfig())

    @classmethod
    def from_weights(cls, spec: EncoderSpec, path: Path) -> "PhikonEncoder":
        file = resolve_file(path, spec.weight_files, "phikon")
        config_path = file.parent / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"phikon: {config_path} is missing: Phikon needs config.json beside "
                              f"{file.name} (the Hugging Face folder layout)")
        config = parse_config(config_path)
        if (config.hidden_size, config.image_size) != (spec.dim, spec.input_size):
            raise ConfigError(f"phikon: {config_path} has hidden_size {config.hidden_size} and image_size "
                              f"{config.image_size}; Phikon has {spec.dim} and {spec.input_size}")
        model = build_on_meta(partial(phikon_architecture, config))
        load_strict(model, hf_to_timm(read_state_dict(file), file), file, "Phikon ViTModel", assign=True)
        return cls(spec, model, config)
