"""Feature networks for the set and embedding metrics: the FID Inception (local weights) or any registered encoder.

A :class:`FeatureNet` maps uint8 RGB images [B, 3, H, W] to float32 features [B, D] and records what it is
(name, weight-file sha256) for the result file. Encoders (``zoomfeat.encoders``: UNI for a pathology-domain FID
and embedding similarity, ``toy`` in tests) resize to their own input size in ``preprocess``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zoomfeat.errors import ConfigError, DataError


@dataclass(frozen=True)
class FeatureNetSpec:
    """Which network: ``inception`` (``weights`` = the Inception state_dict) or a registered encoder name
    (``weights`` = its local weight path, None for ``toy``; ``dim``/``seed`` for ``toy``)."""

    network: str
    weights: Path | None = None
    dim: int | None = None
    seed: int = 0


class FeatureNet:
    """uint8 images -> features, batched, on one device."""

    def __init__(self, spec: FeatureNetSpec, module: torch.nn.Module, dim: int, preprocess, device: str):
        self.spec, self.module, self.dim, self.device = spec, module.to(device).eval(), dim, device
        self._preprocess = preprocess

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self._preprocess(images.to(self.device))
        out = self.module(x).float()
        if not torch.isfinite(out).all():
            raise DataError(f"{self.spec.network} returned non-finite features; check its weights and the images")
        return out

    def describe(self) -> dict:
        from zoomfeat.resolve import file_sha256

        return {"network": self.spec.network, "weights": str(self.spec.weights) if self.spec.weights else None,
                "weights_sha256": file_sha256(self.spec.weights), "dim": self.dim}

    def features(self, images: Iterable[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """Features of uint8 HxWx3 arrays (any iterable), float32 [N, D]."""
        rows, batch = [], []
        for image in images:
            batch.append(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))
            if len(batch) == batch_size:
                rows.append(self(_stack(batch)).cpu().numpy())
                batch = []
        if batch:
            rows.append(self(_stack(batch)).cpu().numpy())
        if not rows:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(rows).astype(np.float32)


def _stack(batch: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(b.shape) for b in batch}
    if len(shapes) > 1:  # encoders resize anyway; stack per image then
        raise DataError(f"images of different sizes in one batch: {sorted(shapes)}; use --batch-size 1 or "
                        f"images of one size")
    return torch.stack(batch)


def load_feature_net(spec: FeatureNetSpec, device: str = "cpu") -> FeatureNet:
    """Build the network of ``spec`` from local files only."""
    if spec.network == "inception":
        if spec.weights is None:
            raise ConfigError("FID with Inception needs --weights FILE (a local pt_inception-2015-12-05-6726825d.pth;"
                              " nothing is downloaded), or --encoder NAME for a domain FID")
        from zoomfeat.generate.metrics.inception import load_inception

        net = load_inception(spec.weights)
        return FeatureNet(spec, net, net.dim, lambda x: x, device)
    if spec.network == "clip":
        if spec.weights is None:
            raise ConfigError("clip-fid needs --clip-weights FILE (a local open_clip ViT-B-32 state_dict; nothing is "
                              "downloaded)")
        from zoomfeat.generate.metrics.clip import load_clip_visual, preprocess

        net = load_clip_visual(spec.weights)
        return FeatureNet(spec, net, net.dim, lambda x: preprocess(x, net.image_size), device)
    from zoomfeat.encoders import load_encoder

    encoder = load_encoder(spec.network, spec.weights, dim=spec.dim, seed=spec.seed)
    return FeatureNet(spec, encoder, encoder.spec.dim, encoder.preprocess, device)
