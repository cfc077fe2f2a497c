"""Encoder registry, toy encoder, preprocessing, weight-file errors and key mapping (no shared data)."""

from __future__ import annotations

import json

import pytest
import torch

from zoomfeat.encoders import ENCODERS, Encoder, EncoderSpec, encoder_class, encoder_names, load_encoder
from zoomfeat.encoders.ctranspath import convert_swin_054
from zoomfeat.encoders.phikon import hf_to_timm, parse_config
from zoomfeat.encoders.registry import freeze
from zoomfeat.errors import CheckpointError, ConfigError, DataError


def _tiles(batch: int = 2, size: int = 256, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def test_registry_holds_the_baselines_and_toy():
    assert encoder_names() == ["conch", "ctranspath", "dinov2", "phikon", "toy", "uni"]
    assert {n: ENCODERS[n].dim for n in encoder_names()} == {"conch": 512, "ctranspath": 768, "dinov2": 1024,
                                                             "phikon": 768, "toy": 64, "uni": 1024}
    for name, spec in ENCODERS.items():
        assert isinstance(spec, EncoderSpec) and spec.name == name and spec.magnification == 20.0
        assert issubclass(encoder_class(name), Encoder)
    assert ENCODERS["uni"].weight_files == ("pytorch_model.bin",)
    assert ENCODERS["ctranspath"].weight_files == ("ctranspath.pth",)
    assert set(ENCODERS["phikon"].weight_files) == {"model.safetensors", "pytorch_model.bin"}


@pytest.fixture(scope="module")
def every_encoder():
    """Each registered encoder with random weights built from its architecture (built once)."""
    return {name: freeze(encoder_class(name).build(ENCODERS[name], seed=0)) for name in encoder_names()}


@pytest.mark.parametrize("name", encoder_names())
@pytest.mark.slow
def test_every_encoder_maps_uint8_tiles_to_spec_dim(every_encoder, name):
    encoder = every_encoder[name]
    x = encoder.preprocess(_tiles())
    assert x.dtype == torch.float32 and x.shape == (2, 3, encoder.spec.input_size, encoder.spec.input_size)
    with torch.no_grad():
        out = encoder(x)
    assert out.shape == (2, encoder.spec.dim) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def test_preprocess_resizes_with_antialias_and_normalises():
    encoder = load_encoder("toy")
    flat = torch.full((1, 3, 256, 256), 128, dtype=torch.uint8)
    x = encoder.preprocess(flat)
    expected = (128 / 255 - torch.tensor(encoder.spec.mean)) / torch.tensor(encoder.spec.std)
    assert x.shape == (1, 3, 64, 64)
    torch.testing.assert_close(x[0, :, 10, 10], expected)
    # a 1-px checkerboard averages out under antialiasing (it would alias without it)
    checker = ((torch.arange(256)[:, None] + torch.arange(256)[None]) % 2 * 255).to(torch.uint8)
    x = encoder.preprocess(checker.expand(1, 3, 256, 256).contiguous())
    torch.testing.assert_close(x[0, :, 5:-5, 5:-5].std(dim=(1, 2)), torch.zeros(3), atol=1e-3, rtol=0)


@pytest.mark.parametrize("images", [torch.zeros(2, 3, 64, 64), torch.zeros(3, 64, 64, dtype=torch.uint8),
                                    torch.zeros(2, 4, 64, 64, dtype=torch.uint8)])
def test_preprocess_rejects_non_uint8_rgb_batches(images):
    with pytest.raises(DataError, match="uint8"):
        load_encoder("toy").preprocess(images)


def test_toy_is_deterministic_for_dim_and_seed():
    a, b = load_encoder("toy", dim=32, seed=3), load_encoder("toy", dim=32, seed=3)
    x = a.preprocess(_tiles())
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
        assert a(x).shape == (2, 32) and a.spec.dim == 32
        assert not torch.allclose(a(x), load_encoder("toy", dim=32, seed=4)(x))
        assert load_encoder("toy", dim=1)(x).shape == (2, 1)
    assert ENCODERS["toy"].dim == 64  # the registered spec is unchanged


def test_toy_weights_are_the_same_in_every_process():
    # values fixed when written: a generator-seeded init does not depend on the process or global RNG
    torch.manual_seed(12345)
    state = load_encoder("toy", dim=32, seed=0).state_dict()
    assert state["proj.weight"].shape == (32, 64)
    torch.testing.assert_close(state["features.0.weight"].reshape(-1)[:3],
                               torch.tensor([-0.3064, -0.3136, -0.0682]), rtol=0, atol=1e-4)
    torch.testing.assert_close(state["proj.weight"].abs().sum(), torch.tensor(290.236), rtol=0, atol=0.01)


@pytest.mark.parametrize("dim", [0, -3, 2.5, True])
def test_toy_rejects_bad_dims(dim):
    with pytest.raises(ConfigError, match="dim"):
        load_encoder("toy", dim=dim)


def test_load_encoder_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="unknown encoder 'vit'.*ctranspath, dinov2, phikon, toy, uni"):
        load_encoder("vit")
    with pytest.raises(ConfigError, match="needs a weight path"):
        load_encoder("uni")
    with pytest.raises(ConfigError, match="takes no weights"):
        load_encoder("toy", tmp_path)
    with pytest.raises(ConfigError, match="fixed dim of 1024"):
        load_encoder("uni", tmp_path, dim=32)


