"""ZoomLDM weights: official key layout of the full-size model, strict loading, save/load round trip, EMA."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from tests.conftest import require_shared
from zoomfeat.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir():
    return require_shared("golden", "zoomldm_tiny")


@pytest.fixture(scope="module")
def tiny_weights(tiny_dir):
    return torch.load(tiny_dir / "weights.ckpt", map_location="cpu", weights_only=True)


def test_full_size_model_has_the_official_keys_and_shapes():
    from zoomfeat.model import build_zoomldm

    expected = json.loads(require_shared("golden", "zoomldm_brca_keys.json").read_text())
    m = build_zoomldm(require_shared("golden", "zoomldm_brca_config.yaml"), device="meta")
    ours = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert len(expected) == 1750
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}
    assert m.feature_dim(3) == 576 and m.context_dim == 512 and m.conditioning_dim == 1024
    assert m.first_stage_resolution == 256 and m.num_timesteps == 1000 and m.mag_levels == 8


@pytest.mark.parametrize("use_ema", [True, False])
@pytest.mark.slow
def test_save_official_round_trip_is_exact(tiny_dir, tiny_weights, tmp_path, use_ema):
    from zoomfeat.model import load_zoomldm

    m = load_zoomldm(tiny_dir, use_ema=use_ema)
    path = m.save_official(tmp_path / "out.ckpt")
    saved = torch.load(path, weights_only=True)
    assert set(saved) == set(tiny_weights)
    assert all(torch.equal(saved[k], tiny_weights[k]) and saved[k].dtype == tiny_weights[k].dtype for k in saved)
    again = load_zoomldm(tiny_dir / "config.yaml", path, use_ema=use_ema)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))


def test_use_ema_puts_the_ema_weights_in_the_unet(tiny_dir, tiny_weights):
    from zoomfeat.model import load_zoomldm

    m = load_zoomldm(tiny_dir, use_ema=True)
    w = m.model.diffusion_model.out[2].weight
    assert torch.equal(w, tiny_weights["model_ema.diffusion_modelout2weight"])
    assert not torch.equal(w, tiny_weights["model.diffusion_model.out.2.weight"])


@pytest.mark.slow
def test_lightning_checkpoint_and_unsafe_flag(tiny_weights, tmp_path):
    from zoomfeat.model.checkpoint import read_state_dict

    plain = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": tiny_weights, "epoch": 3}, plain)
    assert read_state_dict(plain).keys() == tiny_weights.keys()
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": tiny_weights, "hyper_parameters": argparse.Namespace(lr=1e-4)}, pickled)
    with pytest.raises(CheckpointError, match="unsafe"):
        read_state_dict(pickled)
    assert read_state_dict(pickled, unsafe=True).keys() == tiny_weights.keys()


@pytest.mark.slow
def test_load_zoomldm_reads_a_lightning_checkpoint(tiny_dir, tiny_weights, tmp_path):
    from zoomfeat.model import load_zoomldm

    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": tiny_weights, "global_step": 10}, path)
    m = load_zoomldm(tiny_dir / "config.yaml", path, use_ema=False)
    assert torch.equal(m.cond_stage_model.pad_token.detach(), tiny_weights["cond_stage_model.pad_token"])


@pytest.mark.slow
def test_mismatched_weights_name_missing_and_unexpected_keys(tiny_dir, tiny_weights, tmp_path):
    from zoomfeat.model import load_zoomldm

    broken = dict(tiny_weights)
    for key in [k for k in broken if k.startswith("first_stage_model.decoder.up.0")]:
        del broken[key]
    broken["cond_stage_model.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.ckpt"
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as err:
        load_zoomldm(tiny_dir / "config.yaml", path)
    message = str(err.value)
    assert "24 missing: first_stage_model.decoder.up.0" in message and "(+19 more)" in message
    assert "1 unexpected: cond_stage_model.extra.weight" in message and "\n" not in message


@pytest.mark.slow
def test_missing_files_are_user_errors(tmp_path, tiny_dir):
    from zoomfeat.model import load_zoomldm

    with pytest.raises(ConfigError, match="config.yaml"):
        load_zoomldm(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_zoomldm(tiny_dir / "config.yaml", tmp_path / "nope.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_zoomldm(tiny_dir / "config.yaml", garbage)


def test_weights_none_gives_random_init(tiny_dir):
    from zoomfeat.model import load_zoomldm

    m = load_zoomldm(tiny_dir / "config.yaml", None, use_ema=False)
    assert float(m.model.diffusion_model.out[2].weight.detach().abs().sum()) == 0.0  # official zero init
    assert int(m.model_ema.num_updates) == 0 and float(m.model_ema.decay) == pytest.approx(0.9999)


@pytest.mark.slow
def test_update_ema_follows_litema(tiny_dir):
    from zoomfeat.model import load_zoomldm

    m = load_zoomldm(tiny_dir, use_ema=False)
    raw = m.model.diffusion_model.time_embed[0].weight.detach().clone()
    before = m.model_ema.diffusion_modeltime_embed0weight.clone()
    n = int(m.model_ema.num_updates) + 1
    used = m.update_ema(0.999)
    assert used == pytest.approx(min(0.999, (1 + n) / (10 + n)))
    assert int(m.model_ema.num_updates) == n
    expected = before - (1 - used) * (before - raw)
    torch.testing.assert_close(m.model_ema.diffusion_modeltime_embed0weight, expected)
    with m.ema_swap():
        torch.testing.assert_close(m.model.diffusion_model.time_embed[0].weight.detach(), expected)
        with pytest.raises(ConfigError, match="use_ema=False"):
            m.update_ema()
    assert torch.equal(m.model.diffusion_model.time_embed[0].weight.detach(), raw)


@pytest.mark.slow
def test_unet_features_never_runs_later_blocks(tiny_dir):
    from zoomfeat.model import load_zoomldm

    m = load_zoomldm(tiny_dir)
    unet = m.model.diffusion_model
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([5, 900]), torch.randn(2, 65, 64)
    fired, captured = [], {}
    later = unet.output_blocks[4].register_forward_hook(lambda *a: fired.append(1))
    out_hook = unet.out.register_forward_hook(lambda *a: fired.append(2))
    with torch.no_grad():
        feats = m.unet_features(x, t, ctx, block=3)
    later.remove()
    out_hook.remove()
    assert fired == []
    keep = unet.output_blocks[3].register_forward_hook(lambda mod, inp, out: captured.setdefault("b3", out))
    with torch.no_grad():
        m.unet(x, t, ctx)
    keep.remove()
    torch.testing.assert_close(feats, captured["b3"], rtol=1e-5, atol=1e-6)
    assert feats.shape == (2, m.feature_dim(3), 4, 4)
    with pytest.raises(ConfigError, match="out of range"):
        m.unet_features(x, t, ctx, block=12)


# -- load_torch_file: the one reader of torch files ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "text", "cut", "pickled"])
def test_load_torch_file_is_one_line_for_every_kind_of_bad_file(tmp_path, kind):
    """Each bad file is one line naming it and the fix; a pickle with code objects is refused, never run."""
    from zoomfeat.errors import DataError
    from zoomfeat.torch_files import load_torch_file

    path = tmp_path / "w.pt"
    whole = tmp_path / "whole.pt"
    torch.save({"a": torch.arange(1000.0)}, whole)
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not weights\n")
    elif kind == "cut":
        path.write_bytes(whole.read_bytes()[:2000])  # a download cut short
    elif kind == "pickled":
        torch.save({"a": torch.zeros(2), "args": argparse.Namespace(lr=1.0)}, path)
    expect = {"missing": "not found: FIX", "folder": "is a folder", "empty": "it is empty",
              "text": "it is text", "cut": "cannot read feature file", "pickled": "weights-only load refuses"}[kind]
    with pytest.raises(DataError) as err:
        load_torch_file(path, "feature file", fix="FIX", error=DataError)
    message = str(err.value)
    assert expect in message and str(path) in message and "\n" not in message
    assert torch.equal(load_torch_file(whole, "feature file")["a"], torch.arange(1000.0))
    if kind == "pickled":  # the classes a caller allows (the official CDM's args) are rebuilt, nothing else
        assert load_torch_file(path, allowed=[argparse.Namespace])["args"].lr == 1.0


def test_a_hub_cache_file_is_never_unpickled(tmp_path):
    from zoomfeat.torch_files import load_torch_file

    snapshot = tmp_path / "models--org--m" / "snapshots" / ("3" * 40)
    snapshot.mkdir(parents=True)
    torch.save({"a": torch.zeros(2)}, snapshot / "w.ckpt")
    with pytest.raises(CheckpointError, match="comes from the hub cache: it is loaded weights-only"):
        load_torch_file(snapshot / "w.ckpt", unsafe=True)
    assert torch.equal(load_torch_file(snapshot / "w.ckpt")["a"], torch.zeros(2))


def test_one_config_yaml_rule_for_every_caller(tmp_path, tiny_dir):
    """The one "config.yaml or its folder" rule: the forms it takes and its one-line error; the model and the
    training config read their config through it."""
    from zoomfeat.model import load_zoomldm
    from zoomfeat.resolve import tiny_config_path, zoomldm_config_path
    from zoomfeat.train.config import load_train_config

    assert zoomldm_config_path(tiny_dir) == tiny_dir / "config.yaml"
    assert zoomldm_config_path(tiny_dir / "config.yaml") == tiny_dir / "config.yaml"
    assert zoomldm_config_path("tiny") == tiny_config_path()
    message = f"ZoomLDM config {tmp_path / 'config.yaml'} not found"
    for reader in (zoomldm_config_path, load_zoomldm, lambda p: load_train_config({"model.zoomldm": p})):
        with pytest.raises(ConfigError, match=message):
            reader(tmp_path)
