"""What every metric function receives (:class:`MetricContext`) and returns (:class:`MetricResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from zoomfeat.generate.metrics.features import FeatureNet, FeatureNetSpec, load_feature_net
from zoomfeat.generate.metrics.images import list_images, pair_images


@dataclass
class MetricResult:
    """One metric's value over ``n`` images/pairs/crops, with details (e.g. the feature network) and per-item
    values (name, value) where the metric has them."""

    metric: str
    value: float
    n: int
    details: dict = field(default_factory=dict)
    items: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class MetricContext:
    """Inputs shared by the metrics of one run; networks are built on first use, once."""

    real_dir: Path
    fake_dir: Path
    features: FeatureNetSpec | None = None
    lpips_backbone: Path | None = None
    lpips_linear: Path | None = None
    lpips_net: str = "alex"
    crop_size: int = 256
    downsample_size: int = 256
    batch_size: int = 16
    device: str = "cpu"
    clip_weights: Path | None = None
    per_patch: bool = False
    patch_size: int = 256

    @cached_property
    def real(self) -> list[Path]:
        return list_images(self.real_dir, "real image folder")

    @cached_property
    def fake(self) -> list[Path]:
        return list_images(self.fake_dir, "generated image folder")

    @cached_property
    def pairs(self) -> list[tuple[Path, Path]]:
        return pair_images(self.real, self.fake)

    @cached_property
    def feature_net(self) -> FeatureNet:
        from zoomfeat.errors import ConfigError

        if self.features is None:
            raise ConfigError("this metric needs a feature network: --weights INCEPTION.pth or --encoder NAME")
        return load_feature_net(self.features, self.device)

    @cached_property
    def clip_net(self) -> FeatureNet:
        return load_feature_net(FeatureNetSpec("clip", self.clip_weights), self.device)

    @cached_property
    def lpips(self):
        from zoomfeat.errors import ConfigError
        from zoomfeat.generate.metrics.lpips import load_lpips

        if self.lpips_backbone is None:
            raise ConfigError("lpips needs --lpips-backbone FILE (torchvision AlexNet weights, local)")
        return load_lpips(self.lpips_backbone, self.lpips_linear, self.lpips_net).to(self.device)
