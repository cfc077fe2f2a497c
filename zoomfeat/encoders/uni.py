"""``uni``: MahmoodLab UNI, a ViT-L/16 (timm ``vit_large_patch16_224``) trained with DINOv2 on 20x tiles.

Official file: ``pytorch_model.bin``, a plain state_dict in timm's layout, loaded strictly into
``vit_large_patch16_224(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
dynamic_img_size=True)``. The embedding is the CLS token after the final norm (1024-d). Preprocessing
(UNI's model card): resize to 224 px, ImageNet mean and std.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from zoomfeat.encoders.specs import UNI
from zoomfeat.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, ModuleEncoder, register_encoder
from zoomfeat.encoders.weights import (build_on_meta, fill_random, import_timm, load_strict, read_state_dict,
                                       resolve_file)


def uni_architecture() -> nn.Module:
    """UNI's timm ViT-L/16 exactly as its model card builds it (random init by timm)."""
    timm = import_timm("uni")
    return timm.create_model("vit_large_patch16_224", pretrained=False, img_size=224, patch_size=16,
                             init_values=1e-5, num_classes=0, dynamic_img_size=True)


@register_encoder(UNI)
class UNIEncoder(ModuleEncoder):
    """float [B, 3, H, W] (224 after ``preprocess``; any multiple of 16 works) -> CLS [B, 1024]."""

    @classmethod
    def build(cls, spec: EncoderSpec, *, dim: int | None = None, seed: int = 0) -> "UNIEncoder":
        return cls(spec, fill_random(build_on_meta(uni_architecture), seed))

    @classmethod
    def from_weights(cls, spec: EncoderSpec, path: Path) -> "UNIEncoder":
        file = resolve_file(path, spec.weight_files, "uni")
        model = build_on_meta(uni_architecture)
        load_strict(model, read_state_dict(file), file, "UNI ViT-L/16 (timm layout)", assign=True)
        return cls(spec, model)
