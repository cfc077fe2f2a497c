"""``toy``: a tiny RANDOM, seeded convolutional encoder for tests and the demo. Not a pathology model.

Three stride-2 3x3 convolutions (3 -> 16 -> 32 -> 64 channels, ReLU), a global average pool and a linear
layer to ``dim`` (default 64; any dim >= 1, e.g. 32 for the tiny golden ZoomLDM). Its weights are drawn
from a private ``torch.Generator`` seeded with ``seed``, parameter by parameter in a fixed order, so the
same (dim, seed) gives bitwise the same weights in every process.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from zoomfeat.encoders.specs import TOY
from zoomfeat.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderSpec, register_encoder, with_dim
from zoomfeat.errors import ConfigError


_WIDTHS = (3, 16, 32, 64)


@register_encoder(TOY)
class ToyEncoder(Encoder):
    """Random seeded conv encoder: float [B, 3, 64, 64] -> [B, dim]."""

    def __init__(self, spec: EncoderSpec, seed: int = 0) -> None:
        super().__init__(spec)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(_WIDTHS[:-1], _WIDTHS[1:]):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(_WIDTHS[-1], spec.dim)
        self.seed = seed
        self._seeded_init(seed)

    @torch.no_grad()
    def _seeded_init(self, seed: int) -> None:
        """He-normal weights and zero biases from ``torch.Generator().manual_seed(seed)``."""
        generator = torch.Generator().manual_seed(seed)
        for name, parameter in self.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            else:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * math.sqrt(2.0 / fan_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] -> [B, dim]."""
        return self.proj(self.features(x).mean(dim=(2, 3)))

    @classmethod
    def build(cls, spec: EncoderSpec, *, dim: int | None = None, seed: int = 0) -> "ToyEncoder":
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"toy encoder: seed must be an integer >= 0, got {seed!r}")
        return cls(with_dim(spec, dim), seed=seed)

    @classmethod
    def from_weights(cls, spec: EncoderSpec, path: Path) -> "ToyEncoder":
        raise ConfigError(f"the toy encoder takes no weight file ({path}); it is random and seeded")
