"""Golden parity of UNI, Phikon and CTransPath against their reference implementations.

The rule weights are rebuilt from ``../shared/golden/encoders/<name>/keys.json`` (tests/encoder_rule.py),
written in each official file format, loaded through ``load_encoder`` and run on ``cases.npz`` inputs
(already normalised, so ``forward`` is called without ``preprocess``).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from encoder_rule import check_mismatches, read_keys, rule_weights, weights_sha256, write_official
from conftest import require_shared
from zoomfeat.encoders import load_encoder

ATOL = 1e-5


def _golden(name):
    folder = require_shared("golden", "encoders", name)
    return read_keys(folder), dict(np.load(folder / "cases.npz"))


def _loaded(name, tmp_path_factory, full_checks: bool):
    """(encoder loaded from the official files, cases, their folder) for one golden encoder."""
    keys, cases = _golden(name)
    weights = rule_weights(keys)
    if full_checks:
        assert check_mismatches(keys, weights) == []
        assert weights_sha256(weights) == keys["weights_sha256"]
    else:  # UNI: 300M values, check a sample of keys of every kind
        sample = {"keys": [e for e in keys["keys"] if e["key"].startswith(("blocks.0.", "blocks.23.", "norm",
                                                                            "cls", "pos", "patch"))]}
        assert len(sample["keys"]) > 20 and check_mismatches(sample, weights) == []
    folder = write_official(name, keys, weights, tmp_path_factory.mktemp(name))
    if name == "phikon":  # also the other official file, with a `vit.` prefix and the pooler kept
        torch.save({f"vit.{k}": v for k, v in weights.items()}, folder / "pytorch_model.bin")
    del weights
    gc.collect()
    return load_encoder(name, folder), cases, folder


@pytest.fixture(scope="module")
def uni(tmp_path_factory):
    loaded = _loaded("uni", tmp_path_factory, full_checks=False)
    yield loaded
    del loaded
    gc.collect()


@pytest.fixture(scope="module")
def phikon(tmp_path_factory):
    return _loaded("phikon", tmp_path_factory, full_checks=True)


@pytest.fixture(scope="module")
def ctranspath(tmp_path_factory):
    return _loaded("ctranspath", tmp_path_factory, full_checks=True)


def _run(encoder, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(embedding, patch-token mean after the final norm) of a normalised batch, in one forward pass.

    The final norm's output is captured with a hook, so the model runs once per batch.
    """
    captured = []
    hook = encoder.model.norm.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        with torch.no_grad():
            embedding = encoder(torch.from_numpy(x)).numpy()
    finally:
        hook.remove()
    tokens = captured[0]
    patch_mean = tokens[:, 1:].mean(1).numpy() if tokens.ndim == 3 else None  # ViT: [B, 1+N, D]
    return embedding, patch_mean


@pytest.mark.slow
def test_uni_matches_golden_224_and_256(uni):
    encoder, cases, _ = uni
    embedding, patch_mean = _run(encoder, cases["input"])
    np.testing.assert_allclose(embedding, cases["embedding"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(patch_mean, cases["patch_token_mean"], rtol=0, atol=ATOL)
    embedding, patch_mean = _run(encoder, cases["input_256"])
    np.testing.assert_allclose(embedding, cases["embedding_256"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(patch_mean, cases["patch_token_mean_256"], rtol=0, atol=ATOL)


@pytest.mark.slow
def test_phikon_matches_golden(phikon):
    encoder, cases, _ = phikon
    assert encoder.config.layer_norm_eps == 1e-6
    embedding, patch_mean = _run(encoder, cases["input"])
    np.testing.assert_allclose(embedding, cases["embedding"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(patch_mean, cases["patch_token_mean"], rtol=0, atol=ATOL)


@pytest.mark.slow
def test_phikon_loads_the_pytorch_bin_with_a_vit_prefix_too(phikon):
    _, cases, folder = phikon
    embedding, _ = _run(load_encoder("phikon", folder / "pytorch_model.bin"), cases["input"])
    np.testing.assert_allclose(embedding, cases["embedding"], rtol=0, atol=ATOL)


@pytest.mark.slow
def test_ctranspath_matches_golden(ctranspath):
    encoder, cases, _ = ctranspath
    embedding, _ = _run(encoder, cases["input"])
    np.testing.assert_allclose(embedding, cases["embedding"], rtol=0, atol=ATOL)
    # the two golden images differ by 0.03 at most: make sure we are not matching a constant
    assert np.abs(embedding[0] - embedding[1]).max() > 0.01
