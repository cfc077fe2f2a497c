"""Baseline encoder features (UNI, Phikon, CTransPath, toy): the encoder applied to each 256-px patch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from zoomfeat.extract.featurizer import PatchBatch


@dataclass
class EncoderFeaturizer:
    """Batched encoder features. ``encoder`` from ``load_encoder``, already on ``device``."""

    encoder: torch.nn.Module
    device: str = "cpu"
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    provenance: dict = field(default_factory=dict)  # the feature files' extractor_config (set by the loader)

    @property
    def dim(self) -> int:
        return int(self.encoder.spec.dim)

    @torch.inference_mode()
    def __call__(self, batch: PatchBatch) -> np.ndarray:
        """uint8 [B, 3, 256, 256] -> float32 [B, D] (grids, mag and coords are unused)."""
        with self.autocast():
            x = self.encoder.preprocess(batch.images.to(self.device, non_blocking=True))
            return self.encoder(x).float().cpu().numpy()
