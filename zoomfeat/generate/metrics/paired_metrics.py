"""Paired metrics (same file name in both folders): SSIM and PSNR (torchmetrics), LPIPS (local weights) and the
cosine similarity of encoder embeddings, as the ZoomLDM super-resolution table reports them. Values are per pair,
then averaged; SSIM/PSNR on [0, 1] images with data_range 1 (torchmetrics defaults otherwise: 11-px Gaussian
window, sigma 1.5)."""

from __future__ import annotations

import numpy as np
import torch

from zoomfeat.errors import DataError
from zoomfeat.generate.metrics.context import MetricContext, MetricResult
from zoomfeat.generate.metrics.images import read_image
from zoomfeat.generate.metrics.registry import register_metric


def _pairs(ctx: MetricContext):
    for real_path, fake_path in ctx.pairs:
        real, fake = read_image(real_path), read_image(fake_path)
        if real.shape != fake.shape:
            raise DataError(f"{fake_path} is {fake.shape[1]}x{fake.shape[0]} but {real_path} is "
                            f"{real.shape[1]}x{real.shape[0]}: paired metrics need images of one size")
        yield fake_path.stem, _tensor(real), _tensor(fake)


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]


def _mean(name: str, items: list[tuple[str, float]], details: dict | None = None) -> MetricResult:
    values = np.array([v for _, v in items], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        bad = [k for k, v in items if not np.isfinite(v)]
        raise DataError(f"{name} is not finite for {', '.join(bad[:5])} (identical images give an infinite PSNR)")
    return MetricResult(name, float(values.mean()), len(items), details or {}, items)


def ssim_value(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(fake.double() / 255.0, real.double() / 255.0, data_range=1.0))


def psnr_value(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(fake.double() / 255.0, real.double() / 255.0, data_range=1.0))


@register_metric("ssim", paired=True, description="structural similarity per pair (torchmetrics), mean")
def ssim(ctx: MetricContext) -> MetricResult:
    return _mean("ssim", [(k, ssim_value(r, f)) for k, r, f in _pairs(ctx)])


@register_metric("psnr", paired=True, description="peak signal-to-noise ratio per pair in dB (torchmetrics), mean")
def psnr(ctx: MetricContext) -> MetricResult:
    return _mean("psnr", [(k, psnr_value(r, f)) for k, r, f in _pairs(ctx)])


@register_metric("lpips", paired=True, needs="lpips",
                 description="LPIPS v0.1 per pair (local AlexNet/VGG backbone + linear weights), mean")
def lpips(ctx: MetricContext) -> MetricResult:
    from zoomfeat.generate.metrics.lpips import lpips_uint8

    model = ctx.lpips
    items = [(k, float(lpips_uint8(model, r, f)[0])) for k, r, f in _pairs(ctx)]
    return _mean("lpips", items, {"net": ctx.lpips_net, "backbone": str(ctx.lpips_backbone)})


@register_metric("embedding", paired=True, needs="features",
                 description="cosine similarity of the pair's embeddings (UNI or any registered encoder), mean")
def embedding(ctx: MetricContext) -> MetricResult:
    net = ctx.feature_net
    items = []
    for key, real, fake in _pairs(ctx):
        a, b = net(real)[0].double(), net(fake)[0].double()
        items.append((key, float(torch.nn.functional.cosine_similarity(a, b, dim=0))))
    return _mean("embedding", items, {"features": net.describe()})
