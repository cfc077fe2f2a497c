"""ZoomLDM beyond pathology: the NAIP (satellite) model's config and a 4-level model on plain images.

The NAIP config is written here from the published format (ZoomLDM's ``configs/zoomldm_naip.yaml``: the BRCA
architecture with ``mag_levels: 4`` in the Summarizer and four scale levels at 1, 2, 4 and 8 m/px); nothing is
downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

import cli
from conftest import require_shared
from zoomfeat.mags import parse_mags


def _naip_config(brca: dict) -> dict:
    config = json.loads(json.dumps(brca))
    params = config["model"]["params"]["cond_stage_config"]["params"]
    params["mag_levels"] = 4  # the one architectural difference of the NAIP model
    config["data"] = {"target": "main.DataModuleFromConfig",
                      "params": {"batch_size": 400, "train": {"target": "ldm.data.naip.NAIPDataset",
                                                              "params": {"config": {"root": "", "normalize_ssl": True,
                                                                                    "feat_target_size": 8}}}}}
    return config


def test_scale_names_of_the_naip_ladder_parse_to_its_slots():
    assert [m.index for m in parse_mags("1m,2m,4m,8m")] == [0, 1, 2, 3]
    assert [m.grid_width for m in parse_mags("8m,1m")] == [1, 8]


def test_official_naip_config_builds_with_the_official_keys(tmp_path):
    from zoomfeat.model import build_zoomldm

    brca = yaml.safe_load(require_shared("golden", "zoomldm_brca_config.yaml").read_text())
    path = tmp_path / "zoomldm_naip.yaml"
    path.write_text(yaml.safe_dump(_naip_config(brca)))
    keys = json.loads(require_shared("golden", "zoomldm_brca_keys.json").read_text())
    expected = {k: list(v) for k, v in (keys.items() if isinstance(keys, dict) else keys)}
    model = build_zoomldm(path, device="meta")
    state = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(state) == set(expected)
    different = {k for k in state if state[k] != expected[k]}
    assert different == {k for k in state if "mag_embedding" in k or "mag_emb" in k}
    assert all(state[k][0] == 4 for k in different) and model.mag_levels == 4


@pytest.fixture(scope="module")
def four_level(tmp_path_factory):
    """A tiny 4-level ZoomLDM config and three plain 2048-px PNG 'satellite' images."""
    from zoomfeat.resolve import tiny_config_path

    root = tmp_path_factory.mktemp("naip")
    config = yaml.safe_load(tiny_config_path().read_text())
    config["model"]["params"]["cond_stage_config"]["params"]["mag_levels"] = 4
    (root / "tiny4.yaml").write_text(yaml.safe_dump(config))
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(3):
        base = rng.integers(60, 200, size=(64, 64, 3)).astype(np.uint8)  # fields of colour, upsampled
        img = np.asarray(Image.fromarray(base).resize((2048, 2048), Image.Resampling.BILINEAR))
        Image.fromarray(img).save(root / "images" / f"tile{i}.png")
    return root


@pytest.mark.slow
def test_four_level_model_trains_on_plain_images_and_extracts_features(four_level, monkeypatch):
    from zoomfeat.store import read_features, read_grid

    monkeypatch.chdir(four_level)
    common = ["--base-mag", "20"]  # level 0 is the finest (1 m/px) slot
    assert cli.main(["prepare-train", "images", "--out", "ts", "--conditioner", "toy", "--zoomldm", "tiny4.yaml",
                     "--mags", "1m,2m,4m,8m", "--max-patches-per-mag", "3", "--min-tissue", "0", *common]) == 0
    assert cli.main(["train", "--data", "ts", "--zoomldm", "tiny4.yaml", "--out", "run", "--max-steps", "3",
                     "--batch-size", "4", "--every-n-steps", "3", "--no-val-samples"]) == 0
    official = four_level / "run" / "official"
    assert cli.main(["extract", "images", "--out", "feats", "--encoder", "zoomldm", "--zoomldm",
                     str(official / "config.yaml"), "--weights", str(official / "last.ckpt"), "--conditioner", "toy",
                     "--mags", "1m,4m", "--min-tissue", "0", "--workers", "0", *common]) == 0
    for i in range(3):
        path = four_level / "feats" / f"tile{i}.h5"
        grid = read_grid(path)
        assert grid.names == ("20x", "5x")
        fine = read_features(path, "20x")
        assert fine.shape[0] == len(grid.coords["20x"]) == 64 and np.isfinite(fine).all()
        assert read_features(path, "5x").shape[0] == 4