@pytest.mark.parametrize("name", ["uni", "phikon", "ctranspath", "dinov2", "conch"])
def test_missing_weight_file_names_path_and_expected_files(tmp_path, name):
    with pytest.raises(ConfigError, match=f"{tmp_path}.*{ENCODERS[name].weight_files[0]}"):
        load_encoder(name, tmp_path)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope.bin'} does not exist.*{ENCODERS[name].weight_files[0]}"):
        load_encoder(name, tmp_path / "nope.bin")


def test_wrong_keys_raise_checkpoint_error_listing_them(tmp_path):
    torch.save({"head.weight": torch.zeros(3), "cls_token": torch.zeros(1, 1, 1024)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        load_encoder("uni", tmp_path)
    message = str(info.value)
    assert "missing keys: blocks.0.attn.proj.bias" in message and "more)" in message
    assert "unexpected keys: head.weight" in message
    assert "shape mismatches" not in message and "\n" not in message


def test_a_file_that_is_not_a_state_dict_is_a_checkpoint_error(tmp_path):
    (tmp_path / "ctranspath.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read weight file"):
        load_encoder("ctranspath", tmp_path)
    torch.save({"model": [1, 2]}, tmp_path / "ctranspath.pth")
    with pytest.raises(CheckpointError, match="does not hold a state_dict"):
        load_encoder("ctranspath", tmp_path)


def test_phikon_needs_its_config_beside_the_weights(tmp_path):
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="config.json is missing"):
        load_encoder("phikon", tmp_path)


def test_phikon_config_parsing(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 768, "model_type": "vit"}))
    assert parse_config(path).layer_norm_eps == 1e-6  # absent -> 1e-6 (Phikon's current config)
    path.write_text(json.dumps({"layer_norm_eps": 1e-12, "num_hidden_layers": 2}))
    config = parse_config(path)
    assert (config.layer_norm_eps, config.num_hidden_layers) == (1e-12, 2)
    for bad in ({"hidden_act": "relu"}, {"qkv_bias": False}, {"num_attention_heads": 7}, {"hidden_size": "x"}):
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match="config.json"):
            parse_config(path)


def test_phikon_key_mapping():
    t = {n: torch.full((2,), float(i)) for i, n in enumerate(["query", "key", "value"])}
    hf = {f"vit.encoder.layer.3.attention.attention.{n}.weight": v for n, v in t.items()}
    hf.update({"vit.encoder.layer.3.output.dense.bias": torch.zeros(1), "pooler.dense.weight": torch.zeros(1),
               "encoder.layer.3.attention.output.dense.weight": torch.zeros(1),
               "embeddings.position_embeddings": torch.zeros(1), "layernorm.bias": torch.zeros(1),
               "encoder.layer.0.layernorm_before.weight": torch.zeros(1), "mystery": torch.zeros(1)})
    out = hf_to_timm(hf, "x")
    assert sorted(out) == ["blocks.0.norm1.weight", "blocks.3.attn.proj.weight", "blocks.3.attn.qkv.weight",
                           "blocks.3.mlp.fc2.bias", "mystery", "norm.bias", "pos_embed"]
    assert out["blocks.3.attn.qkv.weight"].tolist() == [0, 0, 1, 1, 2, 2]
    del hf["vit.encoder.layer.3.attention.attention.value.weight"]
    with pytest.raises(CheckpointError, match="layer.3.*value"):
        hf_to_timm(hf, "x")


