"""``dinov2``: DINOv2 ViT-L/14 with four registers (Darcet et al. 2024), the conditioner of ZoomLDM's
satellite (NAIP) model and a general-purpose encoder for plain images.

Architecture: timm ``vit_large_patch14_reg4_dinov2`` (518-px position grid, interpolated for other sizes with
``dynamic_img_size``), embedding = CLS token after the final norm (1024-d). Weights, both local files:
``model.safetensors`` in timm's layout (the timm release of ``lvd142m``), loaded strictly; or the official
``dinov2_vitl14_reg4_pretrain.pth`` (Meta's layout: ``register_tokens``, ``mask_token``, a position table that
includes the CLS slot), converted by timm's own checkpoint filter, then loaded strictly. Preprocessing: resize to
224 px (16x16 patches of 14 px), ImageNet mean and std.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from zoomfeat.encoders.specs import DINOV2
from zoomfeat.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, ModuleEncoder, register_encoder
from zoomfeat.encoders.weights import (build_on_meta, fill_random, import_timm, load_strict, read_state_dict,
                                       resolve_file)


def dinov2_architecture(**overrides) -> nn.Module:
    """timm's DINOv2 ViT-L/14-reg4 (random init); ``overrides`` (depth, embed_dim, ...) only for tests."""
    timm = import_timm("dinov2")
    return timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                             dynamic_img_size=True, **overrides)


def to_timm_layout(state_dict: dict, model: nn.Module) -> dict:
    """Meta's DINOv2 layout -> timm's (no-op for a timm-layout file)."""
    if "mask_token" not in state_dict and "register_tokens" not in state_dict:
        return state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(dict(state_dict), model)


@register_encoder(DINOV2)
class DINOv2Encoder(ModuleEncoder):
    """float [B, 3, H, W] (224 after ``preprocess``; any multiple of 14 works) -> CLS [B, 1024]."""

    @classmethod
    def build(cls, spec: EncoderSpec, *, dim: int | None = None, seed: int = 0) -> "DINOv2Encoder":
        return cls(spec, fill_random(build_on_meta(dinov2_architecture), seed))

    @classmethod
    def from_weights(cls, spec: EncoderSpec, path: Path) -> "DINOv2Encoder":
        file = resolve_file(path, spec.weight_files, "dinov2")
        model = build_on_meta(dinov2_architecture)
        state = to_timm_layout(read_state_dict(file), model)  # the filter reads shapes only
        load_strict(model, state, file, "DINOv2 ViT-L/14-reg4 (timm layout)", assign=True)
        return cls(spec, model)
