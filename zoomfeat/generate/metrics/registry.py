"""The generation-metric registry: one :class:`MetricSpec` per metric, filled by :func:`register_metric`.

A metric is either a *set* metric (two image sets, e.g. FID: real vs fake, no pairing) or a *paired* metric
(the same file name in both folders, e.g. SSIM of a super-resolved image against its ground truth), and it may
need a feature network (Inception or a registered encoder) or LPIPS weights. The ``zoomfeat gen-metrics``
``--metric`` choices come from :func:`metric_names` (the command module keeps a torch-free copy, checked by a
test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from zoomfeat.errors import ConfigError


@dataclass(frozen=True)
class MetricSpec:
    """``fn(context) -> MetricResult``; ``paired``: needs name-matched pairs; ``needs``: "features" (Inception
    or encoder), "encoder" (a registered encoder only), "clip" (a local open_clip ViT), "lpips" or "" (pixels
    only)."""

    name: str
    fn: Callable
    paired: bool
    needs: str
    description: str


METRICS: dict[str, MetricSpec] = {}


def register_metric(name: str, *, paired: bool, needs: str = "", description: str = ""):
    """Function decorator registering a metric under ``name``."""
    if needs not in ("", "features", "encoder", "clip", "lpips"):
        raise ValueError(f"metric {name!r}: unknown requirement {needs!r}")

    def wrap(fn: Callable) -> Callable:
        if name in METRICS:
            raise ValueError(f"metric {name!r} is registered twice")
        METRICS[name] = MetricSpec(name, fn, paired, needs, description)
        return fn

    return wrap


def metric_names() -> list[str]:
    """Registered metric names in registration order (the CLI's ``--metric`` choices)."""
    return list(METRICS)


def get_metric(name: str) -> MetricSpec:
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}: choose one of {', '.join(metric_names())}")
    return METRICS[name]
