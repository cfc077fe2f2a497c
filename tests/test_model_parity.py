"""ZoomLDM parity: every array of ../shared/golden/zoomldm_tiny/cases.npz reproduced through the public API.

The golden arrays come from the official implementation run on config.yaml + weights.ckpt of that folder.
Forward passes must agree to 1e-4 relative (max abs error / max abs value), samplers to 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import require_shared

pytestmark = pytest.mark.usefixtures("one_thread")

FORWARD_TOL = 1e-4
SAMPLER_TOL = 1e-3


def rel_err(actual: torch.Tensor, expected: np.ndarray) -> float:
    expected_t = torch.from_numpy(expected)
    assert actual.shape == expected_t.shape
    return float((actual.float() - expected_t).abs().max() / expected_t.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def golden_dir():
    return require_shared("golden", "zoomldm_tiny")


@pytest.fixture(scope="module")
def cases(golden_dir):
    with np.load(golden_dir / "cases.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def raw_model(golden_dir):
    from zoomfeat.model import load_zoomldm

    return load_zoomldm(golden_dir, use_ema=False)


@pytest.fixture(scope="module")
def ema_model(golden_dir):
    from zoomfeat.model import load_zoomldm

    return load_zoomldm(golden_dir / "config.yaml", golden_dir / "weights.ckpt", use_ema=True)


def t(cases, key):
    return torch.from_numpy(cases[key])


@pytest.mark.parametrize("mag", range(8))
@pytest.mark.slow
def test_ssl_preprocessing_and_context(raw_model, cases, mag):
    prep = raw_model.preprocess_ssl(t(cases, f"ssl_raw_mag{mag}"))
    assert rel_err(prep, cases[f"ssl_prep_mag{mag}"]) < FORWARD_TOL
    with torch.no_grad():
        ctx = raw_model.summarize([t(cases, f"ssl_prep_mag{mag}")], torch.tensor([mag]))
    assert rel_err(ctx, cases[f"context_mag{mag}"]) < FORWARD_TOL


def test_preprocessing_of_a_batch(raw_model, cases):
    raw = torch.stack([t(cases, "ssl_raw_mag5"), t(cases, "ssl_raw_mag5") * 2 + 1])
    prep = raw_model.preprocess_ssl(raw)
    assert rel_err(prep[0], cases["ssl_prep_mag5"]) < FORWARD_TOL
    assert rel_err(prep[1], cases["ssl_prep_mag5"]) < FORWARD_TOL  # standardisation removes scale and shift


def test_context_batch_mixes_grid_sizes(raw_model, cases):
    grids = [t(cases, "ssl_prep_mag0"), t(cases, "ssl_prep_mag2")]
    with torch.no_grad():
        ctx = raw_model.summarize(grids, torch.tensor([0, 2]))
    assert rel_err(ctx, cases["unet_context"]) < FORWARD_TOL


def test_first_stage(raw_model, cases):
    with torch.no_grad():
        assert rel_err(raw_model.encode_first_stage(t(cases, "image")), cases["latent"]) < FORWARD_TOL
        assert rel_err(raw_model.decode_first_stage(t(cases, "latent")), cases["decoded"]) < FORWARD_TOL


def test_q_sample(raw_model, cases):
    x_t = raw_model.q_sample(t(cases, "latent"), t(cases, "t"), t(cases, "noise"))
    assert rel_err(x_t, cases["x_t"]) < FORWARD_TOL


def _unet_inputs(cases):
    return t(cases, "x_t"), t(cases, "t"), t(cases, "unet_context")


def test_eps_and_middle_block(raw_model, cases):
    with torch.no_grad():
        assert rel_err(raw_model.unet(*_unet_inputs(cases)), cases["eps"]) < FORWARD_TOL
        assert rel_err(raw_model.unet_features(*_unet_inputs(cases), block=None), cases["middle_block"]) < FORWARD_TOL


@pytest.mark.parametrize("block", range(12))
def test_output_blocks(raw_model, cases, block):
    with torch.no_grad():
        feats = raw_model.unet_features(*_unet_inputs(cases), block=block)
    assert rel_err(feats, cases[f"output_block_{block}"]) < FORWARD_TOL
    assert feats.shape[1] == raw_model.feature_dim(block)


def test_ema_weights(ema_model, raw_model, cases):
    with torch.no_grad():
        assert rel_err(ema_model.unet(*_unet_inputs(cases)), cases["eps_ema"]) < FORWARD_TOL
        assert rel_err(ema_model.unet_features(*_unet_inputs(cases)), cases["output_block_3_ema"]) < FORWARD_TOL
        with raw_model.ema_swap():
            assert rel_err(raw_model.unet(*_unet_inputs(cases)), cases["eps_ema"]) < FORWARD_TOL
        assert rel_err(raw_model.unet(*_unet_inputs(cases)), cases["eps"]) < FORWARD_TOL  # swapped back


@pytest.mark.parametrize(
    ("key", "sampler", "guidance"),
    [("ddim_sample", "ddim", 2.0), ("ddim_nocfg_sample", "ddim", 1.0), ("plms_sample", "plms", 2.0)],
)
@pytest.mark.slow
def test_samplers(raw_model, cases, key, sampler, guidance):
    out = raw_model.sample(t(cases, "context_mag2"), t(cases, "x_T"), steps=10, guidance=guidance, sampler=sampler)
    assert rel_err(out, cases[key]) < SAMPLER_TOL
