"""Baseline extraction (``--encoder toy``): the encoder applied to each 256-px patch, same layout and tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest

import torch  # noqa: E402  (a required dependency: imported, never skipped)
import h5py  # noqa: E402

import cli  # noqa: E402


def test_toy_baseline_rows_equal_the_encoder_on_read_patch(tmp_path):
    from zoomfeat.encoders import load_encoder
    from zoomfeat.slides import Slide
    from zoomfeat.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.svs", size=2048, seed=5)
    out = tmp_path / "toy"
    argv = ["extract", str(slide.path), "--out", str(out), "--encoder", "toy", "--mags", "20x,5x",
            "--device", "cpu", "--workers", "0", "--batch-size", "9"]
    assert cli.main(argv) == 0
    encoder = load_encoder("toy", seed=0)
    with h5py.File(out / "s.h5", "r") as f:
        assert f.attrs["extractor"] == "toy"
        assert json.loads(f.attrs["extractor_config"])["dim"] == encoder.spec.dim
        parents = f["20x"]["parent_5x"][:]
        assert parents.min() >= 0 and parents.max() < len(f["5x"]["coords"])
        with Slide(slide.path) as s, torch.inference_mode():
            for name, mag in (("20x", 20.0), ("5x", 5.0)):
                coords, feats = f[name]["coords"][:], f[name]["features"][:]
                assert feats.shape == (len(coords), encoder.spec.dim)
                for row in (0, len(coords) - 1):
                    pixels = torch.tensor(s.read_patch(*coords[row], mag)).permute(2, 0, 1)[None]
                    expected = encoder(encoder.preprocess(pixels))[0].numpy()
                    np.testing.assert_allclose(feats[row], expected, rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "uni").exists()  # baselines write no conditioning folder


def test_a_complete_file_from_other_settings_is_neither_skipped_nor_overwritten(tmp_path, capsys):
    """A 32-d toy file in --out is not "done" for a 64-d toy run: the slide fails naming what differs."""
    from zoomfeat.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.svs", size=1024, seed=2)
    base = ["extract", str(slide.path), "--encoder", "toy", "--mags", "20x", "--device", "cpu", "--workers", "0"]
    assert cli.main([*base, "--out", str(tmp_path / "a"), "--toy-seed", "1"]) == 0
    before = (tmp_path / "a" / "s.h5").read_bytes()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "s.h5").write_bytes(before)  # the same file, in a folder with no saved run config
    assert cli.main([*base, "--out", str(tmp_path / "b"), "--toy-seed", "1"]) == 0  # same settings: skipped
    assert "skipped 1" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(tmp_path / "b"), "--toy-seed", "2"]) == 2  # the folder's run config says no
    from zoomfeat.extract.config import CONFIG_NAME

    (tmp_path / "b" / CONFIG_NAME).unlink()  # without it (a copied file), the file's own provenance decides
    assert cli.main([*base, "--out", str(tmp_path / "b"), "--toy-seed", "2"]) == 1
    errors = (tmp_path / "b" / "errors.csv").read_text()
    assert "other settings" in errors and "seed" in errors
    assert (tmp_path / "b" / "s.h5").read_bytes() == before
