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
    """gmres: 10 steps of stride 100, Krylov size 4 and a full Newton step (lr 1): fewer steps than the notebook
    copy's 20, so each step takes the whole correction."""
    return _pair(model, stride=100, update="gmres", krylov=4, lr=1.0)


def _check_agreement(model, pair) -> None:
    joint = _downsampled_disagreement(model, pair[True], (2, 2))
    independent = _downsampled_disagreement(model, pair[False], (2, 2))
    assert np.isfinite(joint) and independent > 0.05  # independent patches do disagree with the guide
    assert joint * 2 <= independent, (joint, independent)


@pytest.mark.slow
def test_joint_sampling_agrees_with_the_guide_at_least_twice_better_than_independent(model, joint_pair):
    _check_agreement(model, joint_pair)


def test_defaults_are_the_supplements_algorithm_s2():
    """50 steps of stride 20 from t = 1000, w = 2 (s = 3), zeta = delta = 0.005, lambda 0.5, the J·e update, K = 1."""
    s = JointSettings()
    assert (s.t_start, s.stride, s.guidance, s.h, s.lr, s.update, s.iterations) == \
        (1000, 20, Guidance(2.0, "large_image"), 0.005, 0.5, "je", 1)
    assert s.guide_scale == s.guidance and s.krylov == 10


@pytest.mark.slow
def test_gmres_agreement_with_the_notebook_copys_settings(model):
    """gmres (zoomfeat's earlier update): 20 steps of stride 50 from t = 1000, w = 2, h = 0.005, lr 0.5, Krylov 10."""
    pair = _pair(model, stride=50, update="gmres", krylov=10)
    assert len(pair[True].disagreement) == 20
    _check_agreement(model, pair)


@pytest.mark.slow
def test_je_agreement_with_the_supplements_settings(model):
    """je with the defaults (50 steps, K = 1): the same agreement bar as gmres, at a fraction of the evaluations."""
    pair = _pair(model)
    assert len(pair[True].disagreement) == 50
    _check_agreement(model, pair)
    assert pair[True].evaluations == 50 * (1 + 4 * 3)  # guide + 4 patches x (x0, x0(x + zeta e), x0 re-evaluated)


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
    runs = [joint_sample(model, ctx, SampledGuide(guide), JointSettings(t_start=300, stride=100, update="gmres", krylov=2,
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
                           JointSettings(t_start=500, stride=100, iterations=2, constrain=c), SeededNoise(2))
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

    for bad in ({"h": 0}, {"lr": -1}, {"iterations": 0}, {"krylov": 0}, {"update": "newton"}, {"batch_size": 0}):
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


# ----- Algorithm S2's J·e update, written from the supplement's equations ----------------------------------------
def _s2_reference(model, ctx, guide_img, w, t, stride, zeta, lam, k_iters, seed):
    """One joint step with a fixed guide image, from the equations, on the model's public functions only:
    U-Net (large-image guidance w, float 1-based t), decode/encode_first_stage, and the golden-checked Resizer for
    the mosaic's down/up-sampling (whole-mosaic matrix products). Noise: one torch.Generator(seed) drawn as the
    sampler documents (the patches' x_T, then the step noise)."""
    from zoomfeat.generate.resize import Resizer

    gen = torch.Generator().manual_seed(seed)
    n, c, s = len(ctx), model.latent_channels, int(model.config.diffusion.image_size)
    x = torch.randn((n, c, s, s), generator=gen)
    a = float(model.alphas_cumprod[t - 1])
    a_prev = float(model.alphas_cumprod[max(t - 1 - stride, 0)])
    beta = float(model.betas[t - 1]) * (1 - a_prev) / (1 - a)

    def x0_of(xt):  # x0 = x_t / sqrt(a) - eps sqrt((1 - a) / a), eps = (1 + w) e_c - w e_u
        tt = torch.full((2 * len(xt),), float(t))
        e_c, e_u = model.unet(torch.cat([xt, xt]), tt, torch.cat([ctx, torch.zeros_like(ctx)])).chunk(2)
        return xt / a ** 0.5 - ((1 + w) * e_c - w * e_u) * ((1 - a) / a) ** 0.5

    px = s * int(model.config.first_stage.downsample_factor)
    g = int(round(n ** 0.5))
    big = g * px
    down = Resizer((big, big), guide_img.shape[-1] / big, output_shape=tuple(guide_img.shape[-2:]))
    up = Resizer(tuple(guide_img.shape[-2:]), big / guide_img.shape[-1], output_shape=(big, big))

    def tiles_to_mosaic(imgs):
        return imgs.reshape(g, g, 3, px, px).permute(2, 0, 3, 1, 4).reshape(3, big, big)

    def mosaic_to_tiles(m):
        return m.reshape(3, g, px, g, px).permute(1, 3, 0, 2, 4).reshape(n, 3, px, px)

    def max_abs(v):
        return v.flatten(1).abs().amax(1).view(-1, 1, 1, 1)

    with torch.no_grad():
        x0 = x0_of(x)
        for _ in range(k_iters):
            imgs = model.decode_first_stage(x0)
            r = guide_img[0] - down.m_h @ tiles_to_mosaic(imgs) @ down.m_w.T
            d_img = mosaic_to_tiles(up.m_h @ r @ up.m_w.T)
            # e: the encoder's finite-difference JVP along each tile's correction (a step of rms zeta)
            rms = d_img.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1)
            e = (model.encode_first_stage(imgs + zeta * d_img / rms) - model.encode_first_stage(imgs)) * (rms / zeta)
            e = e / max_abs(e)
            je = (x0_of(x + zeta * e) - x0) / zeta  # J·e, one forward finite difference
            x = x + lam * je / max_abs(je)
            x0 = x0_of(x)  # re-evaluated after the update
        eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5
        noise = torch.randn(x.shape, generator=gen)
        return a_prev ** 0.5 * x0 + (1 - a_prev - beta) ** 0.5 * eps + beta ** 0.5 * noise


@pytest.mark.parametrize("k_iters, zeta, tol", [(1, 0.1, 1e-5), (2, 0.3, 5e-5)])
def test_je_update_equals_algorithm_s2_from_the_equations(model, k_iters, zeta, tol):
    """zeta >= 0.1 rather than 0.005 here: the two computations sum the mosaic in different orders (float32
    rounding ~1e-7), which each finite difference amplifies by 1/zeta; the equations are the same at any zeta.
    K = 2 re-measures the residual between the updates through one more decode and two more differences, so
    its float32 agreement is ~1.2e-5 (bar 5e-5); K = 1, the default, agrees to 1e-5."""
    ctx = _contexts(model, 4, 11)
    guide = torch.linspace(-0.5, 0.5, 3 * 16 * 16).reshape(1, 3, 16, 16)
    t, stride = 600, 600  # one step: 600 -> 0
    ours = joint_sample(model, ctx, FixedGuide(image=guide),
                        JointSettings(t_start=t, stride=stride, h=zeta, iterations=k_iters, batch_size=4),
                        SeededNoise(5))
    ref = _s2_reference(model, ctx, guide, 2.0, t, stride, zeta, 0.5, k_iters, 5)
    assert ours.evaluations == 4 * (1 + 2 * k_iters)
    err = float((ours.latents - ref).abs().max() / ref.abs().max())
    assert err <= tol, err
