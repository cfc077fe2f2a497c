"""Patch encoders: UNI, Phikon, CTransPath, DINOv2 (ViT-L/14-reg4) and a random ``toy`` encoder, behind one registry.

>>> from zoomfeat.encoders import load_encoder
>>> enc = load_encoder("toy", dim=32, seed=0)
>>> enc(enc.preprocess(tiles_uint8)).shape   # tiles_uint8: uint8 [B, 3, 256, 256]  -> [B, 32]

Importing this package registers every encoder (the modules below import torch; timm is imported only
when a timm-based encoder is built).
"""

from zoomfeat.encoders.registry import (
    ENCODERS,
    Encoder,
    EncoderSpec,
    encoder_class,
    encoder_names,
    load_encoder,
    register_encoder,
)
from zoomfeat.encoders import toy  # noqa: F401  (registers "toy")
from zoomfeat.encoders import uni  # noqa: F401  (registers "uni")
from zoomfeat.encoders import phikon  # noqa: F401  (registers "phikon")
from zoomfeat.encoders import ctranspath  # noqa: F401  (registers "ctranspath")
from zoomfeat.encoders import dinov2  # noqa: F401  (registers "dinov2")

__all__ = [
    "ENCODERS",
    "Encoder",
    "EncoderSpec",
    "encoder_class",
    "encoder_names",
    "load_encoder",
    "register_encoder",
]
