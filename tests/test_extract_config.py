"""ExtractConfig validation: every bad value is a one-line ConfigError naming it and the fix, before any work."""

from __future__ import annotations

import pytest

from zoomfeat.errors import ConfigError
from zoomfeat.extract.config import ExtractConfig, parse_shard


@pytest.fixture
def zoomldm_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: {}\n")
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pooling": "median"}, "--pooling 'median'"),
        ({"noise": "random"}, "--noise"),
        ({"timestep": -1}, "--timestep -1"),
        ({"batch_size": 0}, "--batch-size 0"),
        ({"workers": -1}, "--workers"),
        ({"device": "tpu"}, "--device"),
        ({"precision": "int8"}, "--precision"),
        ({"shard": "3/3"}, "--shard '3/3'"),
        ({"base_mag": 40.0, "mpp": 0.25}, "not both"),
        ({"mpp": 5.0}, "--mpp 5.0"),
        ({"min_tissue": 1.5}, "--min-tissue"),
        ({"conditioner": "uni"}, "uni=PATH"),
        ({"mags": ()}, "--mags"),
    ],
)
def test_bad_values_are_named(tmp_path, zoomldm_yaml, changes, message):
    values = {"out_dir": tmp_path / "out", "zoomldm_config": zoomldm_yaml, "conditioner": "toy", **changes}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ExtractConfig(**values)


def test_baseline_needs_weights_except_toy(tmp_path):
    with pytest.raises(ConfigError, match="--weights"):
        ExtractConfig(out_dir=tmp_path, encoder="uni")
    assert ExtractConfig(out_dir=tmp_path, encoder="toy").mag_names == ("20x", "5x")


def test_shard_and_conditioning_out_default(tmp_path, zoomldm_yaml):
    assert parse_shard("1/4") == (1, 4)
    cfg = ExtractConfig(out_dir=tmp_path / "feats" / "zoomldm", zoomldm_config=zoomldm_yaml, conditioner="toy")
    assert cfg.conditioning_out_dir() == tmp_path / "feats" / "toy"
    assert cfg.writes_conditioning()


def test_cli_rejects_bad_conditioner_before_work(tmp_path, capsys):
    import cli

    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x")
    code = cli.main(["extract", str(slide), "--out", str(tmp_path / "o"), "--zoomldm", str(tmp_path),
                     "--weights", str(slide), "--conditioner", "uni"])
    assert code == 2
    assert "config.yaml" in capsys.readouterr().err  # the missing config is the first problem named
