"""Generation metrics (``zoomfeat gen-metrics``): FID variants with a local Inception or a registered encoder,
SSIM/PSNR (torchmetrics), LPIPS (local weights), embedding cosine similarity and nearest-neighbour distances.

Importing this package registers every metric in :data:`METRICS` (see ``registry``).
"""

from zoomfeat.generate.metrics.registry import METRICS, MetricSpec, get_metric, metric_names, register_metric
from zoomfeat.generate.metrics import set_metrics  # noqa: F401  (registers fid, crop-fid, downsampled-fid, nn-distance)
from zoomfeat.generate.metrics import paired_metrics  # noqa: F401  (registers ssim, psnr, lpips, embedding)
from zoomfeat.generate.metrics.fid import FeatureStats, feature_stats, fid_from_features, frechet_distance
from zoomfeat.generate.metrics.run import GenMetricsConfig, compute_metrics, write_results

__all__ = ["METRICS", "FeatureStats", "GenMetricsConfig", "MetricSpec", "compute_metrics", "feature_stats",
           "fid_from_features", "frechet_distance", "get_metric", "metric_names", "register_metric", "write_results"]
