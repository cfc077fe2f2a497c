"""The networks half of the encoder registry: the ``Encoder`` base module, ``register_encoder``, ``load_encoder``.

Each encoder's spec lives in :mod:`zoomfeat.encoders.specs` (torch-free; the CLI's choices come from there);
each encoder module defines one ``Encoder`` subclass decorated with ``@register_encoder(SPEC)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from zoomfeat.encoders.specs import (IMAGENET_MEAN, IMAGENET_STD, SPECS, EncoderSpec,  # noqa: F401
                                     encoder_names, encoder_weights)
from zoomfeat import hub
from zoomfeat.errors import ConfigError, DataError

class Encoder(nn.Module, ABC):
    """Base of every encoder: ``preprocess`` (uint8 tiles -> normalised float) and ``forward`` (-> [B, D]).

    Subclasses implement ``build(spec, dim=..., seed=...)`` (architecture with random weights) and
    ``from_weights(spec, path)`` (architecture with the official weights loaded strictly).
    """

    spec: EncoderSpec

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] RGB -> float32 [B, 3, S, S], S = ``spec.input_size``.

        Scales to [0, 1], resizes (bilinear, antialiased, as torchvision's ``Resize``) when H or W differs
        from S, then normalises with the spec's mean and std.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"encoder {self.spec.name!r} expects uint8 [B, 3, H, W] images, got "
                            f"{images.dtype} {list(images.shape)}")
        x = images.to(device=self._mean.device, dtype=torch.float32) / 255.0
        size = self.spec.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self._mean.float()) / self._std.float()

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed float [B, 3, S, S] -> embeddings [B, D]."""

    @classmethod
    @abstractmethod
    def build(cls, spec: EncoderSpec, *, dim: int | None = None, seed: int = 0) -> "Encoder":
        """The architecture with random weights (tests, registry checks)."""

    @classmethod
    @abstractmethod
    def from_weights(cls, spec: EncoderSpec, path: Path) -> "Encoder":
        """The architecture with the official weights at ``path`` (file or folder)."""


class ModuleEncoder(Encoder):
    """An encoder whose network is one module (a timm model) from preprocessed images to [B, D]; its weights
    sit under ``model.``."""

    def __init__(self, spec: EncoderSpec, model: nn.Module) -> None:
        super().__init__(spec)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


ENCODERS: dict[str, EncoderSpec] = {}
_CLASSES: dict[str, type[Encoder]] = {}
E = TypeVar("E", bound=type[Encoder])


def register_encoder(spec: EncoderSpec) -> Callable[[E], E]:
    """Class decorator: register ``spec`` under ``spec.name`` with the decorated ``Encoder`` subclass."""

    def decorate(cls: E) -> E:
        if spec.name in ENCODERS:
            raise ValueError(f"encoder {spec.name!r} is registered twice")
        if SPECS.get(spec.name) is not spec:
            raise ValueError(f"encoder {spec.name!r} has no spec in zoomfeat.encoders.specs: define it there")
        ENCODERS[spec.name] = spec
        _CLASSES[spec.name] = cls
        return cls

    return decorate


def encoder_class(name: str) -> type[Encoder]:
    """The ``Encoder`` subclass registered under ``name``; ConfigError listing the choices otherwise."""
    if name not in _CLASSES:
        raise ConfigError(f"unknown encoder {name!r}: choose one of {', '.join(encoder_names())}")
    return _CLASSES[name]


def load_encoder(name: str, weights: str | Path | None = None, *, dim: int | None = None,
                 seed: int = 0) -> Encoder:
    """A frozen encoder in eval mode, on the CPU.

    ``toy`` takes ``dim``/``seed`` and no weights; the others need ``weights``, a local weight file or a
    folder that holds one of ``spec.weight_files``.
    """
    cls = encoder_class(name)
    spec = ENCODERS[name]
    if spec.weight_files:
        if weights is None:
            raise ConfigError(f"encoder {name!r} needs a weight path (a file or a folder with "
                              f"{' or '.join(spec.weight_files)}); pass --weights PATH"
                              + (f" or --weights {name} (the hub weights)" if name in hub.KNOWN else ""))
        if dim is not None and dim != spec.dim:
            raise ConfigError(f"encoder {name!r} has a fixed dim of {spec.dim}; do not pass dim={dim}")
        encoder = cls.from_weights(spec, encoder_weights(name, weights))
    else:
        if weights is not None:
            raise ConfigError(f"encoder {name!r} takes no weights (it is random and seeded); drop {weights}")
        encoder = cls.build(spec, dim=dim, seed=seed)
    return freeze(encoder)


def freeze(encoder: Encoder) -> Encoder:
    """Eval mode and ``requires_grad=False`` on every parameter; returns the same module."""
    encoder.eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return encoder


def with_dim(spec: EncoderSpec, dim: int | None) -> EncoderSpec:
    """``spec`` with another output dim (toy encoder); ConfigError for dim < 1."""
    if dim is None:
        return spec
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"encoder {spec.name!r}: dim must be an integer >= 1, got {dim!r}")
    return replace(spec, dim=dim)
