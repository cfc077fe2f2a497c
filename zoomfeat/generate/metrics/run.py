"""One ``gen-metrics`` run: the validated config, the metrics computed in order, the JSON/CSV result file."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from zoomfeat.errors import ConfigError
from zoomfeat.generate.metrics.context import MetricContext, MetricResult
from zoomfeat.generate.metrics.features import FeatureNetSpec
from zoomfeat.generate.metrics.registry import get_metric


@dataclass(frozen=True)
class GenMetricsConfig:
    """Validated ``zoomfeat gen-metrics`` options (see the command's help for each)."""

    real: Path
    fake: Path
    metrics: tuple[str, ...]
    out: Path | None = None
    weights: Path | None = None
    encoder: str | None = None
    encoder_weights: Path | None = None
    encoder_dim: int | None = None
    lpips_backbone: Path | None = None
    lpips_linear: Path | None = None
    lpips_net: str = "alex"
    crop_size: int = 256
    downsample_size: int = 256
    batch_size: int = 16
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ConfigError("no metric given: pass --metric (e.g. --metric fid,ssim)")
        specs = [get_metric(m) for m in self.metrics]
        if self.weights is not None and self.encoder is not None:
            raise ConfigError("pass either --weights (Inception) or --encoder, not both")
        if any(s.needs == "features" for s in specs) and self.weights is None and self.encoder is None:
            names = ", ".join(s.name for s in specs if s.needs == "features")
            raise ConfigError(f"{names} need a feature network: --weights INCEPTION.pth (local FID Inception) or "
                              f"--encoder NAME [--encoder-weights PATH]")
        if self.encoder is not None:
            from zoomfeat.encoders.specs import encoder_names

            if self.encoder not in encoder_names():
                raise ConfigError(f"unknown --encoder {self.encoder!r}: use one of {', '.join(encoder_names())}")
        for name in ("weights", "encoder_weights", "lpips_backbone", "lpips_linear"):
            path = getattr(self, name)
            if path is not None and not path.exists():
                raise ConfigError(f"--{name.replace('_', '-')} {path} does not exist: pass a local file")
        if any(s.needs == "lpips" for s in specs) and self.lpips_backbone is None:
            raise ConfigError("lpips needs --lpips-backbone FILE (a local torchvision AlexNet state_dict)")
        for name in ("crop_size", "downsample_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.out is not None and self.out.suffix.lower() not in (".json", ".csv"):
            raise ConfigError(f"--out {self.out}: use a .json or .csv file name")

    def feature_net_spec(self) -> FeatureNetSpec | None:
        if self.weights is not None:
            return FeatureNetSpec("inception", self.weights)
        if self.encoder is not None:
            return FeatureNetSpec(self.encoder, self.encoder_weights, self.encoder_dim)
        return None

    def context(self) -> MetricContext:
        return MetricContext(self.real, self.fake, self.feature_net_spec(), self.lpips_backbone, self.lpips_linear,
                             self.lpips_net, self.crop_size, self.downsample_size, self.batch_size, self.device)


def compute_metrics(config: GenMetricsConfig) -> list[MetricResult]:
    """Every requested metric, in order, sharing images and networks through one context."""
    ctx = config.context()
    return [get_metric(name).fn(ctx) for name in config.metrics]


def write_results(results: list[MetricResult], path: Path, config: GenMetricsConfig) -> Path:
    """``.json``: config, summary and per-item values; ``.csv``: rows metric,item,value (item empty = summary)."""
    from zoomfeat.serial import to_jsonable
    from zoomfeat.store import write_json_atomic
    from zoomfeat.store import atomic_write

    if path.suffix.lower() == ".json":
        data = {"config": to_jsonable(config),
                "results": [{"metric": r.metric, "value": r.value, "n": r.n, "details": r.details,
                             "items": [{"item": k, "value": v} for k, v in r.items]} for r in results]}
        return write_json_atomic(path, data)
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["metric", "item", "value", "n"])
        for r in results:
            writer.writerow([r.metric, "", repr(r.value), r.n])
            for key, value in r.items:
                writer.writerow([r.metric, key, repr(value), 1])
    return path
