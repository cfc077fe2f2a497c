"""The ``grid`` method (MultiDiffusion windows over a large latent): seams at window borders are no stronger
than inside the windows (a gradient statistic), while the same statistic does see the seams of independently
sampled, tiled patches. Plus window geometry and the decoder's coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zoomfeat.errors import ConfigError
from zoomfeat.generate.decode import decode_large, decode_large_uint8
from zoomfeat.generate.guidance import Guidance
from zoomfeat.generate.joint import mosaic_images
from zoomfeat.generate.windows import SeededNoise, WindowSettings, grid_sample, window_grid, window_offsets

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(generate_tiny):
    from zoomfeat.model import load_zoomldm

    return load_zoomldm(generate_tiny, use_ema=True)


def seam_ratio(images: torch.Tensor, period: int, phase: int) -> float:
    """Mean |horizontal and vertical pixel differences| across borders at multiples of ``period`` px, divided by
    the mean across the other borders at multiples of ``phase`` px (the latent-pixel borders, f px apart: the
    decoder's own upsampling makes those differ from the pairs inside a latent pixel). 1 = no seam; images
    float [B, 3, H, W]."""
    x = images.double()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(0, 1, 2))  # [W-1]: between column c and c+1
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    at = lambda n, p: (torch.arange(n) + 1) % p == 0  # noqa: E731
    seam = torch.cat([dx[at(len(dx), period)], dy[at(len(dy), period)]]).mean()
    inside = torch.cat([dx[at(len(dx), phase) & ~at(len(dx), period)],
                        dy[at(len(dy), phase) & ~at(len(dy), period)]]).mean()
    return float(seam / inside)


@pytest.fixture(scope="module")
def embedding_grid(model):
    g = torch.Generator().manual_seed(3)
    return torch.randn(model.conditioning_dim, 2, 2, generator=g).numpy()


@pytest.fixture(scope="module")
def grid_images(model, embedding_grid):
    settings = WindowSettings(t_start=1000, stride=100, guidance=Guidance(2.0, "large_image"), batch_size=32)
    with torch.no_grad():
        latent = grid_sample(model, embedding_grid, settings, SeededNoise(0), batch=2)
        return decode_large(model, latent)


@pytest.mark.slow
def test_grid_method_has_no_seams_at_window_or_patch_borders(model, grid_images):
    f = model.config.first_stage.downsample_factor
    window = model.config.diffusion.image_size
    assert grid_images.shape[-1] == 2 * window * f
    assert seam_ratio(grid_images, (window // 2) * f, f) <= 1.15  # window borders (every other one)
    assert seam_ratio(grid_images, window * f, f) <= 1.15  # the 20x patch borders


def test_the_seam_statistic_sees_the_seams_of_independent_tiles(model, embedding_grid):
    from zoomfeat.generate.conditions import tile_contexts_20x
    from zoomfeat.generate.samplers import SamplerSettings, sample_patches

    ctx = tile_contexts_20x(model, embedding_grid)
    latents = torch.cat([sample_patches(model, ctx, list(range(4 * k, 4 * k + 4)),
                                         SamplerSettings("ddim", 10, Guidance(3.0, "standard"))) for k in range(4)])
    tiled = torch.cat([mosaic_images(model, latents[4 * k:4 * k + 4], (2, 2)) for k in range(4)])
    window_px = model.config.diffusion.image_size * model.config.first_stage.downsample_factor
    assert seam_ratio(tiled, window_px, model.config.first_stage.downsample_factor) >= 1.5


def test_window_offsets_cover_the_last_pixel():
    assert window_offsets(128, 64, 16) == [0, 16, 32, 48, 64]
    assert window_offsets(100, 64, 16) == [0, 16, 32, 36]  # the official range would stop at 32 (36 uncovered)
    assert window_offsets(64, 64, 16) == [0]
    with pytest.raises(ConfigError):
        window_offsets(32, 64, 16)
    pos = window_grid(24, 16, 8, 4)
    assert pos.shape == (5 * 3, 2) and tuple(pos[1]) == (0, 4)  # rows outer, columns inner


def test_decoder_covers_a_latent_the_stride_does_not_reach(model):
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 3, 8, 11, generator=g)  # 11 - 8 = 3 is not a multiple of the stride 2
    img = decode_large_uint8(model, latent)
    assert img.shape == (1, 16, 22, 3)
    flt = decode_large(model, latent)
    assert torch.isfinite(flt).all()
    # the last columns come from the added last window: equal to decoding that window alone, blended
    with torch.no_grad():
        alone = model.decode_first_stage(latent[..., 3:]).float()
    assert torch.allclose(flt[..., -2:], alone[..., -2:], atol=1e-5)


def test_decoder_matches_single_window_decoding_when_there_is_one_window(model):
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        assert torch.allclose(decode_large(model, latent), model.decode_first_stage(latent).float(), atol=1e-6)
