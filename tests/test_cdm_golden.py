"""The CDM against the official cdm_dit outputs (../shared/golden/generation/cdm, README "cdm/" and "Tolerances").

Tolerances are the README's, as max|a - b| / max|b| per array: single network passes (DiT forward, losses,
p_mean_variance) 1e-4, the multi-step DDIM sample and its per-step samples 1e-3; schedules to float64 round-off.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from tests.conftest import require_shared
from zoomfeat.cdm.diffusion import create_diffusion
from zoomfeat.cdm.dit import DiT, DiTConfig, infer_config, load_dit, read_dit_state
from zoomfeat.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def golden():
    root = require_shared("golden", "generation", "cdm")
    kw = json.loads((root / "config.json").read_text())["dit_kwargs"]
    cfg = DiTConfig(in_channels=kw["in_channels"], num_tokens=kw["num_patches"], hidden_size=kw["hidden_size"],
                    depth=kw["depth"], num_heads=kw["num_heads"], mlp_ratio=kw["mlp_ratio"],
                    num_classes=kw["num_classes"], class_dropout_prob=kw["class_dropout_prob"],
                    learn_sigma=kw["learn_sigma"])
    arrays = dict(np.load(root / "cdm.npz"))
    return root, cfg, load_dit(cfg, root / "dit_weights.pt"), {k: torch.from_numpy(v) for k, v in arrays.items()}


def test_official_keys_load_strictly_and_a_wrong_layout_is_one_line(golden, tmp_path):
    root, cfg, dit, _ = golden
    keys = json.loads((root / "dit_keys.json").read_text())
    own = dit.state_dict()
    assert sorted(own) == sorted(keys)
    assert all(list(own[k].shape) == shape for k, shape in keys.items())
    state = read_dit_state(root / "dit_weights.pt")
    broken = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="1 missing: blocks.1.mlp.fc2.bias"):
        load_dit(cfg, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="not an official DiT size"):
        infer_config(state)  # hidden 64 is no official size: heads cannot be guessed


def test_the_official_training_checkpoint_loads_its_ema(golden, tmp_path):
    """train_cdm.py saves {"model", "ema", "opt", "args" (an argparse.Namespace)}; the FID script loads ["ema"]."""
    root, cfg, dit, g = golden
    ema = read_dit_state(root / "dit_weights.pt")
    raw = {k: v + 1.0 for k, v in ema.items()}
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-B", global_batch_size=256)}, tmp_path / "0050000.pt")
    loaded = load_dit(None, tmp_path / "0050000.pt", num_heads=cfg.num_heads)
    assert loaded.cfg == cfg
    with torch.no_grad():
        out = loaded(g["dit_x"], g["dit_t"], g["dit_y"])
    assert rel(out, g["dit_out"]) < 1e-4


def test_dit_forward_and_position_table(golden):
    _, _, dit, g = golden
    with torch.no_grad():
        out = dit(g["dit_x"], g["dit_t"], g["dit_y"])
    assert out.shape == (3, 128, 65)
    assert rel(out, g["dit_out"]) < 1e-4
    assert rel(dit.pos_embed, g["dit_pos_embed"]) < 1e-6
    fresh = DiT(golden[1])  # the fixed table is built, not loaded
    assert rel(fresh.pos_embed, g["dit_pos_embed"]) < 1e-6


def test_cosine_schedule_and_q_sample(golden):
    g = golden[3]
    d = create_diffusion()
    assert d.num_timesteps == 1000
    np.testing.assert_allclose(d.tables["betas"].numpy(), g["sched_betas"].numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(d.tables["alphas_cumprod"].numpy(), g["sched_alphas_cumprod"].numpy(), rtol=1e-12)
    x_t = d.q_sample(g["loss_x_start"], g["loss_t"], g["loss_noise"])
    assert rel(x_t, g["loss_x_t"]) < 1e-6


def test_training_loss_terms(golden):
    _, _, dit, g = golden
    d = create_diffusion()
    with torch.no_grad():
        terms = d.training_losses(lambda x, t: dit(x, t, g["loss_y"]), g["loss_x_start"], g["loss_t"],
                                  g["loss_noise"])
    for name in ("mse", "vb", "loss"):
        assert rel(terms[name], g[f"loss_{name}"]) < 1e-4, name
    # t = 0 (decoder NLL), 1 and 500 are each within 1e-4 of their own value, not only of the array's maximum
    np.testing.assert_allclose(terms["vb"][:3].numpy(), g["loss_vb"][:3].numpy(), rtol=1e-4)


def test_p_mean_variance(golden):
    _, _, dit, g = golden
    d = create_diffusion()
    with torch.no_grad():
        p = d.p_mean_variance(dit(g["loss_x_t"], g["loss_t"], g["loss_y"]), g["loss_x_t"], g["loss_t"])
    for name in ("mean", "variance", "log_variance", "pred_xstart"):
        assert rel(getattr(p, name), g[f"pmv_{name}"]) < 1e-4, name


def test_respaced_schedule(golden):
    g = golden[3]
    d10 = create_diffusion("10")
    assert d10.timestep_map.tolist() == g["ddim_timestep_map"].tolist() == [round(k * 999 / 9) for k in range(10)]
    np.testing.assert_allclose(d10.tables["betas"].numpy(), g["ddim_betas"].numpy(), rtol=1e-12)
    np.testing.assert_allclose(d10.tables["alphas_cumprod"].numpy(), g["ddim_alphas_cumprod"].numpy(), rtol=1e-12)
    full = g["sched_alphas_cumprod"].numpy()
    d200 = create_diffusion("200")  # the official evaluation's spacing keeps both ends and abar at its steps
    kept = d200.timestep_map.numpy()
    assert len(kept) == 200 and kept[0] == 0 and kept[-1] == 999 and (np.diff(kept) > 0).all()
    np.testing.assert_allclose(d200.tables["alphas_cumprod"].numpy(), full[kept], rtol=1e-12)


def test_respaced_ddim_sample_and_every_step(golden):
    _, _, dit, g = golden
    d10 = create_diffusion("10")
    steps = list(d10.ddim_steps(lambda x, t: dit(x, t, g["ddim_y"]), g["ddim_noise"]))
    assert len(steps) == 10
    for k, (ours, ref) in enumerate(zip(steps, g["ddim_step_samples"])):
        assert rel(ours, ref) < 1e-3, k
    assert rel(steps[-1], g["ddim_sample"]) < 1e-3
