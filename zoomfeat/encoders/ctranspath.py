"""``ctranspath``: CTransPath, a Swin-T (window 7) whose patch embedding is a convolutional stem.

Official file: ``ctranspath.pth``, ``{"model": state_dict}`` saved by timm 0.5.4, whose Swin layout
differs from timm 1.x: PatchMerging sits at the end of stages 0-2 there (``layers.i.downsample``), at
the start of stages 1-3 here (``layers.{i+1}.downsample``), and ``relative_position_index`` /
``attn_mask`` were persistent buffers. ``convert_swin_054`` maps the old layout; the load is strict.
Embedding: final LayerNorm, then the mean over the 7x7 tokens (768-d). Input is fixed at 224x224.
Preprocessing (TransPath ``get_features_CTransPath.py``): resize to 224 px, ImageNet mean and std.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from zoomfeat.encoders.specs import CTRANSPATH
from zoomfeat.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, ModuleEncoder, register_encoder
from zoomfeat.encoders.weights import import_timm, load_strict, read_state_dict, resolve_file


class ConvStem(nn.Module):
    """CTransPath's patch embedding: float [B, 3, 224, 224] -> NHWC [B, 56, 56, embed_dim].

    Conv3x3/2 (3 -> embed_dim/8, no bias), BN, ReLU, Conv3x3/2 (-> embed_dim/4, no bias), BN, ReLU,
    Conv1x1 (-> embed_dim, bias), then LayerNorm over channels. State-dict indices ``proj.0,1,3,4,6``
    and ``norm`` as in the official file. Takes timm 1.x's ``embed_layer`` keyword arguments.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer=nn.LayerNorm, strict_img_size: bool = True, output_fmt: str = "NHWC",
                 device=None, dtype=None) -> None:
        super().__init__()
        if patch_size != 4 or output_fmt != "NHWC":
            raise ValueError("ConvStem supports patch_size 4 and NHWC output only")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (4, 4)
        self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        kw = {"device": device, "dtype": dtype}
        width = embed_dim // 8
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False, **kw), nn.BatchNorm2d(width, **kw),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False, **kw), nn.BatchNorm2d(2 * width, **kw),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, embed_dim, 1, **kw),
        )
        self.norm = norm_layer(embed_dim, **kw) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"CTransPath takes {self.img_size} inputs, got {tuple(x.shape[-2:])}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def ctranspath_architecture() -> nn.Module:
    """timm 1.x Swin-T/4 window 7 with ``ConvStem`` and no head (timm's random init)."""
    timm = import_timm("ctranspath")
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_layer=ConvStem,
                             num_classes=0)


_OLD_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def convert_swin_054(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm 0.5.4 Swin keys -> timm 1.x keys (unchanged when already in the new layout).

    The old layout is recognised by ``layers.0.downsample.*`` (stage 0 has no PatchMerging in 1.x).
    Drops ``relative_position_index`` and ``attn_mask`` buffers, moves ``layers.i.downsample`` to
    ``layers.{i+1}.downsample`` and ``head.`` to ``head.fc.``.
    """
    old = any(k.startswith("layers.0.downsample.") for k in state_dict)
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        if old:
            key = _OLD_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
            key = re.sub(r"^head\.", "head.fc.", key)
        out[key] = tensor
    return out


@register_encoder(CTRANSPATH)
class CTransPathEncoder(ModuleEncoder):
    """float [B, 3, 224, 224] -> mean of the final-norm tokens [B, 768]."""

    @classmethod
    def build(cls, spec: EncoderSpec, *, dim: int | None = None, seed: int = 0) -> "CTransPathEncoder":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(spec, ctranspath_architecture())

    @classmethod
    def from_weights(cls, spec: EncoderSpec, path: Path) -> "CTransPathEncoder":
        file = resolve_file(path, spec.weight_files, "ctranspath")
        state = convert_swin_054(read_state_dict(file, container_key="model"))
        model = ctranspath_architecture()
        load_strict(model, state, file, "CTransPath (Swin-T + ConvStem, timm 0.5.4 layout)")
        return cls(spec, model)
