"""Baseline encoder features (UNI, Phikon, CTransPath, toy): the encoder applied to each 256-px patch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EncoderFeaturizer:
    """Batched encoder features. ``encoder`` from ``load_encoder``, already on ``device``."""

    encoder: torch.nn.Module
    device: str = "cpu"
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @property
    def dim(self) -> int:
        return int(self.encoder.spec.dim)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, raw_grids: np.ndarray | None, mag: float, mag_name: str,
                 coords_level0: np.ndarray, slide_id: str) -> np.ndarray:
        """uint8 [B, 3, 256, 256] -> float32 [B, D] (grids, mag and coords are unused)."""
        with self.autocast():
            x = self.encoder.preprocess(images.to(self.device, non_blocking=True))
            return self.encoder(x).float().cpu().numpy()