def test_ctranspath_old_swin_layout_is_converted():
    old = {"layers.0.downsample.reduction.weight": 1, "layers.2.downsample.norm.bias": 2,
           "layers.0.blocks.1.attn_mask": 3, "layers.0.blocks.0.attn.relative_position_index": 4,
           "layers.1.blocks.0.attn.relative_position_bias_table": 5, "head.weight": 6, "norm.weight": 7}
    assert convert_swin_054(old) == {"layers.1.downsample.reduction.weight": 1, "layers.3.downsample.norm.bias": 2,
                                     "layers.1.blocks.0.attn.relative_position_bias_table": 5,
                                     "head.fc.weight": 6, "norm.weight": 7}
    new = {"layers.1.downsample.reduction.weight": 1, "layers.0.blocks.1.attn_mask": 3}
    assert convert_swin_054(new) == {"layers.1.downsample.reduction.weight": 1}


def test_specs_are_torch_free_and_match_the_registered_classes():
    import subprocess
    import sys

    code = ("import sys; from zoomfeat.encoders import encoder_names, SPECS; "
            "print(','.join(encoder_names()), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [",".join(sorted(ENCODERS)), "False"]
    from zoomfeat.encoders import SPECS

    assert {n: ENCODERS[n] for n in ENCODERS} == SPECS


def test_conch_image_embedding_follows_the_coca_vision_tower(tmp_path):
    """A small CONCH-layout tower (same module names, ViT 64-wide): the file's other keys (text tower, caption
    pooler, the contrastive projection) are ignored, and the embedding is ln_contrast of the one-query attention
    pool over ln_k(trunk tokens), computed here with torch's functional multi-head attention."""
    from zoomfeat.encoders.conch import ConchVision, image_tower_state

    torch.manual_seed(0)
    tower = ConchVision(width=64, depth=1, heads=2, image_size=32, patch_size=16, embed_dim=32, pool_heads=4)
    state = {f"visual.{k}": torch.randn_like(v) * 0.2 for k, v in tower.state_dict().items()}
    state.update({"text.token_embedding.weight": torch.zeros(3, 4), "visual.proj_contrast": torch.zeros(32, 32),
                  "visual.attn_pool_caption.query": torch.zeros(2, 32), "logit_scale": torch.zeros(())})
    loaded = ConchVision(width=64, depth=1, heads=2, image_size=32, patch_size=16, embed_dim=32, pool_heads=4)
    loaded.load_state_dict(image_tower_state(state), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = loaded(x)
        tokens = loaded.trunk.forward_features(x)
        s = lambda k: state[f"visual.attn_pool_contrast.{k}"]  # noqa: E731
        k = torch.nn.functional.layer_norm(tokens, (64,), s("ln_k.weight"), s("ln_k.bias"))
        q = torch.nn.functional.layer_norm(s("query"), (32,), s("ln_q.weight"), s("ln_q.bias"))
        pooled, _ = torch.nn.functional.multi_head_attention_forward(
            q[:, None].expand(-1, 2, -1), k.transpose(0, 1), k.transpose(0, 1), 32, 4, None, s("attn.in_proj_bias"),
            None, None, False, 0.0, s("attn.out_proj.weight"), s("attn.out_proj.bias"), training=False,
            need_weights=False, use_separate_proj_weight=True, q_proj_weight=s("attn.q_proj_weight"),
            k_proj_weight=s("attn.k_proj_weight"), v_proj_weight=s("attn.v_proj_weight"))
        want = torch.nn.functional.layer_norm(pooled[0], (32,), state["visual.ln_contrast.weight"],
                                              state["visual.ln_contrast.bias"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
