"""Frechet distance between two feature sets (Heusel et al. 2017, "GANs trained by a two time-scale update rule").

FID = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)), with the means and unbiased covariances of the two
feature sets and the principal matrix square root (``scipy.linalg.sqrtm``), all in float64. As in the common
implementations, a product whose square root is not finite is retried with ``eps * I`` added to both covariances,
and a square root whose diagonal has an imaginary part above ``1e-3`` is an error (its real part is used otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zoomfeat.errors import DataError
from zoomfeat.log import warn


@dataclass(frozen=True)
class FeatureStats:
    """Mean [D] and unbiased covariance [D, D] (float64) of ``n`` feature rows."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def feature_stats(features: np.ndarray, what: str = "features") -> FeatureStats:
    """Mean and covariance of float features [N, D]; DataError for N < 2 or non-finite values."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise DataError(f"FID needs at least 2 feature rows of {what}, got shape {list(x.shape)}")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{what}: the feature network returned non-finite values; check the images and weights")
    if len(x) <= x.shape[1]:
        warn(f"{what}: {len(x)} images for {x.shape[1]}-d features: the covariance is rank-deficient and the "
             f"FID is strongly biased (use more images, or a lower-dimensional feature network)")
    return FeatureStats(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False), n=len(x))


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """Frechet distance between two Gaussians given by their stats (float)."""
    from scipy import linalg

    if a.mu.shape != b.mu.shape:
        raise DataError(f"feature sets differ in dimension: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    diff = a.mu - b.mu
    covmean = linalg.sqrtm(a.sigma @ b.sigma)
    if not np.all(np.isfinite(covmean)):
        warn(f"FID: the covariance product is singular; adding {eps:g} to the diagonals")
        offset = np.eye(len(a.mu)) * eps
        covmean = linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise DataError(f"FID: the matrix square root has an imaginary component of "
                            f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are degenerate (too few images?)")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * np.trace(covmean))
    if not np.isfinite(value):
        raise DataError("FID is not finite: the feature statistics are degenerate")
    return value


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature arrays [N, D] and [M, D]."""
    return frechet_distance(feature_stats(real, "real images"), feature_stats(fake, "generated images"))
