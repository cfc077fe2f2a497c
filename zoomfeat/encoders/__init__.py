"""Patch encoders: UNI, Phikon, CTransPath, DINOv2 (ViT-L/14-reg4), CONCH and a random ``toy`` encoder, one
registry.

>>> from zoomfeat.encoders import load_encoder
>>> enc = load_encoder("toy", dim=32, seed=0)
>>> enc(enc.preprocess(tiles_uint8)).shape   # tiles_uint8: uint8 [B, 3, 256, 256]  -> [B, 32]

Importing this package is torch-free: the specs (:mod:`zoomfeat.encoders.specs`: names, dims, weight files,
the CLI's choices) load at once; the networks (``load_encoder``, ``ENCODERS``, ``Encoder``, ...) are imported,
with torch, on first use, and that import registers every encoder class.
"""

from __future__ import annotations

import importlib

from zoomfeat.encoders.specs import SPECS, EncoderSpec, encoder_help, encoder_names, encoder_weights

_MODULES = ("toy", "uni", "phikon", "ctranspath", "dinov2", "conch")  # each registers its class with @register_encoder
_FROM_REGISTRY = ("ENCODERS", "Encoder", "ModuleEncoder", "encoder_class", "load_encoder", "register_encoder",
                  "freeze")

__all__ = ["ENCODERS", "Encoder", "EncoderSpec", "SPECS", "encoder_class", "encoder_help", "encoder_names",
           "encoder_weights", "load_encoder", "register_encoder"]


def _registry():
    registry = importlib.import_module("zoomfeat.encoders.registry")
    for name in _MODULES:
        importlib.import_module(f"zoomfeat.encoders.{name}")
    return registry


def __getattr__(name: str):
    if name in _FROM_REGISTRY:
        return getattr(_registry(), name)
    raise AttributeError(f"module 'zoomfeat.encoders' has no attribute {name!r}")
