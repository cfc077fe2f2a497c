"""Set metrics: FID on whole images, on 256-px crops of large images, on downsampled large images, and the
nearest-neighbour distances of generated images to a reference set (memorisation check).

The papers' tables: ZoomLDM Tables 1-3 and Graikos et al. 2024 Table 1 report FID (Inception), a domain FID in a
pathology encoder's space, "crop FID" (FID over the 256-px crops of the 1024-px or larger images) and the FID of
the large images downsampled to 256 px. With ``--encoder uni --encoder-weights ...`` every FID here is computed in
UNI's space instead of Inception's.
"""

from __future__ import annotations

import numpy as np

from zoomfeat.generate.metrics.context import MetricContext, MetricResult
from zoomfeat.generate.metrics.fid import fid_from_features
from zoomfeat.generate.metrics.images import crops, downsample, iter_images
from zoomfeat.generate.metrics.registry import register_metric


def _fid(ctx: MetricContext, name: str, transform, net=None) -> MetricResult:
    net = net or ctx.feature_net
    real = net.features(transform(iter_images(ctx.real)), ctx.batch_size)
    fake = net.features(transform(iter_images(ctx.fake)), ctx.batch_size)
    value = fid_from_features(real, fake)
    return MetricResult(name, value, len(fake), {"features": net.describe(), "n_real": len(real),
                                                "n_fake": len(fake)})


@register_metric("fid", paired=False, needs="features",
                 description="FID between the two folders' images (each resized to the network's input)")
def fid(ctx: MetricContext) -> MetricResult:
    return _fid(ctx, "fid", lambda images: images)


@register_metric("clip-fid", paired=False, needs="clip",
                 description="Frechet distance of CLIP image embeddings (whole image resized to the CLIP input; "
                             "a local open_clip ViT-B-32 from --clip-weights)")
def clip_fid(ctx: MetricContext) -> MetricResult:
    return _fid(ctx, "clip-fid", lambda images: images, ctx.clip_net)


@register_metric("crop-fid", paired=False, needs="features",
                 description="FID over all non-overlapping --crop-size crops (256 px) of the images: MultiDiffusion's "
                             "crop FID when --fake holds the large images and --real the 256-px real patches")
def crop_fid(ctx: MetricContext) -> MetricResult:
    size = ctx.crop_size
    result = _fid(ctx, "crop-fid", lambda images: (c for im in images for c in crops(im, size)))
    result.details["crop_size"] = size
    return result


@register_metric("downsampled-fid", paired=False, needs="features",
                 description="FID of the images downsampled to --downsample-size (256 px, bicubic, antialiased)")
def downsampled_fid(ctx: MetricContext) -> MetricResult:
    size = ctx.downsample_size
    result = _fid(ctx, "downsampled-fid", lambda images: (downsample(im, size) for im in images))
    result.details["downsample_size"] = size
    return result


def nearest_neighbours(query: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index into ``reference`` and cosine similarity of each query row's nearest neighbour (largest cosine)."""
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    r = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    sim = q.astype(np.float64) @ r.astype(np.float64).T
    index = sim.argmax(axis=1)
    return index, sim[np.arange(len(q)), index]


@register_metric("nn-distance", paired=False, needs="features",
                 description="cosine distance of each generated image to its nearest real image (memorisation)")
def nn_distance(ctx: MetricContext) -> MetricResult:
    net = ctx.feature_net
    real = net.features(iter_images(ctx.real), ctx.batch_size)
    fake = net.features(iter_images(ctx.fake), ctx.batch_size)
    index, sim = nearest_neighbours(fake, real)
    dist = 1.0 - sim
    items = [(f"{f.name}->{ctx.real[i].name}", float(d)) for f, i, d in zip(ctx.fake, index, dist)]
    details = {"features": net.describe(), "min": float(dist.min()), "median": float(np.median(dist)),
               "max_cosine_similarity": float(sim.max()), "n_real": len(real)}
    return MetricResult("nn-distance", float(dist.mean()), len(fake), details, items)
