"""ZoomLDM built from configs other than the released one: widths, depths, heads, resolutions, mag levels.

Each config is derived from the tiny golden config.yaml; the model must build from the values alone, run
every public method with the right shapes, and survive a save/load round trip strictly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from tests.conftest import require_shared
from zoomfeat.errors import CheckpointError, ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_tree():
    return yaml.safe_load(require_shared("golden", "zoomldm_tiny", "config.yaml").read_text())


def derive(tree, unet=None, first=None, dd=None, cond=None, top=None):
    out = copy.deepcopy(tree)
    p = out["model"]["params"]
    p.update(top or {})
    p["unet_config"]["params"].update(unet or {})
    p["first_stage_config"]["params"].update(first or {})
    p["first_stage_config"]["params"]["ddconfig"].update(dd or {})
    p["cond_stage_config"]["params"].update(cond or {})
    return out


VARIANTS = {
    "head_channels_depth2_two_levels": dict(
        unet=dict(model_channels=64, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2],
                  num_heads=-1, num_head_channels=16, transformer_depth=2, context_dim=32, in_channels=4,
                  out_channels=4, image_size=8),
        first=dict(embed_dim=4, n_embed=16),
        dd=dict(ch=32, ch_mult=[1, 2], resolution=16, z_channels=4, attn_resolutions=[16]),
        cond=dict(input_channels=16, hidden_channels=32, output_channels=32, vit_mlp_dim=64, num_layers=1,
                  num_heads=4, mag_levels=4),
        top=dict(image_size=8, channels=4, timesteps=200),
    ),
    "two_heads_scale_shift_per_level_blocks": dict(
        unet=dict(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=[1, 2, 1], attention_resolutions=[2],
                  num_heads=2, use_scale_shift_norm=True),
        cond=dict(mag_levels=3, num_layers=1),
    ),
}


def _heads(model):
    from zoomfeat.model.attention import SpatialTransformer

    return [(st.proj_in.out_channels, blk.attn1.heads, len(st.transformer_blocks))
            for st in model.modules() if isinstance(st, SpatialTransformer)
            for blk in st.transformer_blocks[:1]]


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.slow
def test_derived_config_builds_runs_and_round_trips(tiny_tree, tmp_path, name):
    from zoomfeat.model import build_zoomldm, load_zoomldm

    tree = derive(tiny_tree, **VARIANTS[name])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    torch.manual_seed(0)
    m = build_zoomldm(path).eval()
    cfg = m.config
    u = cfg.unet
    for width, heads, depth in _heads(m):
        assert heads == (width // u.num_head_channels if u.num_head_channels > 0 else u.num_heads)
        assert depth == u.transformer_depth
    res = m.first_stage_resolution
    side = cfg.diffusion.image_size
    levels = m.mag_levels
    with torch.no_grad():
        z = m.encode_first_stage(torch.rand(2, 3, res, res) * 2 - 1)
        assert z.shape == (2, u.in_channels, side, side)
        assert m.decode_first_stage(z).shape == (2, 3, res, res)
        grids = [m.preprocess_ssl(torch.randn(m.conditioning_dim, 1, 1)),
                 m.preprocess_ssl(torch.randn(m.conditioning_dim, 32, 32))]
        ctx = m.summarize(grids, torch.tensor([0, levels - 1]))
        assert ctx.shape == (2, 65, m.context_dim)
        with pytest.raises(DataError, match="magnification index"):
            m.summarize(grids, torch.tensor([0, levels]))
        t = torch.tensor([0, m.num_timesteps - 1])
        x_t = m.q_sample(z, t, torch.randn_like(z))
        assert m.unet(x_t, t, ctx).shape == z.shape
        for block in range(len(m.model.diffusion_model.output_blocks)):
            assert m.unet_features(x_t, t, ctx, block).shape[1] == m.feature_dim(block)
        for sampler in ("ddim", "plms"):
            assert m.sample(ctx, torch.randn_like(z), steps=2, sampler=sampler).shape == z.shape
    weights = m.save_official(tmp_path / "weights.ckpt")
    again = load_zoomldm(tmp_path, use_ema=False)
    assert again.official_state_dict().keys() == m.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))
    assert weights.exists()


def test_config_without_ema_has_no_ema_keys(tiny_tree, tmp_path):
    from zoomfeat.model import build_zoomldm, load_zoomldm

    tree = derive(tiny_tree, top=dict(use_ema=False))
    m = build_zoomldm(tree)
    assert not any(k.startswith("model_ema.") for k in m.state_dict())
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(CheckpointError, match="use_ema=False"):
        load_zoomldm(path, None, use_ema=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(unet=dict(use_spatial_transformer=False)), "use_spatial_transformer"),
        (dict(unet=dict(num_res_blocks=[1, 2])), "num_res_blocks"),
        (dict(unet=dict(num_heads=-1, num_head_channels=-1)), "num_head_channels"),
        (dict(unet=dict(context_dim=32)), "context_dim"),
        (dict(cond=dict(seq_length=60)), "seq_length"),
        (dict(dd=dict(double_z=True)), "double_z"),
    ],
)
def test_bad_configs_are_config_errors(tiny_tree, change, message):
    from zoomfeat.model import read_config

    with pytest.raises(ConfigError, match=message):
        read_config(derive(tiny_tree, **change))


def test_config_missing_section(tmp_path):
    from zoomfeat.model import read_config

    path = tmp_path / "config.yaml"
    path.write_text("model:\n  params:\n    timesteps: 10\n")
    with pytest.raises(ConfigError, match="unet_config"):
        read_config(path)
