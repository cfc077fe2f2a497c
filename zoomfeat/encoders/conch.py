"""``conch``: MahmoodLab CONCH's image encoder (the vision tower of a CoCa model: a ViT-B/16 trunk at 448 px and
an attentional pooler), the embedding the ZoomLDM super-resolution table's CONCH column compares.

Official file: ``pytorch_model.bin``, the whole CoCa state_dict (image and text towers). The image embedding
used for tiles (CONCH's README: ``encode_image(image, proj_contrast=False, normalize=False)``, i.e. the
vision tower's ``forward_no_head``) is, from the tower's keys under ``visual.``:

* ``trunk``: timm ``VisionTransformer(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, img_size=448,
  patch_size=16, num_classes=0, dynamic_img_size=True)``, its ``forward_features`` (all tokens, after the final
  norm);
* ``attn_pool_contrast``: one learned query (``query`` [1, 512], normalised by ``ln_q``) attending over the
  tokens normalised by ``ln_k`` (``nn.MultiheadAttention(512, 8, kdim=768, vdim=768)``);
* ``ln_contrast``: LayerNorm(512) of the pooled query -> the 512-d embedding.

The caption pooler and the text tower are not used (their keys in the file are ignored; every key the image
embedding needs is loaded strictly). Preprocessing: CONCH's OpenAI CLIP mean and std at 448 px (the base
encoder's antialiased resize; CONCH's own transform resizes with bicubic interpolation and center-crops, the same
for square tiles up to the interpolation kernel).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from zoomfeat.encoders.registry import EncoderSpec, Encoder, register_encoder
from zoomfeat.encoders.specs import CONCH
from zoomfeat.encoders.weights import import_timm, load_strict, read_state_dict, resolve_file

PREFIX = "visual."
USED = ("trunk.", "attn_pool_contrast.", "ln_contrast.")


class AttentionalPooler(nn.Module):
    """``n_queries`` learned queries attending over the normalised tokens (CoCa's attentional pooling)."""

    def __init__(self, d_model: int, context_dim: int, heads: int, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, context_dim] -> pooled [B, n_queries, d_model]."""
        k = self.ln_k(tokens)
        q = self.ln_q(self.query).expand(len(tokens), -1, -1)
        return self.attn(q, k, k, need_weights=False)[0]


class ConchVision(nn.Module):
    """The image-embedding part of CONCH's vision tower (module doc); sizes default to CONCH ViT-B/16."""

    def __init__(self, width: int = 768, depth: int = 12, heads: int = 12, image_size: int = 448,
                 patch_size: int = 16, embed_dim: int = 512, pool_heads: int = 8):
        super().__init__()
        import_timm("conch")  # a one-line error when timm cannot be imported
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0,
                                       img_size=image_size, patch_size=patch_size, num_classes=0,
                                       dynamic_img_size=True)
        self.attn_pool_contrast = AttentionalPooler(embed_dim, width, pool_heads, 1)
        self.ln_contrast = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def image_tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of the image embedding in a CoCa state_dict, without the ``visual.`` prefix."""
    return {k[len(PREFIX):]: v for k, v in state.items()
            if k.startswith(PREFIX) and k[len(PREFIX):].startswith(USED)}


@register_encoder(CONCH)
class ConchEncoder(Encoder):
    """float [B, 3, 448, 448] (after ``preprocess``) -> [B, 512]."""

    def __init__(self, spec: EncoderSpec, model: ConchVision) -> None:
        super().__init__(spec)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @classmethod
    def build(cls, spec: EncoderSpec, *, dim: int | None = None, seed: int = 0) -> "ConchEncoder":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ConchVision()
            for p in model.attn_pool_contrast.parameters():  # the default init leaves zeros: random, seeded
                nn.init.normal_(p, std=0.02)
        return cls(spec, model)

    @classmethod
    def from_weights(cls, spec: EncoderSpec, path: Path) -> "ConchEncoder":
        file = resolve_file(path, spec.weight_files, "conch")
        model = ConchVision()
        load_strict(model, image_tower_state(read_state_dict(file, "state_dict")), file,
                    "CONCH's CoCa vision tower (visual.trunk, visual.attn_pool_contrast, visual.ln_contrast)")
        return cls(spec, model)
