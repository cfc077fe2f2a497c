"""CLIP image features for ``clip-fid``, from a local open_clip checkpoint (nothing is downloaded).

The image tower of open_clip's ViT models (ViT-B/32 for the FID of Kynkäänniemi et al. 2023 / clean-fid's
"clip_vit_b_32"), written here as a plain ``nn.Module`` that loads open_clip's state-dict layout (keys under
``visual.``: ``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
``transformer.resblocks.{i}.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_post``,
``proj``). Width, depth, patch size and input size are read from the tensors (heads = width / 64, open_clip's
head width); the activation is GELU (open_clip's ViT-B-32; the ``-quickgelu`` variants of OpenAI's weights use
``x * sigmoid(1.702 x)``: pass ``act="quickgelu"``). The feature is the projected class token
``ln_post(x[:, 0]) @ proj`` (``encode_image`` without normalisation).

Preprocessing: the whole image (no crop) resized to the tower's input side with antialiased bicubic
interpolation (``torch.nn.functional.interpolate``), scaled to [0, 1] and normalised with CLIP's mean and std.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from zoomfeat.encoders.weights import load_strict, read_state_dict
from zoomfeat.errors import CheckpointError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1 x), then x + mlp(ln_2 x)."""

    def __init__(self, width: int, heads: int, act: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width),
                                             gelu=QuickGELU() if act == "quickgelu" else nn.GELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, act: str):
        super().__init__()
        self.resblocks = nn.ModuleList([_Block(width, heads, act) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class ClipVisual(nn.Module):
    """open_clip's ViT image tower: uint8-free float input [B, 3, S, S] (normalised) -> features [B, out_dim]."""

    def __init__(self, width: int, layers: int, patch: int, image_size: int, out_dim: int, act: str = "gelu"):
        super().__init__()
        grid = image_size // patch
        self.image_size, self.dim = image_size, out_dim
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, width // HEAD_WIDTH, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid^2, width]
        cls = self.class_embedding.to(x.dtype).expand(len(x), 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> normalised float [B, 3, size, size] (module doc)."""
    x = images.float() / 255.0
    if tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                            antialias=True).clamp(0.0, 1.0)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def load_clip_visual(path: str | Path, act: str = "gelu") -> ClipVisual:
    """The image tower of a local open_clip ViT checkpoint (a state_dict, or a dict holding one under
    ``state_dict``); CheckpointError naming the file when the layout is not open_clip's ViT."""
    path = Path(path)
    state = read_state_dict(path, "state_dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    need = ("conv1.weight", "class_embedding", "positional_embedding", "proj", "ln_post.weight")
    missing = [k for k in need if k not in visual]
    if missing:
        raise CheckpointError(f"{path}: not an open_clip ViT checkpoint (no visual.{missing[0]}); give the "
                              "state_dict of an open_clip ViT model (e.g. ViT-B-32)")
    width, _, patch, _ = visual["conv1.weight"].shape
    tokens = visual["positional_embedding"].shape[0]
    grid = int(round((tokens - 1) ** 0.5))
    layers = len({k.split(".")[2] for k in visual if k.startswith("transformer.resblocks.")})
    model = ClipVisual(int(width), layers, int(patch), grid * int(patch), int(visual["proj"].shape[1]), act)
    load_strict(model, visual, path, "open_clip's ViT image tower (visual.*)")
    return model.eval()
