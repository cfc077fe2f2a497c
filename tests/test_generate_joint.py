"""Joint multi-scale sampling (ZoomLDM §3.2): the agreement it promises, measured; its numerical parts checked
against independent oracles (numpy least squares, analytic Jacobians)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zoomfeat.generate.guidance import Guidance
from zoomfeat.generate.joint import (FixedGuide, JointSettings, SampledGuide, fd_jvp, gmres, joint_sample,
                                     mosaic_images)
from zoomfeat.generate.windows import SeededNoise

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(generate_tiny):
    from zoomfeat.model import load_zoomldm

    return load_zoomldm(generate_tiny, use_ema=True)


def _contexts(model, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grids = [model.preprocess_ssl(torch.randn(model.conditioning_dim, 1, 1, generator=g)) for _ in range(n)]
    with torch.no_grad():
        return model.summarize(grids, torch.zeros(n, dtype=torch.long))


def _guide_context(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grid = model.preprocess_ssl(torch.randn(model.conditioning_dim, 2, 2, generator=g))
    with torch.no_grad():
        return model.summarize([grid], torch.tensor([1]))  # 10x


def _downsampled_disagreement(model, result, grid_hw) -> float:
    """rms between the decoded guide and the decoded 20x mosaic downsampled 2x by 2x2 block averaging
    (an independent downsampler: not the sampler's own bicubic Resizer)."""
    mosaic = mosaic_images(model, result.latents, grid_hw)
    with torch.no_grad():
        guide = model.decode_first_stage(result.guide_latent).float()
    down = torch.nn.functional.avg_pool2d(mosaic.clamp(-1, 1), 2)
    return float((guide.clamp(-1, 1) - down).pow(2).mean().sqrt())


def _pair(model, **settings):
    """The same 2x2 20x patches (10x region) sampled jointly and independently, same seeds and contexts."""
    ctx, guide = _contexts(model, 4, 1), _guide_context(model, 2)
    return {c: joint_sample(model, ctx, SampledGuide(guide), JointSettings(batch_size=4, constrain=c, **settings),
                            SeededNoise(7)) for c in (True, False)}


@pytest.fixture(scope="module")
def joint_pair(model):
    """10 steps of stride 100, 4 inner iterations and a full Newton step (lr 1): fewer steps than the paper's
    20, so each step takes the whole correction."""
    return _pair(model, stride=100, inner_iterations=4, lr=1.0)


def _check_agreement(model, pair) -> None:
    joint = _downsampled_disagreement(model, pair[True], (2, 2))
    independent = _downsampled_disagreement(model, pair[False], (2, 2))
    assert np.isfinite(joint) and independent > 0.05  # independent patches do disagree with the guide
    assert joint * 2 <= independent, (joint, independent)


@pytest.mark.slow
def test_joint_sampling_agrees_with_the_guide_at_least_twice_better_than_independent(model, joint_pair):
    _check_agreement(model, joint_pair)


@pytest.mark.slow
def test_joint_agreement_with_the_papers_settings(model):
    """20 steps of stride 50 from t = 1000, w = 2, h = 0.005, lr 0.5, 10 inner iterations (the defaults)."""
    s = JointSettings()
    assert (s.t_start, s.stride, s.guidance, s.h, s.lr, s.inner_iterations) == \
        (1000, 50, Guidance(2.0, "large_image"), 0.005, 0.5, 10)
    pair = _pair(model)
    assert len(pair[True].disagreement) == 20
    _check_agreement(model, pair)


def test_the_guide_is_not_influenced_by_the_patches(joint_pair):
    assert torch.equal(joint_pair[True].guide_latent, joint_pair[False].guide_latent)
    assert not torch.equal(joint_pair[True].latents, joint_pair[False].latents)


def test_disagreement_is_recorded_per_step(joint_pair):
    hist = joint_pair[True].disagreement
    assert len(hist) == 10 and all(np.isfinite(hist))
    assert hist[-1] < joint_pair[False].disagreement[-1]


@pytest.mark.slow
def test_batch_size_does_not_change_the_result(model):
    ctx, guide = _contexts(model, 4, 3), _guide_context(model, 4)
    runs = [joint_sample(model, ctx, SampledGuide(guide), JointSettings(t_start=300, stride=100, inner_iterations=2,
                                                                        batch_size=b, h=0.05), SeededNoise(1))
            for b in (1, 4)]
    # batches change float rounding (~1e-7), which finite differences amplify by 1/h; at h = 0.005 that can flip
    # a codebook choice near a tie in the decoder's quantiser, so this check uses h = 0.05
    diff = (runs[0].latents - runs[1].latents).abs().max()
    assert diff <= 1e-3 * runs[1].latents.abs().max()
    assert runs[0].disagreement == pytest.approx(runs[1].disagreement, rel=1e-4)


@pytest.mark.slow
def test_fixed_guide_image_pulls_the_patches_toward_it(model):
    """A fixed measurement (super-resolution use): a flat mid-grey guide image at 10x."""
    ctx = _contexts(model, 4, 5)
    target = torch.full((1, 3, 16, 16), 0.3)
    res = {c: joint_sample(model, ctx, FixedGuide(image=target),
                           JointSettings(t_start=500, stride=100, inner_iterations=4, constrain=c), SeededNoise(2))
           for c in (True, False)}
    assert res[True].guide_latent is None
    err = {c: float((torch.nn.functional.avg_pool2d(mosaic_images(model, r.latents, (2, 2)), 2) - target)
                    .pow(2).mean().sqrt()) for c, r in res.items()}
    assert err[True] * 2 <= err[False], err


def test_fixed_guide_needs_exactly_one_input():
    from zoomfeat.errors import ConfigError

    with pytest.raises(ConfigError):
        FixedGuide()
    with pytest.raises(ConfigError):
        FixedGuide(image=torch.zeros(1, 3, 4, 4), latent=torch.zeros(1, 3, 2, 2))


def test_settings_are_validated():
    from zoomfeat.errors import ConfigError

    for bad in ({"h": 0}, {"lr": -1}, {"inner_iterations": 0}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            JointSettings(**bad)


# ----- numerical parts --------------------------------------------------------------------------------------
def test_fd_jvp_matches_the_analytic_jacobian():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    fn = lambda x: torch.tanh(x @ a.T)  # noqa: E731  (per-sample map R^6 -> R^6)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    v = torch.randn(3, 6, generator=g, dtype=torch.float64) * 10
    jac = (1 - torch.tanh(x @ a.T) ** 2)[:, :, None] * a[None]  # d tanh(a x) / dx
    exact = torch.einsum("bij,bj->bi", jac, v)
    approx = fd_jvp(fn, x, fn(x), v, 1e-6)
    assert torch.allclose(approx, exact, rtol=1e-4, atol=1e-4)


def test_gmres_solves_each_block_like_numpy():
    g = torch.Generator().manual_seed(1)
    mats = torch.eye(8, dtype=torch.float64) * 3 + torch.randn(2, 8, 8, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(2, 8, generator=g, dtype=torch.float64)
    x, ax = gmres(lambda v: torch.einsum("bij,bj->bi", mats, v), b, iterations=8)
    for k in range(2):
        expected = np.linalg.solve(mats[k].numpy(), b[k].numpy())
        assert np.allclose(x[k].numpy(), expected, atol=1e-6)
    assert torch.allclose(ax, b, atol=1e-6)  # the Arnoldi image of the solution is A x
