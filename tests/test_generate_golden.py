"""Golden parity of the generation wing against the official ZoomLDM code's outputs
(``../shared/golden/generation``; conventions and tolerances from its README)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from conftest import require_shared

from zoomfeat.generate.decode import decode_large_uint8, to_uint8
from zoomfeat.generate.guidance import Guidance, model_pred
from zoomfeat.generate.interpolate import embeddings_at, slerp, window_contexts
from zoomfeat.generate.resize import Resizer, resize_matrix
from zoomfeat.generate.samplers import SamplerSettings, sample_batch
from zoomfeat.generate.windows import WindowConditions, WindowSettings, gaussian_kernel, refine

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _golden(name: str):
    return np.load(require_shared("golden", "generation", name))


@pytest.fixture(scope="module")
def large():
    return _golden("large_image.npz")


@pytest.fixture(scope="module")
def small_model():
    from zoomfeat.model import load_zoomldm

    return load_zoomldm(require_shared("golden", "generation", "zoomldm_small"), use_ema=True)


@pytest.fixture(scope="module")
def small_model_raw():
    from zoomfeat.model import load_zoomldm

    return load_zoomldm(require_shared("golden", "generation", "zoomldm_small"), use_ema=False)


def T(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# ----- slerp, conditions at window positions, kernel ------------------------------------------------------
@pytest.mark.parametrize("threshold,key", [(0.9995, "slerp_out"), (0.95, "slerp_out_thr0p95")])
def test_slerp_matches_official_for_every_pair_and_t(large, threshold, key):
    v0, v1, ts = large["slerp_v0"], large["slerp_v1"], large["slerp_t"]
    out = np.stack([np.stack([slerp(float(t), T(v0[i]), T(v1[i]), threshold).numpy() for t in ts])
                    for i in range(len(v0))])
    assert rel(out, large[key]) < 1e-5
    batched = slerp(ts[None, :], np.repeat(v0[:, None], len(ts), 1), np.repeat(v1[:, None], len(ts), 1), threshold)
    assert batched.dtype == np.float32 and rel(batched, large[key]) < 1e-5


def test_slerp_returns_a_tensor_on_the_input_dtype(large):
    out = slerp(0.3, T(large["slerp_v0"][0]).double(), T(large["slerp_v1"][0]).double())
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64


def test_linear_branch_is_taken_exactly_where_the_readme_says(large):
    v0, v1 = large["slerp_v0"], large["slerp_v1"]
    for i in range(len(v0)):
        lin = (1 - 0.25) * v0[i] + 0.25 * v1[i]
        close = np.allclose(slerp(0.25, v0[i], v1[i]), lin, rtol=1e-6, atol=1e-7)
        assert close == bool(large["slerp_linear_branch"][i]), large["slerp_pair_names"][i]


def test_embeddings_at_window_positions(large):
    e = embeddings_at(large["getcond_embeddings"], large["getcond_positions"], patch_size=64)
    assert rel(e, large["getcond_e_interp"]) < 1e-5
    assert np.allclose(e.mean(axis=1), 0, atol=1e-5) and np.allclose(e.std(axis=1, ddof=1), 1, atol=1e-5)


def test_window_contexts_match_get_conditioning(large, small_model):
    with torch.no_grad():
        ctx = window_contexts(small_model, large["getcond_embeddings"], large["getcond_positions"], 64)
    assert rel(ctx.numpy(), large["getcond_context"]) < 1e-4
    assert (large["getcond_mag"] == 0).all()  # the contexts are 20x contexts
    assert not large["getcond_uncond"].any()  # the unconditional context is zeros (we use the model's width)


def test_gaussian_kernels(large):
    assert rel(gaussian_kernel(256, sigma=0.8).numpy(), large["kernel_256_sigma0p8"]) < 1e-5
    assert rel(gaussian_kernel(64).numpy(), large["kernel_64_default"]) < 1e-5
    k = gaussian_kernel(256, sigma=0.8).numpy()
    assert (k[127:129, 127:129] == 1).all() and abs(k[0, 0] - 0.04394) < 1e-4


# ----- guidance forms and model_pred ------------------------------------------------------------------------
@pytest.mark.parametrize("t", [300, 1000])
@pytest.mark.parametrize("w", [0, 2])
def test_model_pred_large_image_form(large, small_model, t, w):
    eps = model_pred(small_model, T(large["mp_xt"]), t, T(large["mp_cond"]), w)
    assert rel(eps.numpy(), large[f"mp_eps_t{t}_w{w}"]) < 1e-4


def test_model_pred_switches_to_ema_itself(large, small_model_raw):
    eps = model_pred(small_model_raw, T(large["mp_xt"]), 300, T(large["mp_cond"]), 2)
    assert rel(eps.numpy(), large["mp_eps_t300_w2"]) < 1e-4
    assert not small_model_raw.ema_in_unet  # and puts the raw weights back


def test_guidance_forms_are_the_two_formulas():
    e_c, e_u = torch.tensor([3.0]), torch.tensor([1.0])
    assert Guidance(2.0, "large_image").combine(e_c, e_u).item() == pytest.approx(3 * 3.0 - 2 * 1.0)
    assert Guidance(2.0, "standard").combine(e_c, e_u).item() == pytest.approx(1.0 + 2 * (3.0 - 1.0))
    assert Guidance(2.0, "large_image").standard_scale == 3.0
    assert not Guidance(0.0, "large_image").needs_uncond and not Guidance(1.0, "standard").needs_uncond


def test_model_pred_cond_and_uncond_recombine(large):
    # (1+w) e_c - w e_u with w=2 from the golden w=0 (pure e_c) arrays: e_u = (3 e_c - eps_w2) / 2
    e_c, eps2 = large["mp_eps_t300_w0"], large["mp_eps_t300_w2"]
    e_u = (3 * e_c - eps2) / 2
    assert rel(Guidance(2.0, "large_image").combine(T(e_c), T(e_u)).numpy(), eps2) < 1e-5


# ----- large-image decoder ----------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [pytest.param("dli", marks=pytest.mark.slow), "dli_rect"])
def test_decode_large_image(large, small_model, key):
    img = decode_large_uint8(small_model, T(large[f"{key}_latent"]), stride=16, sigma=0.8)
    gold = large[f"{key}_image"]
    assert img.shape == gold.shape and img.dtype == np.uint8
    diff = np.abs(img.astype(int) - gold.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3


# ----- refinement pass (postprocess_image) ------------------------------------------------------------------
def _stitch(tiles):  # (p1 p2) c h w -> 1 c (p1 h) (p2 w), 2x2 tiles
    t = T(tiles)
    c, h, w = t.shape[1:]
    return t.reshape(2, 2, c, h, w).permute(2, 0, 3, 1, 4).reshape(1, c, 2 * h, 2 * w)


def _tile(x):
    c, hh, ww = x.shape[1:]
    return x[0].reshape(c, 2, hh // 2, 2, ww // 2).permute(1, 3, 0, 2, 4).reshape(4, c, hh // 2, ww // 2)


def _replay(arrays):
    it = iter(arrays)

    def noise(shape):
        a = next(it)
        assert tuple(a.shape) == tuple(shape)
        return a
    return noise


@pytest.fixture(scope="module")
def pp():
    return _golden("postprocess.npz")


def _refine(model, pp, seen=None):
    noise = _replay([_stitch(pp["pp_noise_init"])] + [T(a) for a in pp["pp_noise_steps"]])
    settings = WindowSettings(t_start=300, stride=100, guidance=Guidance(2.0, "large_image"), window_stride=16,
                              batch_size=7)  # batches of 7 windows: the official runs all 25 at once
    on_step = (lambda k, t, x: seen.append((t, x.clone()))) if seen is not None else None
    return _tile(refine(model, _stitch(pp["pp_xt_20x_all"]), pp["pp_ssl_feat"], settings, noise, on_step=on_step))


@pytest.mark.slow
def test_refinement_pass_raw_weights(pp, small_model_raw):
    seen = []
    out = _refine(small_model_raw, pp, seen)
    assert rel(out.numpy(), pp["pp_out"]) < 1e-3
    assert [t for t, _ in seen] == list(pp["pp_steps"])
    for k, (_, x) in enumerate(seen):
        assert rel(x.numpy(), pp["pp_x_at_step"][k]) < 1e-3


@pytest.mark.slow
def test_refinement_pass_ema_weights(pp, small_model):
    assert rel(_refine(small_model, pp).numpy(), pp["pp_out_ema"]) < 1e-3


def test_window_positions_and_their_embeddings(pp):
    w = WindowConditions.from_grid(pp["pp_ssl_feat"], 128, 128, 64, 16)
    assert (w.positions == pp["pp_window_pos"]).all()
    assert rel(w.embeddings, pp["pp_window_e_interp"]) < 1e-5


# ----- resizer ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rs():
    return _golden("resizer.npz")


@pytest.mark.parametrize("src,scale,key,aa", [
    ("rs_img64", 0.5, "rs_down2", True), ("rs_img64", 0.25, "rs_down4", True), ("rs_img32", 2, "rs_up2", True),
    ("rs_img16", 4, "rs_up4", True), ("rs_img64", 0.5, "rs_down2_noaa", False), ("rs_rect", 0.5, "rs_rect_down2", True),
    ("rs_rect", 0.25, "rs_rect_down4", True), ("rs_rect", 2, "rs_rect_up2", True),
])
def test_resizer(rs, src, scale, key, aa):
    out = Resizer(rs[src].shape, scale, antialiasing=aa)(T(rs[src]))
    assert tuple(out.shape) == rs[key].shape and rel(out.numpy(), rs[key]) < 1e-5


@pytest.mark.parametrize("n_in,n_out,scale,key", [(64, 32, 0.5, "down2"), (64, 16, 0.25, "down4"),
                                                   (32, 64, 2, "up2"), (16, 64, 4, "up4")])
def test_resizer_operators(rs, n_in, n_out, scale, key):
    m = resize_matrix(n_in, n_out, scale)
    assert rel(m, rs[f"rs_matrix_{key}"]) < 1e-5
    assert np.allclose(m.sum(axis=1), 1, atol=1e-6)


# ----- notebook patch sampling ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ps():
    return _golden("patch_sampling.npz")


@pytest.fixture(scope="module")
def ps_cond(ps, small_model):
    with torch.no_grad():
        return small_model.summarize([T(ps["ps_grid_20x"]), T(ps["ps_grid_5x"])], T(ps["ps_mag"]))


def test_patch_conditions(ps, ps_cond):
    assert rel(ps_cond.numpy(), ps["ps_cond"]) < 1e-4


@pytest.mark.parametrize("sampler", ["plms", "ddim"])
@pytest.mark.slow
def test_patch_sampling(ps, ps_cond, small_model, sampler):
    seen = []

    def unet(x, t, c):  # records what the sampler feeds the network: [uncond x; cond x] halves are equal
        seen.append((int(t[0]), x[: len(x) // 2, :].clone()))
        return small_model.unet(x, t, c)

    proxy = types.SimpleNamespace(unet=unet, alphas_cumprod=small_model.alphas_cumprod)
    out = sample_batch(proxy, ps_cond, T(ps["ps_x_T"]), SamplerSettings(sampler, 10, Guidance(2.0, "standard")))
    assert rel(out.numpy(), ps[f"ps_{sampler}_sample"]) < 1e-3
    # our sample decodes through the same codebook entries wherever the choice is not a near-tie
    codes = small_model.first_stage_model.quantize.indices(out / small_model.config.diffusion.scale_factor)
    sure = ps[f"ps_{sampler}_code_gap_rel"] > 1e-4
    assert sure.mean() > 0.95 and (codes.numpy()[sure] == ps[f"ps_{sampler}_codes"][sure]).all()
    times = sorted({t for t, _ in seen})
    assert times == list(ps["ps_timesteps"])
    if sampler == "plms":  # x_T then x after each step: the inputs of each step's first evaluation, then the result
        firsts = [x[0] for k, (t, x) in enumerate(seen) if k != 1]  # drop PLMS's extra pseudo-step evaluation
        inter = torch.stack(firsts + [out[0]])
        assert rel(inter.numpy(), ps["ps_plms_x_inter0"]) < 1e-3


@pytest.mark.slow
def test_patch_decoding(ps, small_model):
    with torch.no_grad():
        dec = small_model.decode_first_stage(T(ps["ps_plms_sample"][:1]))
        img = to_uint8(small_model.decode_first_stage(T(ps["ps_ddim_sample"])))
    assert rel(dec.numpy(), ps["ps_plms_decoded0"]) < 1e-4
    diff = np.abs(img.transpose(0, 3, 1, 2).astype(int) - ps["ps_ddim_image_uint8"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3
