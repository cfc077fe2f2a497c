"""Shared test fixtures.

Tests that need ``../shared`` (golden outputs, slide fixtures, HIPT split files) use the ``shared_dir``
fixture: they skip when it is absent on a developer machine and fail in CI (``CI=true``), where it must exist.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ZOOMFEAT_SHARED", ROOT.parent / "shared"))
# Tests never touch the network or the developer's own Hugging Face cache: a weights name resolves offline in an
# empty cache (tests/test_hub_weights.py builds its own caches).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = str(Path(os.environ.get("TMPDIR", "/tmp")) / "zoomfeat-tests-no-hub-cache")


def require_shared(*parts: str) -> Path:
    """Path under ``../shared``; skip the test when missing, fail when missing in CI."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} is missing (the ../shared folder beside the checkout)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI requires {message}")
        pytest.skip(message)
    return path


@pytest.fixture
def shared_dir() -> Path:
    return require_shared()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny models: on a 2-core machine the thread pool's overhead
    dominates such forward passes (measured 10-20x slower with two threads under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def generate_tiny() -> Path:
    """The fitted 16-px ZoomLDM of the generation tests (tests/helpers_generate.py), fitted once per machine."""
    from helpers_generate import fitted_model_dir

    return fitted_model_dir()


def pytest_collection_modifyitems(config, items):
    """Tests that need the fitted generation model are in the slow tier: on a new machine the first of them fits
    it (~90 s), which the default tier's two minutes cannot hold."""
    for item in items:
        if "generate_tiny" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
