"""Other tools' feature layouts: files written here by independent writers (h5py/torch/numpy directly, as those
tools lay them out) are read back with the right features and level-0 coordinates; zoomfeat's writers produce
files that an independent reader in the test understands."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch

from zoomfeat.errors import ConfigError, DataError
from zoomfeat.store.layouts import LAYOUTS, containment_parents, detect_layout, lattice_spacing, read_foreign

RNG = np.random.default_rng(0)
FEATS = RNG.normal(size=(6, 5)).astype(np.float32)
COORDS = np.array([[0, 0], [512, 0], [1024, 0], [0, 512], [512, 512], [1024, 1024]], dtype=np.int64)


def _clam(root):
    (root / "h5_files").mkdir(parents=True)
    (root / "pt_files").mkdir()
    with h5py.File(root / "h5_files" / "s1.h5", "w") as f:
        f["features"] = FEATS
        c = f.create_dataset("coords", data=COORDS)
        c.attrs["patch_size"] = 256
        c.attrs["patch_level"] = 1
        c.attrs["downsample"] = np.array([2.0, 2.0])
    torch.save(torch.from_numpy(FEATS), root / "pt_files" / "s1.pt")


def _trident(root):
    d = root / "features_uni_v1"
    d.mkdir(parents=True)
    with h5py.File(d / "s1.h5", "w") as f:
        f["features"] = FEATS
        c = f.create_dataset("coords", data=COORDS)
        c.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                        "target_magnification": 20, "overlap": 0, "name": "s1"})


def _stamp(root):
    root.mkdir(parents=True)
    with h5py.File(root / "s1.h5", "w") as f:
        f["feats"] = FEATS
        f["coords"] = COORDS.astype(np.float64) * 0.25  # micrometres at 0.25 um/px
        f.attrs.update({"unit": "um", "tile_size_um": 128.0, "tile_size_px": 256, "extractor": "uni"})


def _slide2vec(root):
    (root / "tile_embeddings").mkdir(parents=True)
    (root / "coordinates").mkdir()
    torch.save(torch.from_numpy(FEATS), root / "tile_embeddings" / "s1.pt")
    (root / "tile_embeddings" / "s1.meta.json").write_text(json.dumps({"sample_id": "s1", "feature_dim": 5}))
    table = np.zeros(6, dtype=[("x", "<i8"), ("y", "<i8"), ("tile_size_lv0", "<i8")])
    table["x"], table["y"], table["tile_size_lv0"] = COORDS[:, 0], COORDS[:, 1], 512
    np.save(root / "coordinates" / "s1.npy", table)


def _eva(root):
    (root / "embeddings").mkdir(parents=True)
    torch.save(torch.from_numpy(FEATS), root / "embeddings" / "s1.pt")
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["origin", "embeddings", "target", "split"])
        w.writerow(["slides/s1.svs", "embeddings/s1.pt", "1", "train"])


WRITERS = {"clam": _clam, "trident": _trident, "stamp": _stamp, "slide2vec": _slide2vec, "eva": _eva}
HAS_COORDS = {"clam": True, "trident": True, "stamp": True, "slide2vec": True, "eva": False}


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_independently_written_layout_is_detected_and_read(layout, tmp_path):
    root = tmp_path / layout
    WRITERS[layout](root)
    assert detect_layout(root) == layout
    got = read_foreign(layout, root, "s1", mpp=0.25)
    np.testing.assert_array_equal(got.features, FEATS)
    if HAS_COORDS[layout]:
        np.testing.assert_array_equal(got.coords_level0, COORDS)
        assert got.patch_size_level0 == 512
    else:
        assert got.coords_level0 is None and "no tile coordinates" in got.coords_note


def test_every_registered_layout_has_an_independent_writer_here():
    assert set(LAYOUTS) == set(WRITERS)


def test_stamp_micrometres_need_an_mpp(tmp_path):
    _stamp(tmp_path / "st")
    got = read_foreign("stamp", tmp_path / "st", "s1")
    assert got.coords_level0 is None and "micrometres" in got.coords_note
    assert got.magnification == pytest.approx(20.0 * 0.5 / (128.0 / 256))


def test_clam_pt_only_has_no_coordinates(tmp_path):
    _clam(tmp_path / "c")
    (tmp_path / "c" / "h5_files" / "s1.h5").unlink()
    got = read_foreign("clam", tmp_path / "c", "s1")
    np.testing.assert_array_equal(got.features, FEATS)
    assert got.coords_level0 is None


@pytest.mark.parametrize("layout", ["clam", "trident", "stamp", "slide2vec", "eva"])
def test_zoomfeat_writers_round_trip_through_an_independent_reader(layout, tmp_path):
    root = tmp_path / layout
    LAYOUTS[layout].write(root, "s2", FEATS, COORDS, patch_size_level0=512, magnification=20.0,
                          base_magnification=40.0, mpp=0.25, encoder="zoomldm")
    if layout == "clam":
        with h5py.File(root / "h5_files" / "s2.h5") as f:
            np.testing.assert_array_equal(f["features"][()], FEATS)
            np.testing.assert_array_equal(f["coords"][()], COORDS)
            assert f["coords"].attrs["patch_size"] * f["coords"].attrs["downsample"][0] == 512
        np.testing.assert_array_equal(torch.load(root / "pt_files" / "s2.pt").numpy(), FEATS)
    elif layout == "trident":
        with h5py.File(root / "features_zoomldm" / "s2.h5") as f:
            np.testing.assert_array_equal(f["coords"][()], COORDS)
            assert f["coords"].attrs["patch_size_level0"] == 512 and f["coords"].attrs["patch_size"] == 256
            assert f["coords"].attrs["target_magnification"] == 20.0
    elif layout == "stamp":
        with h5py.File(root / "s2.h5") as f:
            np.testing.assert_allclose(f["coords"][()], COORDS * 0.25)
            assert f.attrs["unit"] == "um" and f.attrs["tile_size_um"] == pytest.approx(128.0)
            np.testing.assert_array_equal(f["feats"][()], FEATS)
    elif layout == "slide2vec":
        table = np.load(root / "coordinates" / "s2.npy")
        np.testing.assert_array_equal(np.stack([table["x"], table["y"]], 1), COORDS)
        np.testing.assert_array_equal(torch.load(root / "tile_embeddings" / "s2.pt").numpy(), FEATS)
    else:
        with open(root / "manifest.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert rows == [{"origin": "s2", "embeddings": "embeddings/s2.pt", "target": "", "split": ""}]
    back = read_foreign(layout, root, "s2", mpp=0.25)
    np.testing.assert_array_equal(back.features, FEATS)


def test_several_trident_folders_must_be_named(tmp_path):
    _trident(tmp_path / "t")
    (tmp_path / "t" / "features_conch").mkdir()
    with pytest.raises(ConfigError, match="several TRIDENT feature folders"):
        read_foreign("trident", tmp_path / "t", "s1")
    assert read_foreign("trident", tmp_path / "t" / "features_uni_v1", "s1").features.shape == (6, 5)


def test_unknown_folder_and_missing_slide_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a known feature layout"):
        detect_layout(tmp_path / "empty")
    _trident(tmp_path / "t")
    with pytest.raises(DataError, match="no trident feature file for slide s9"):
        read_foreign("trident", tmp_path / "t", "s9")
    bad = tmp_path / "t" / "features_uni_v1" / "s3.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="unreadable HDF5"):
        read_foreign("trident", tmp_path / "t", "s3")


def test_containment_matches_brute_force():
    rng = np.random.default_rng(3)
    coarse = np.array([[x, y] for x in range(100, 100 + 4096, 1024) for y in range(100, 100 + 2048, 1024)])
    fine = np.array([[x, y] for x in range(100, 100 + 4096, 256) for y in range(100, 100 + 2048, 256)])
    fine = fine[rng.permutation(len(fine))]
    rows = containment_parents(fine, coarse, 1024)
    for (fx, fy), r in zip(fine, rows):
        cx, cy = coarse[r]
        assert cx <= fx < cx + 1024 and cy <= fy < cy + 1024
    with pytest.raises(DataError, match="lie in no coarse tile"):
        containment_parents(np.array([[100 + 4096, 100]]), coarse, 1024)


def test_lattice_spacing():
    assert lattice_spacing(COORDS) == 512
    assert lattice_spacing(np.array([[7, 7]])) is None


def test_export_formats_are_the_registered_layouts():
    from zoomfeat.extract.export import FORMATS

    assert sorted(FORMATS) == sorted(LAYOUTS)
