"""Small pieces of the extraction: seeded noise, pooling, model input scaling, contiguous write runs."""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: E402  (a required dependency: imported, never skipped)

from zoomfeat.extract.noise import patch_seed, seeded_noise  # noqa: E402
from zoomfeat.extract.runner import contiguous_runs  # noqa: E402
from zoomfeat.extract.zoomldm import pool_features, to_model_input  # noqa: E402


def test_noise_depends_on_slide_mag_and_position_only():
    coords = np.array([[0, 0], [256, 512], [1024, 0]], np.int64)
    full = seeded_noise("s1", "5x", coords, (3, 4, 4))
    np.testing.assert_array_equal(seeded_noise("s1", "5x", coords[::-1], (3, 4, 4)).numpy(), full.numpy()[::-1])
    assert not torch.equal(seeded_noise("s1", "20x", coords[:1], (3, 4, 4))[0], full[0])
    assert not torch.equal(seeded_noise("s2", "5x", coords[:1], (3, 4, 4))[0], full[0])
    assert patch_seed("s1", "5x", 0, 0) == patch_seed("s1", "5x", 0, 0) < 2**63
    assert abs(float(seeded_noise("s", "20x", np.zeros((64, 2), np.int64) + np.arange(64)[:, None],
                                  (3, 16, 16)).std()) - 1.0) < 0.05


def test_pooling_mean_and_meanmax():
    fmap = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    mean = pool_features(fmap, "mean")
    assert mean.shape == (2, 3) and mean[1, 2].item() == pytest.approx(fmap[1, 2].mean().item())
    both = pool_features(fmap, "meanmax")
    assert both.shape == (2, 6)
    assert torch.equal(both[:, :3], mean) and both[0, 5].item() == fmap[0, 2].max().item()


def test_model_input_is_resized_and_in_minus_one_one():
    images = torch.zeros(1, 3, 256, 256, dtype=torch.uint8)
    images[..., :128] = 255
    x = to_model_input(images, 64)
    assert x.shape == (1, 3, 64, 64)
    assert x[0, :, 0, 0].tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    assert x[0, :, -1, -1].tolist() == pytest.approx([-1.0] * 3, abs=1e-5)
    assert -1.0 - 1e-5 <= x.min().item() and x.max().item() <= 1.0 + 1e-5


def test_contiguous_runs():
    assert contiguous_runs(np.array([4, 5, 6])) == [(0, 3)]
    assert contiguous_runs(np.array([1, 2, 7, 8, 10])) == [(0, 2), (2, 4), (4, 5)]
