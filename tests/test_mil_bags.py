"""Bags from real HDF5 feature files: spec parsing, multi-scale fusion, lazy cache, and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mil.bags import BagStore, FeatureSpec, MILDataWarning, load_bag, read_extractor, scan_bags
from mil_data import write_feature_file
from zoomfeat.errors import ConfigError, DataError


def test_feature_spec_parse():
    spec = FeatureSpec.parse("/data/feats@20x+5x")
    assert spec == FeatureSpec(Path("/data/feats"), ("20x", "5x"))
    assert str(spec) == "/data/feats@20x+5x"
    assert FeatureSpec.parse("f@10x+2_5x").mags == ("10x", "2.5x")
    with pytest.raises(ConfigError, match="finest first.*write /data/feats@20x\\+5x"):
        FeatureSpec.parse("/data/feats@5x+20x")  # coarser first: refused, not silently reordered
    assert FeatureSpec.parse("a@b/c@2_5x").mags == ("2.5x",)
    assert FeatureSpec.parse("a@b/c@2_5x").directory == Path("a@b/c")
    for bad in ("feats", "feats@", "@20x", "feats@20x+20x", "feats@7x"):
        with pytest.raises(ConfigError):
            FeatureSpec.parse(bad)


def test_fused_bag_concatenates_each_20x_instance_with_its_parent(tmp_path):
    f20 = np.arange(12, dtype=np.float32).reshape(4, 3)
    f5 = np.array([[100.0, 101.0], [200.0, 201.0]], dtype=np.float32)
    write_feature_file(tmp_path, "s1", f20, f5, parent_5x=np.array([1, 0, 1, 1]), dtype=np.float16)
    bag = load_bag(FeatureSpec.parse(f"{tmp_path}@20x+5x"), "s1")
    assert bag.features.dtype == torch.float32 and bag.features.shape == (4, 5)
    assert bag.features[0].tolist() == [0.0, 1.0, 2.0, 200.0, 201.0]
    assert bag.features[1].tolist() == [3.0, 4.0, 5.0, 100.0, 101.0]
    assert bag.coords_level0.dtype == np.int64 and bag.coords_level0.tolist()[1] == [256, 0]
    coarse = load_bag(FeatureSpec.parse(f"{tmp_path}@5x"), "s1")
    assert coarse.features.shape == (2, 2) and coarse.coords_level0.tolist()[1] == [1024, 0]
    assert read_extractor(FeatureSpec.parse(f"{tmp_path}@20x"), "s1") == ("toy", {"dim": 3})


def test_store_reads_lazily_and_caches(tmp_path):
    write_feature_file(tmp_path, "s1", np.ones((3, 4)))
    store = BagStore(FeatureSpec.parse(f"{tmp_path}@20x"), cache=True)
    assert store.get("s1") is store.get("s1")
    assert BagStore(store.spec, cache=False).get("s1") is not BagStore(store.spec, cache=False).get("s1")


def test_incomplete_file_is_refused(tmp_path):
    write_feature_file(tmp_path, "s1", np.ones((3, 4)), complete=False)
    spec = FeatureSpec.parse(f"{tmp_path}@20x")
    with pytest.raises(DataError, match="incomplete feature file"):
        load_bag(spec, "s1")
    with pytest.raises(DataError, match="incomplete"):
        scan_bags(spec, ["s1"])


def test_dimension_mismatch_names_both_files(tmp_path):
    write_feature_file(tmp_path, "a", np.ones((3, 4)))
    write_feature_file(tmp_path, "b", np.ones((3, 6)))
    with pytest.raises(DataError) as err:
        scan_bags(FeatureSpec.parse(f"{tmp_path}@20x"), ["a", "b"])
    message = str(err.value)
    assert "a.h5 has 4" in message and "b.h5 has 6" in message


def test_missing_and_empty_bags_are_reported_once_and_left_out(tmp_path):
    write_feature_file(tmp_path, "a", np.ones((3, 4)))
    write_feature_file(tmp_path, "e", np.ones((0, 4)))
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
    write_feature_file(tmp_path, "a", np.ones((3, 4)))
    with pytest.raises(DataError, match="no features at 5x"):
        load_bag(FeatureSpec.parse(f"{tmp_path}@20x+5x"), "a")


def test_missing_feature_folder_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"feature folder .*nowhere not found.*--features"):
        scan_bags(FeatureSpec.parse(f"{tmp_path / 'nowhere'}@20x"), ["a"])


def test_any_finer_coarser_pair_fuses_through_its_own_parent_link(tmp_path):
    """10x+2.5x: 10x rows pick their 2.5x parent through 10x/parent_2.5x, not through any 20x/5x link."""
    import h5py

    with h5py.File(tmp_path / "s.h5", "w") as fh:
        fh.attrs["complete"] = True
        g10 = fh.create_group("10x")
        g10.create_dataset("coords", data=np.array([[0, 0], [512, 0], [0, 512]], dtype=np.int64))
        g10.create_dataset("features", data=np.array([[1.0], [2.0], [3.0]], dtype=np.float32))
        g10.create_dataset("parent_2.5x", data=np.array([1, 1, 0], dtype=np.int64))
        g10.create_dataset("parent_5x", data=np.array([0, 0, 0], dtype=np.int64))  # a decoy link
        g25 = fh.create_group("2.5x")
        g25.create_dataset("coords", data=np.array([[0, 0], [2048, 0]], dtype=np.int64))
        g25.create_dataset("features", data=np.array([[10.0, 11.0], [20.0, 21.0]], dtype=np.float32))
    spec = FeatureSpec.parse(f"{tmp_path}@10x+2_5x")
    bag = load_bag(spec, "s")
    assert bag.features.tolist() == [[1.0, 20.0, 21.0], [2.0, 20.0, 21.0], [3.0, 10.0, 11.0]]
    assert bag.coords_level0.tolist() == [[0, 0], [512, 0], [0, 512]]
    assert scan_bags(spec, ["s"]).dim == 3
