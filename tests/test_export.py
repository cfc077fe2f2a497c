"""``zoomfeat export``: CLAM (h5_files + pt_files) and TRIDENT (features_<encoder>) layouts for one magnification."""

from __future__ import annotations

import numpy as np
import pytest

import h5py
import torch

import cli


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """A toy-encoder feature folder (two magnifications)."""
    from zoomfeat.synthetic import write_synthetic_slide

    root = tmp_path_factory.mktemp("export")
    slide = write_synthetic_slide(root / "case1.svs", size=2048, seed=4)
    out = root / "toy"
    assert cli.main(["extract", str(slide.path), "--out", str(out), "--encoder", "toy", "--mags", "20x,5x",
                     "--device", "cpu", "--workers", "1"]) == 0
    return out


def _with(features, tmp_path, name, damage):
    """A copy of the feature folder plus ``name``.h5, a copy of case1 damaged by ``damage(h5 file)``."""
    import shutil

    folder = tmp_path / "src"
    shutil.copytree(features, folder)
    shutil.copy2(folder / "case1.h5", folder / f"{name}.h5")
    with h5py.File(folder / f"{name}.h5", "a") as f:
        damage(f)
    return folder


def _source(features, mag):
    with h5py.File(features / "case1.h5", "r") as f:
        return f[mag]["features"][:], f[mag]["coords"][:]


@pytest.mark.slow
def test_clam_layout(features, tmp_path, capsys):
    assert cli.main(["export", str(features), "--format", "clam", "--mag", "5x", "--out", str(tmp_path)]) == 0
    feats, coords = _source(features, "5x")
    with h5py.File(tmp_path / "h5_files" / "case1.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][:], feats)
        np.testing.assert_array_equal(f["coords"][:], coords)
        assert f["coords"].attrs["patch_size_level0"] == 1024
    np.testing.assert_array_equal(torch.load(tmp_path / "pt_files" / "case1.pt").numpy(), feats)
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []  # no temporary file left


def test_a_skipped_file_is_an_error_and_the_others_are_exported(features, tmp_path, capsys):
    src = _with(features, tmp_path, "half", lambda f: f.attrs.__delitem__("complete"))  # interrupted elsewhere
    out = tmp_path / "out"
    assert cli.main(["export", str(src), "--format", "clam", "--mag", "5x", "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("error:")] == [
        f"error: {src / 'half.h5'}: incomplete feature file (no 'complete' attribute); rerun the extraction"]
    assert (out / "h5_files" / "case1.h5").is_file() and not (out / "h5_files" / "half.h5").exists()


def test_non_finite_rows_are_not_exported(features, tmp_path, capsys):
    def poison(f):
        f["5x"]["features"][0, 0] = np.inf

    src = _with(features, tmp_path, "inf", poison)
    out = tmp_path / "out"
    assert cli.main(["export", str(src), "--format", "trident", "--mag", "5x", "--out", str(out)]) == 1
    assert "5x/features: 1 rows contain NaN or inf" in capsys.readouterr().err
    assert not (out / "features_toy" / "inf.h5").exists() and (out / "features_toy" / "case1.h5").is_file()
    with h5py.File(out / "features_toy" / "case1.h5", "r") as f:
        assert np.isfinite(f["features"][:]).all()


def test_an_out_folder_holding_another_export_is_refused(features, tmp_path, capsys):
    assert cli.main(["export", str(features), "--format", "clam", "--mag", "5x", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "h5_files" / "case1.h5").read_bytes()
    assert cli.main(["export", str(features), "--format", "clam", "--mag", "20x", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds outputs made with other settings (mag 5x -> 20x)" in err and "--out" in err
    assert (tmp_path / "h5_files" / "case1.h5").read_bytes() == before


def test_trident_layout(features, tmp_path):
    assert cli.main(["export", str(features), "--format", "trident", "--mag", "20x", "--out", str(tmp_path)]) == 0
    feats, coords = _source(features, "20x")
    with h5py.File(tmp_path / "features_toy" / "case1.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][:], feats)
        np.testing.assert_array_equal(f["coords"][:], coords)
        assert f["coords"].attrs["target_magnification"] == 20.0
        assert f["coords"].attrs["level0_magnification"] == 20.0


def test_missing_magnification_is_named(features, tmp_path, capsys):
    assert cli.main(["export", str(features), "--format", "clam", "--mag", "10x", "--out", str(tmp_path)]) == 1
    assert "case1.h5 has no 10x features: export one of 20x, 5x" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["stamp", "slide2vec", "eva", "trident", "clam"])
def test_every_layout_round_trips_through_its_reader(features, tmp_path, fmt):
    from zoomfeat.store.layouts import read_foreign

    out = tmp_path / fmt
    assert cli.main(["export", str(features), "--format", fmt, "--mag", "5x", "--out", str(out)]) == 0
    feats, coords = _source(features, "5x")
    with h5py.File(features / "case1.h5", "r") as f:
        mpp = float(f.attrs["base_mpp"])
    got = read_foreign(fmt, out, "case1", mpp=mpp)
    np.testing.assert_array_equal(got.features, feats)
    if fmt != "eva":
        np.testing.assert_array_equal(got.coords_level0, coords)
