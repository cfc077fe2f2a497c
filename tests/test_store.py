import h5py
import numpy as np
import pytest
from helpers_slides import synthetic_slide  # noqa: F401

from zoomfeat.errors import DataError
from zoomfeat.slides import Slide
from zoomfeat.store import (TileStoreWriter, h5_path, is_complete, read_attrs, read_features, read_grid,
                            temp_path, verify_dir, verify_file)
from zoomfeat.tiling import make_grid


@pytest.fixture(scope="module")
def slide_and_grid(synthetic_slide):
    info = synthetic_slide(size=2048, label=1)
    with Slide(info.path) as slide:
        return slide.info, make_grid(slide, [20.0, 5.0])


def write(path, info, grid, **kw):
    with TileStoreWriter(path, info, grid, **kw) as writer:
        if kw.get("feature_dim"):
            for name in grid.names:
                n = len(grid.coords[name])
                writer.write_features(name, 0, np.arange(n * kw["feature_dim"]).reshape(n, -1))
        return writer.commit()


def test_roundtrip_and_attrs(tmp_path, slide_and_grid):
    info, grid = slide_and_grid
    path = write(h5_path(tmp_path, info.slide_id), info, grid)
    attrs = read_attrs(path)
    assert attrs["format"] == "zoomfeat" and attrs["format_version"] == 1 and attrs["complete"] is True
    assert attrs["slide_id"] == info.slide_id and attrs["base_magnification"] == 20.0
    assert attrs["base_mpp"] == pytest.approx(0.5)
    back = read_grid(path)
    assert back.names == ("20x", "5x") and back.patch_size_level0 == {"20x": 256, "5x": 1024}
    assert np.array_equal(back.coords["20x"], grid.coords["20x"])
    assert np.array_equal(back.parents["20x"]["5x"], grid.parents["20x"]["5x"])
    with h5py.File(path) as f:
        assert "features" not in f["20x"] and f["20x"].attrs["patch_size"] == 256
    assert verify_file(path) == [] and is_complete(path, info.path)
    assert list(tmp_path.glob(".*")) == []


def test_features_stream_and_verify(tmp_path, slide_and_grid):
    info, grid = slide_and_grid
    path = write(tmp_path / "f.h5", info, grid, extractor="toy", extractor_config={"seed": 0}, feature_dim=3)
    feats = read_features(path, "5x")
    assert feats.dtype == np.float32 and feats.shape == (len(grid.coords["5x"]), 3)
    assert feats[1].tolist() == [3, 4, 5]
    assert verify_file(path) == []
    with h5py.File(path, "a") as f:
        f["20x"]["features"][0, 0] = np.nan
        f["20x"]["parent_5x"][0] = 99
    problems = verify_file(path)
    assert any("NaN" in p for p in problems) and any("out of range" in p for p in problems)
    with pytest.raises(DataError, match="no features"):
        read_features(tmp_path / "f.h5", "10x")


def test_geometrically_wrong_parent_is_reported(tmp_path, slide_and_grid):
    info, grid = slide_and_grid
    if len(grid.coords["5x"]) < 2:
        pytest.skip("needs two 5x tiles")
    path = write(tmp_path / "g.h5", info, grid)
    with h5py.File(path, "a") as f:
        parents = f["20x"]["parent_5x"]
        parents[0] = (parents[0] + 1) % len(f["5x"]["coords"])
    assert any("do not lie inside" in p for p in verify_file(path))


def test_unfinished_writes_are_not_complete(tmp_path, slide_and_grid):
    info, grid = slide_and_grid
    path = tmp_path / "s.h5"
    with pytest.raises(DataError, match="never written"):
        with TileStoreWriter(path, info, grid, feature_dim=2) as writer:
            writer.commit()
    assert not path.exists() and list(tmp_path.iterdir()) == []
    # a killed run: the temporary file stays behind, it is not complete, verify reports it
    writer = TileStoreWriter(path, info, grid)
    writer._file.flush()
    assert temp_path(path).exists() and not is_complete(path)
    assert any("interrupted" in p[0] for p in verify_dir(tmp_path).values())
    writer._file.close()
    write(path, info, grid)  # the next run cleans the leftover
    assert is_complete(path, info.path) and list(tmp_path.glob(".*")) == []


def test_incomplete_and_unreadable_files(tmp_path, slide_and_grid):
    info, grid = slide_and_grid
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    path = write(tmp_path / "ok.h5", info, grid)
    with h5py.File(path, "a") as f:
        del f.attrs["complete"]
    report = verify_dir(tmp_path)
    assert report[tmp_path / "junk.h5"][0].startswith("unreadable")
    assert any("incomplete" in p for p in report[path])
    assert not is_complete(path) and not is_complete(tmp_path / "junk.h5")
