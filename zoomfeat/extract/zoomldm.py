"""ZoomLDM features of one slide at one magnification, batch by batch.

Per patch: 256-px pixels at m -> resized to the first stage's resolution, scaled to [-1, 1] -> first stage
encode (once) -> ``q_sample`` at the timestep with the patch's seeded noise (``noise="none"``: the clean
latent) -> Summarizer context from its conditioning grid (``preprocess_ssl``) and magnification index ->
``unet_features(block)`` (no block after it runs) -> spatial mean (or mean and max, concatenated).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from zoomfeat.extract.featurizer import PatchBatch
from zoomfeat.extract.noise import seeded_noise
from zoomfeat.mags import Magnification


def to_model_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, R, R] in [-1, 1] (bilinear, antialiased resize when H != R)."""
    x = images.float()
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x / 127.5 - 1.0


def pool_features(fmap: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, C, h, w] -> float32 [B, C] (``mean``) or [B, 2C] (``meanmax``: mean then max)."""
    fmap = fmap.float()
    mean = fmap.mean(dim=(2, 3))
    if pooling == "meanmax":
        return torch.cat([mean, fmap.amax(dim=(2, 3))], dim=1)
    return mean


@dataclass
class ZoomLDMFeaturizer:
    """Batched ZoomLDM feature computation. ``model`` from ``load_zoomldm``, already on ``device``."""

    model: torch.nn.Module
    timestep: int
    block: int
    pooling: str
    noise: str
    device: str = "cpu"
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    channels_last: bool = False
    provenance: dict = field(default_factory=dict)  # the feature files' extractor_config (set by the loader)

    @property
    def dim(self) -> int:
        """Feature width D: ``feature_dim(block)``, doubled for ``meanmax``."""
        return self.model.feature_dim(self.block) * (2 if self.pooling == "meanmax" else 1)

    def _memory(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def context(self, raw_grids: np.ndarray, mag: Magnification) -> torch.Tensor:
        """Summarizer context [B, 65, D_ctx] from raw grids float32 [B, C, g, g] (pooled to <= 8x8 is fine)."""
        grids = torch.from_numpy(raw_grids).to(self.device, non_blocking=True)
        prepped = [self.model.preprocess_ssl(g) for g in grids]
        mags = torch.full((len(prepped),), Magnification(mag).index, dtype=torch.long, device=self.device)
        return self.model.summarize(prepped, mags)

    @torch.inference_mode()
    def __call__(self, batch: PatchBatch) -> np.ndarray:
        """Features of one batch: uint8 [B, 3, 256, 256] + raw grids [B, C, g, g] -> float32 [B, D]."""
        m = self.model
        x = to_model_input(batch.images.to(self.device, non_blocking=True), m.first_stage_resolution)
        with self.autocast():
            z = m.encode_first_stage(self._memory(x)).float()
        return self.latent_features(z, batch)

    @torch.inference_mode()
    def latent_features(self, z: torch.Tensor, batch: PatchBatch) -> np.ndarray:
        """Features of first-stage latents z [B, C, h, w] (``batch`` gives grids, coordinates and the noise
        seed; its ``images`` are not used): the same computation as for encoded pixels, so synthetic latents
        (``zoomfeat feature-copies``) are featurised without a decode/encode round trip."""
        m = self.model
        z = z.to(self.device).float()
        t = torch.full((len(z),), self.timestep, dtype=torch.long, device=self.device)
        with self.autocast():
            if self.noise == "seeded":
                noise = seeded_noise(batch.slide_id, batch.mag, batch.coords_level0,
                                     tuple(z.shape[1:])).to(self.device)
                x_t = m.q_sample(z, t, noise)
            else:
                x_t = z
            context = self.context(batch.grids, batch.mag)
            fmap = m.unet_features(self._memory(x_t), t, context, block=self.block)
        return pool_features(fmap, self.pooling).cpu().numpy()
