"""CDM DiT sizes, official-size inference from shapes, label dropout and the external condition (fast, no data)."""

from __future__ import annotations

import pytest
import torch

from zoomfeat.cdm.dit import DiT, DiTConfig, infer_config, preset
from zoomfeat.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size, depth, hidden, heads", [("DiT-S", 12, 384, 6), ("DiT-B", 12, 768, 12),
                                                        ("DiT-L", 24, 1024, 16), ("DiT-XL", 28, 1152, 16)])
def test_official_sizes_and_their_inference_from_shapes(size, depth, hidden, heads):
    cfg = preset(size)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.in_channels, cfg.num_tokens) == (depth, hidden, heads, 512, 65)
    with torch.device("meta"):
        state = DiT(cfg).state_dict()
    assert infer_config(state) == cfg  # heads from the official size table, the rest from the shapes
    assert sum(1 for k in state if k.endswith("adaLN_modulation.1.weight")) == depth + 1
    assert state["final_layer.linear.weight"].shape == (1024, hidden)  # 2 x 512: x0 and variance values


def test_dit_b_is_the_default_and_bad_sizes_are_config_errors():
    assert DiTConfig() == preset("DiT-B")
    with pytest.raises(ConfigError, match="not divisible"):
        DiTConfig(hidden_size=100, num_heads=12)
    with pytest.raises(ConfigError, match="unknown model.size"):
        preset("DiT-M")


def test_label_dropout_uses_the_null_row_and_a_fresh_model_predicts_zero():
    torch.manual_seed(0)
    dit = DiT(DiTConfig(in_channels=8, hidden_size=32, depth=1, num_heads=2, class_dropout_prob=0.1))
    assert dit.y_embedder.embedding_table.weight.shape == (9, 32)
    x, t, y = torch.randn(3, 8, 65), torch.tensor([0, 10, 999]), torch.tensor([0, 3, 7])
    assert torch.count_nonzero(dit(x, t, y)) == 0  # adaLN-Zero and a zero output layer at init
    for p in dit.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    drop = torch.tensor([True, False, True])
    dropped = dit(x, t, y, drop=drop)
    null = dit(x, t, torch.full((3,), 8))
    torch.testing.assert_close(dropped[drop], null[drop])
    torch.testing.assert_close(dropped[~drop], dit(x, t, y)[~drop])


def test_external_condition_starts_as_the_magnification_only_model_and_is_required():
    torch.manual_seed(1)
    cfg = DiTConfig(in_channels=8, hidden_size=32, depth=1, num_heads=2, cond_dim=3)
    dit = DiT(cfg)
    assert dit.state_dict()["cond_embedder.weight"].shape == (32, 35)
    y, t = torch.tensor([1, 2]), torch.tensor([5, 500])
    c0 = dit.condition(t, y, torch.zeros(2, 3))
    plain = dit.t_embedder(t) + dit.y_embedder(y)
    torch.testing.assert_close(c0, plain)  # identity on the magnification embedding at init
    torch.nn.init.normal_(dit.cond_embedder.weight, std=0.1)
    assert not torch.allclose(dit.condition(t, y, torch.eye(3)[:2]), dit.condition(t, y, torch.eye(3)[1:]))
    with pytest.raises(ConfigError, match=r"external conditioning vector \[B, 3\]"):
        dit.condition(t, y)
    with pytest.raises(ConfigError, match="without an external condition"):
        DiT(DiTConfig(in_channels=8, hidden_size=32, depth=1, num_heads=2)).condition(t, y, torch.zeros(2, 3))
