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
from zoomfeat.log import warn


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
    """Mean over the pairs. A pair whose value is not finite (identical images: PSNR = inf; a constant image:
    an undefined cosine) keeps its own value in the items, is left out of the mean with a warning naming it, and
    never aborts the run; when no pair is finite the value is the first pair's."""
    values = np.array([v for _, v in items], dtype=np.float64)
    finite = np.isfinite(values)
    details = dict(details or {})
    if not finite.all():
        bad = [k for k, v in items if not np.isfinite(v)]
        warn(f"{name}: {len(bad)} pair(s) give a non-finite value ({', '.join(bad[:5])}"
             f"{', ...' if len(bad) > 5 else ''}; identical images give an infinite PSNR, a constant image an "
             f"undefined similarity): left out of the mean")
        details["non_finite_pairs"] = bad
    value = float(values[finite].mean()) if finite.any() else float(values[0]) if len(values) else float("nan")
    return MetricResult(name, value, int(finite.sum()) if finite.any() else len(items), details, items)


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


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two embeddings [D] in float64; NaN when either is all zeros (undefined)."""
    a, b = a.double(), b.double()
    na, nb = a.norm(), b.norm()
    if float(na) == 0.0 or float(nb) == 0.0:
        return float("nan")
    return float((a @ b) / (na * nb))


def patch_tiles(image: torch.Tensor, size: int, what: str) -> torch.Tensor:
    """uint8 [1, 3, H, W] -> its non-overlapping ``size``-px patches [n, 3, size, size], row-major."""
    _, c, h, w = image.shape
    if h % size or w % size:
        raise DataError(f"{what} is {w}x{h} px: --per-patch cuts images into {size}-px patches, so its sides must "
                        f"be multiples of {size} (set --patch-size)")
    return image[0].reshape(c, h // size, size, w // size, size).permute(1, 3, 0, 2, 4).reshape(-1, c, size, size)


@register_metric("embedding", paired=True, needs="features",
                 description="cosine similarity of the pair's embeddings (UNI, CONCH or any registered encoder), "
                             "mean; --per-patch: of each --patch-size patch of the pair (the ZoomLDM "
                             "super-resolution table's UNI/CONCH columns), mean over all patches")
def embedding(ctx: MetricContext) -> MetricResult:
    net = ctx.feature_net
    items, patches = [], []
    for key, real, fake in _pairs(ctx):
        if ctx.per_patch:
            r_tiles = patch_tiles(real, ctx.patch_size, key)
            f_tiles = patch_tiles(fake, ctx.patch_size, key)
            values = []
            for start in range(0, len(r_tiles), ctx.batch_size):
                a = net(r_tiles[start:start + ctx.batch_size])
                b = net(f_tiles[start:start + ctx.batch_size])
                values += [cosine(x, y) for x, y in zip(a, b)]
            patches += [(f"{key}#{k}", v) for k, v in enumerate(values)]
            finite = [v for v in values if np.isfinite(v)]
            items.append((key, float(np.mean(finite)) if finite else float("nan")))
        else:
            items.append((key, cosine(net(real)[0], net(fake)[0])))
    details = {"features": net.describe(), "per_patch": ctx.per_patch}
    if ctx.per_patch:
        details["patch_size"] = ctx.patch_size
        result = _mean("embedding", patches, details)
        result.items = items
        return result
    return _mean("embedding", items, details)
