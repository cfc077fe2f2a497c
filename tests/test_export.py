"""``zoomfeat export``: CLAM (h5_files + pt_files) and TRIDENT (features_<encoder>) layouts for one magnification."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
h5py = pytest.importorskip("h5py")

import cli  # noqa: E402


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """A toy-encoder feature folder (two magnifications) plus an incomplete file that must be skipped."""
    from zoomfeat.synthetic import write_synthetic_slide

    root = tmp_path_factory.mktemp("export")
    slide = write_synthetic_slide(root / "case1.svs", size=2048, seed=4)
    out = root / "toy"
    assert cli.main(["extract", str(slide.path), "--out", str(out), "--encoder", "toy", "--mags", "20x,5x",
                     "--device", "cpu", "--workers", "1"]) == 0
    with h5py.File(out / "half.h5", "w") as f:
        f.attrs["format"] = "zoomfeat"  # no complete=True: an interrupted file
    return out


def _source(features, mag):
    with h5py.File(features / "case1.h5", "r") as f:
        return f[mag]["features"][:], f[mag]["coords"][:]


def test_clam_layout(features, tmp_path, capsys):
    assert cli.main(["export", str(features), "--format", "clam", "--mag", "5x", "--out", str(tmp_path)]) == 0
    assert "half.h5 is incomplete" in capsys.readouterr().err
    feats, coords = _source(features, "5x")
    with h5py.File(tmp_path / "h5_files" / "case1.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][:], feats)
        np.testing.assert_array_equal(f["coords"][:], coords)
        assert f["coords"].attrs["patch_size_level0"] == 1024
    np.testing.assert_array_equal(torch.load(tmp_path / "pt_files" / "case1.pt").numpy(), feats)
    assert not (tmp_path / "h5_files" / "half.h5").exists()


def test_trident_layout(features, tmp_path):
    assert cli.main(["export", str(features), "--format", "trident", "--mag", "20x", "--out", str(tmp_path)]) == 0
    feats, coords = _source(features, "20x")
    with h5py.File(tmp_path / "features_toy" / "case1.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][:], feats)
        np.testing.assert_array_equal(f["coords"][:], coords)
        assert f["coords"].attrs["target_magnification"] == 20.0
        assert f["coords"].attrs["level0_magnification"] == 20.0


def test_missing_magnification_is_named(features, tmp_path, capsys):
    assert cli.main(["export", str(features), "--format", "clam", "--mag", "10x", "--out", str(tmp_path)]) == 2
    assert "no 10x features" in capsys.readouterr().err
