"""DINOv2 ViT-L/14-reg4: Meta's official layout and timm's layout load to the same network."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import save_file

import zoomfeat.encoders.dinov2 as dinov2_module
from zoomfeat.encoders import ENCODERS, load_encoder
from zoomfeat.errors import CheckpointError

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 56}


@pytest.fixture
def tiny_architecture(monkeypatch):
    original = dinov2_module.dinov2_architecture
    monkeypatch.setattr(dinov2_module, "dinov2_architecture", functools.partial(original, **TINY))
    torch.manual_seed(0)
    reference = dinov2_module.dinov2_architecture().eval()
    for p in reference.parameters():  # timm's init leaves some tensors zero; make every entry matter
        p.data.add_(torch.randn_like(p) * 0.05)
    return reference


def _meta_layout(timm_state: dict) -> dict:
    """Meta's DINOv2 checkpoint layout, built from the facts of that layout: the position table holds a CLS
    slot first, the CLS token is stored without it, registers are ``register_tokens``, plus ``mask_token``."""
    state = dict(timm_state)
    pos_cls = torch.randn(1, 1, state["pos_embed"].shape[-1])
    state["pos_embed"] = torch.cat([pos_cls, state["pos_embed"]], dim=1)
    state["cls_token"] = state["cls_token"] - pos_cls
    state["register_tokens"] = state.pop("reg_token")
    state["mask_token"] = torch.zeros(1, state["pos_embed"].shape[-1])
    return state


def test_spec_is_registered():
    spec = ENCODERS["dinov2"]
    assert spec.dim == 1024 and spec.input_size == 224


@pytest.mark.parametrize("layout", ["timm", "meta"])
def test_both_layouts_load_to_the_same_network(tiny_architecture, tmp_path, layout):
    state = {k: v.clone() for k, v in tiny_architecture.state_dict().items()}
    if layout == "timm":
        path = tmp_path / "model.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "dinov2_vitl14_reg4_pretrain.pth"
        torch.save(_meta_layout(state), path)
    encoder = load_encoder("dinov2", tmp_path)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), tiny_architecture(x), rtol=1e-5, atol=1e-5)


def test_wrong_file_is_a_checkpoint_error(tiny_architecture, tmp_path):
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError):
        load_encoder("dinov2", tmp_path)
