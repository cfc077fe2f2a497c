"""Bags from feature files written through the store: spec parsing, multi-scale fusion, lazy cache, bad files,
and the store-to-bags contract (a real slide's grid, fused rows checked against the tile geometry)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers_slides import synthetic_slide  # noqa: F401

from mil.bags import BagStore, FeatureSpec, MILDataWarning, load_bag, read_extractor, scan_bags
from zoomfeat.errors import ConfigError, DataError
from zoomfeat.mags import parse_mag
from zoomfeat.store import write_feature_file


def _file(folder, slide_id, f20, f5=None, coords=None, **kw):
    features = {"20x": np.asarray(f20, np.float32)}
    if f5 is not None:
        features["5x"] = np.asarray(f5, np.float32)
    return write_feature_file(folder, slide_id, features, coords, **kw)


def test_feature_spec_parse_is_canonical_and_torch_free():
    import subprocess
    import sys

    spec = FeatureSpec.parse("/data/feats@20x+5x")
    assert spec == FeatureSpec(Path("/data/feats"), (parse_mag("20x"), parse_mag("5x")))
    assert str(spec) == "/data/feats@20x+5x" and spec.names == ("20x", "5x")
    assert str(FeatureSpec.parse("f@10x+2_5x")) == "f@10x+2.5x"  # stored canonically
    assert FeatureSpec.parse("f@10x+2_5x").mags == (10.0, 2.5)
    with pytest.raises(ConfigError, match="finest first.*write /data/feats@20x\\+5x"):
        FeatureSpec.parse("/data/feats@5x+20x")  # coarser first: refused, not silently reordered
    assert FeatureSpec.parse("a@b/c@2_5x").names == ("2.5x",)
    assert FeatureSpec.parse("a@b/c@2_5x").directory == Path("a@b/c")
    for bad in ("feats", "feats@", "@20x", "feats@20x+20x", "feats@7x"):
        with pytest.raises(ConfigError):
            FeatureSpec.parse(bad)
    code = "import sys, zoomfeat.features; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_fused_bag_concatenates_each_20x_instance_with_its_parent(tmp_path):
    f20 = np.arange(12, dtype=np.float32).reshape(4, 3)
    f5 = np.array([[100.0, 101.0, 102.0], [200.0, 201.0, 202.0]], dtype=np.float32)
    # 20x tiles 0, 2, 3 lie in the 5x tile at x=1024, tile 1 in the one at x=0
    coords = {"20x": np.array([[1024, 0], [256, 0], [1280, 256], [2048 - 256, 768]]),
              "5x": np.array([[0, 0], [1024, 0]])}
    _file(tmp_path, "s1", f20, f5, coords)
    bag = load_bag(FeatureSpec.parse(f"{tmp_path}@20x+5x"), "s1")
    assert bag.features.dtype == torch.float32 and bag.features.shape == (4, 6)
    assert bag.features[0].tolist() == [0.0, 1.0, 2.0, 200.0, 201.0, 202.0]
    assert bag.features[1].tolist() == [3.0, 4.0, 5.0, 100.0, 101.0, 102.0]
    assert bag.coords_level0.dtype == np.int64 and bag.coords_level0.tolist()[1] == [256, 0]
    coarse = load_bag(FeatureSpec.parse(f"{tmp_path}@5x"), "s1")
    assert coarse.features.shape == (2, 3) and coarse.coords_level0.tolist()[1] == [1024, 0]
    assert read_extractor(FeatureSpec.parse(f"{tmp_path}@20x"), "s1") == ("toy", {"dim": 3})


@pytest.mark.slow
def test_store_to_bags_contract_on_a_real_slide(tmp_path, synthetic_slide):
    """Grid of a real pyramidal slide -> TileStoreWriter -> load_bag: every fused row is the 20x row followed
    by the row of the 5x tile whose square contains it (found here from the coordinates alone)."""
    from zoomfeat.slides import Slide
    from zoomfeat.store import TileStoreWriter, h5_path
    from zoomfeat.tiling import make_grid

    info = synthetic_slide(size=4096, label=1)
    with Slide(info.path) as slide:
        grid = make_grid(slide, ["20x", "5x"])
        rng = np.random.default_rng(0)
        feats = {n: rng.standard_normal((len(grid.coords[n]), 5)).astype(np.float32) for n in grid.names}
        with TileStoreWriter(h5_path(tmp_path, slide.info.slide_id), slide.info, grid, extractor="toy",
                             extractor_config={"seed": 0}, feature_dim=5) as writer:
            for n in grid.names:
                writer.write_features(n, 0, feats[n])
            writer.commit()
    spec = FeatureSpec.parse(f"{tmp_path}@20x+5x")
    assert scan_bags(spec, [info.path.stem]).dim == 10
    bag = load_bag(spec, info.path.stem)
    c20, c5 = grid.coords["20x"], grid.coords["5x"]
    assert len(c20) > 8 and len(c5) > 1
    for i, (x, y) in enumerate(c20):
        inside = np.flatnonzero((c5[:, 0] <= x) & (x < c5[:, 0] + 1024) & (c5[:, 1] <= y) & (y < c5[:, 1] + 1024))
        assert len(inside) == 1
        np.testing.assert_array_equal(bag.features[i].numpy(), np.concatenate([feats["20x"][i], feats["5x"][inside[0]]]))
    np.testing.assert_array_equal(bag.coords_level0, c20)


def test_store_reads_lazily_and_caches(tmp_path):
    _file(tmp_path, "s1", np.ones((3, 4)))
    store = BagStore(FeatureSpec.parse(f"{tmp_path}@20x"), cache=True)
    assert store.get("s1") is store.get("s1")
    assert BagStore(store.spec, cache=False).get("s1") is not BagStore(store.spec, cache=False).get("s1")


def test_incomplete_truncated_and_non_finite_files_are_refused(tmp_path):
    path = _file(tmp_path, "s1", np.ones((3, 4)))
    with h5py.File(path, "a") as f:  # what an interrupted writer of another tool leaves
        del f.attrs["complete"]
    spec = FeatureSpec.parse(f"{tmp_path}@20x")
    with pytest.raises(DataError, match="incomplete feature file"):
        load_bag(spec, "s1")
    with pytest.raises(DataError, match="incomplete"):
        scan_bags(spec, ["s1"])
    data = _file(tmp_path, "t", np.ones((3, 4))).read_bytes()
    (tmp_path / "t.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="unreadable HDF5 file"):
        load_bag(spec, "t")
    nan = _file(tmp_path, "n", np.ones((3, 4)))
    with h5py.File(nan, "a") as f:
        f["20x"]["features"][1, 2] = np.nan
    with pytest.raises(DataError, match="20x/features: 1 rows contain NaN or inf"):
        load_bag(spec, "n")


def test_dimension_mismatch_names_both_files(tmp_path):
    _file(tmp_path, "a", np.ones((3, 4)))
    _file(tmp_path, "b", np.ones((3, 6)))
    with pytest.raises(DataError) as err:
        scan_bags(FeatureSpec.parse(f"{tmp_path}@20x"), ["a", "b"])
    message = str(err.value)
    assert "a.h5 has 4" in message and "b.h5 has 6" in message


def test_missing_and_empty_bags_are_reported_once_and_left_out(tmp_path):
    _file(tmp_path, "a", np.ones((3, 4)))
    _file(tmp_path, "e", np.ones((0, 4)))
    spec = FeatureSpec.parse(f"{tmp_path}@20x")
    with pytest.warns(MILDataWarning) as record:
        scan = scan_bags(spec, ["a", "e", "m1", "m2"])
    messages = [str(w.message) for w in record]
    assert any(m.startswith("2 slide(s) have no feature file") for m in messages)
    assert any(m.startswith("1 slide(s) have an empty bag") for m in messages)
    assert scan.usable == ("a",) and scan.dim == 4 and scan.missing == ("m1", "m2") and scan.empty == ("e",)
    with pytest.raises(DataError, match="empty bag"):
        load_bag(spec, "e")
    with pytest.raises(DataError, match="feature file not found"):
        load_bag(spec, "m1")


def test_missing_coarse_group_or_parent_link(tmp_path):
    _file(tmp_path, "a", np.ones((3, 4)))
    with pytest.raises(DataError, match="no features at 5x"):
        load_bag(FeatureSpec.parse(f"{tmp_path}@20x+5x"), "a")


def test_missing_feature_folder_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"feature folder .*nowhere not found.*--features"):
        scan_bags(FeatureSpec.parse(f"{tmp_path / 'nowhere'}@20x"), ["a"])


def test_any_finer_coarser_pair_fuses_through_its_own_parent_link(tmp_path):
    """10x+2.5x (with 5x stored too): 10x rows pick their 2.5x parent through 10x/parent_2.5x."""
    coords = {"10x": np.array([[2048, 0], [2048 + 512, 0], [0, 512]]), "5x": np.array([[2048, 0], [0, 0]]),
              "2.5x": np.array([[0, 0], [2048, 0]])}
    write_feature_file(tmp_path, "s", {"10x": [[1.0, 0], [2.0, 0], [3.0, 0]], "5x": [[7.0, 7], [8.0, 8]],
                                       "2.5x": [[10.0, 11.0], [20.0, 21.0]]}, coords)
    spec = FeatureSpec.parse(f"{tmp_path}@10x+2_5x")
    bag = load_bag(spec, "s")
    assert bag.features.tolist() == [[1.0, 0, 20.0, 21.0], [2.0, 0, 20.0, 21.0], [3.0, 0, 10.0, 11.0]]
    assert bag.coords_level0.tolist() == [[2048, 0], [2560, 0], [0, 512]]
    assert scan_bags(spec, ["s"]).dim == 4
