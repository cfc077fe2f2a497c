"""Shared test helpers: small synthetic slides written once per session (others may import these).

Usage in a test module::

    from helpers_slides import synthetic_slide  # noqa: F401  (pytest fixture)

    def test_x(synthetic_slide):
        path = synthetic_slide(size=2048, label=1)   # cached per (size, label, seed, fmt)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zoomfeat.synthetic import SyntheticSlideInfo, write_pyramid, write_synthetic_slide

FIXTURES = ("openslide-python",)


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory):
    """Factory: ``synthetic_slide(size=2048, label=1, seed=0, fmt="aperio") -> SyntheticSlideInfo`` (cached)."""
    cache: dict[tuple, SyntheticSlideInfo] = {}
    root = tmp_path_factory.mktemp("synthetic_slides")

    def make(size: int = 2048, label: int = 1, seed: int = 0, fmt: str = "aperio", **kw) -> SyntheticSlideInfo:
        key = (size, label, seed, fmt, tuple(sorted(kw.items())))
        if key not in cache:
            suffix = "svs" if fmt == "aperio" else "tiff"
            path = root / f"syn-{size}-{label}-{seed}-{fmt}-{len(cache)}.{suffix}"
            cache[key] = write_synthetic_slide(path, size=size, label=label, seed=seed, fmt=fmt, **kw)
        return cache[key]

    return make


def write_blank_slide(path: str | Path, size: int = 1024, value: int = 245) -> Path:
    """An all-white (no tissue) Aperio-style slide, ``size`` px square."""
    return write_pyramid(path, np.full((size, size, 3), value, np.uint8))
