import dataclasses

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
    info = dataclasses.replace(info, slide_id="f")  # a file is named after its slide (verify checks it)
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


# --- verify: the cases a reader would trip over ---------------------------------------------------------------
def test_verify_catches_a_missing_features_dataset_or_magnification_group(tmp_path, slide_and_grid):
    info, grid = slide_and_grid
    no_feats = write(tmp_path / "a.h5", info, grid, extractor="toy", feature_dim=3)
    with h5py.File(no_feats, "a") as f:
        del f["5x"]["features"]
    assert any("5x: no features dataset" in p for p in verify_file(no_feats))
    no_group = write(tmp_path / "b.h5", info, grid, extractor="toy", feature_dim=3)
    with h5py.File(no_group, "a") as f:
        del f["5x"]
        del f["20x"]["parent_5x"]
    assert any("magnification group 5x missing" in p for p in verify_file(no_group))


def test_verify_dir_reports_a_file_of_another_feature_width(tmp_path, slide_and_grid):
    info, grid = slide_and_grid
    for name, dim in (("a", 3), ("b", 3), ("c", 5)):
        write(tmp_path / f"{name}.h5", dataclasses.replace(info, slide_id=name), grid, extractor="toy",
              feature_dim=dim)
    report = verify_dir(tmp_path)
    assert report[tmp_path / "a.h5"] == [] and report[tmp_path / "b.h5"] == []
    assert report[tmp_path / "c.h5"] == ["feature width 5 differs from the folder's 3 (e.g. a.h5): a folder holds "
                                         "one feature set; extract it again with the same settings"]


def test_writer_refuses_non_finite_rows(tmp_path, slide_and_grid):
    info, grid = slide_and_grid
    with TileStoreWriter(tmp_path / "s.h5", info, grid, feature_dim=2) as writer:
        with pytest.raises(DataError, match="NaN or inf"):
            writer.write_features("20x", 0, np.full((2, 2), np.nan))
    assert list(tmp_path.iterdir()) == []


# --- plain files: atomic writes, settings, output folders --------------------------------------------------------
def test_atomic_write_leaves_nothing_on_error_and_turns_a_full_disk_into_one_line(tmp_path, monkeypatch):
    import errno
    import os

    from zoomfeat.store import OutputError, atomic_write

    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer crashed")
    assert list(tmp_path.iterdir()) == []
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=r"cannot write .*x\.json: No space left on device; free disk space"):
        with atomic_write(target) as tmp:
            tmp.write_text("{}")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []


def test_a_rewrite_removes_the_temporary_files_of_killed_writers_only(tmp_path):
    import subprocess
    import sys

    from zoomfeat.store import atomic_write

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a writer that was killed mid-write: its temporary file stays behind
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".x.json.tmp{gone.pid}").write_text("half")
        (tmp_path / f".x.json.tmp{running.pid}").write_text("being written")
        (tmp_path / f".y.json.tmp{gone.pid}").write_text("another file's")
        with atomic_write(tmp_path / "x.json") as tmp:
            tmp.write_text("{}")
        names = sorted(p.name for p in tmp_path.iterdir())
    finally:
        running.kill()
        running.wait()
    assert names == [f".x.json.tmp{running.pid}", f".y.json.tmp{gone.pid}", "x.json"]


def test_settings_diff_names_the_nested_keys():
    from pathlib import Path

    from zoomfeat.store import describe_diff, settings_diff

    old = {"extractor": "zoomldm", "extractor_config": {"timestep": 50, "mags": ["20x", "5x"]}, "tiles": None}
    new = {"extractor": "zoomldm", "extractor_config": {"timestep": 100, "mags": ("20x", "5x")}, "tiles": Path("t")}
    diff = settings_diff(old, new)
    assert diff == {"extractor_config.timestep": (50, 100), "tiles": (None, "t")}
    assert describe_diff(diff) == "extractor_config.timestep 50 -> 100, tiles null -> t"
    assert settings_diff(old, old) == {} and settings_diff({"a": 1}, {}) == {"a": (1, None)}


def test_a_weight_file_named_from_another_directory_is_the_same_setting(tmp_path, monkeypatch):
    """A rerun with the absolute path of the file a relative path named (or from another working directory)
    resumes; another file, or a path that no longer exists, is still a different setting."""
    from zoomfeat.errors import ConfigError
    from zoomfeat.store import check_output_folder, settings_diff

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "w.ckpt").write_bytes(b"w")
    (tmp_path / "other.ckpt").write_bytes(b"w")
    monkeypatch.chdir(tmp_path)
    check_output_folder(tmp_path / "out", "--out", {"weights": "run/w.ckpt", "steps": 4}, "rec.json")
    check_output_folder(tmp_path / "out", "--out", {"weights": str(tmp_path / "run" / "w.ckpt"), "steps": 4},
                        "rec.json")
    monkeypatch.chdir(tmp_path / "run")
    assert settings_diff({"weights": "../run/w.ckpt"}, {"weights": "w.ckpt"}) == {}
    with pytest.raises(ConfigError, match="other settings .weights .*-> ../other.ckpt"):
        check_output_folder(tmp_path / "out", "--out", {"weights": "../other.ckpt", "steps": 4}, "rec.json")
    assert settings_diff({"weights": "gone.ckpt"}, {"weights": "gone.ckpt"}) == {}
    assert settings_diff({"weights": "gone.ckpt"}, {"weights": "./gone.ckpt"}) != {}


def test_an_output_folder_with_other_settings_is_refused_naming_the_option(tmp_path):
    from zoomfeat.errors import ConfigError
    from zoomfeat.store import OutputError, check_output_folder

    folder = tmp_path / "feats"
    check_output_folder(folder, "--out", {"dim": 3}, "rec.json")
    check_output_folder(folder, "--out", {"dim": 3}, "rec.json")  # the same settings: fine
    with pytest.raises(ConfigError, match=r"feats holds outputs made with other settings \(dim 3 -> 4\): pass "
                                          r"another --conditioning-out"):
        check_output_folder(folder, "--conditioning-out", {"dim": 4}, "rec.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="--out .*file is a file, not a folder"):
        check_output_folder(tmp_path / "file", "--out")
    with pytest.raises(OutputError, match="cannot be created"):
        check_output_folder(tmp_path / "file" / "sub", "--out")


# --- claims ------------------------------------------------------------------------------------------------------
def test_claims_are_exclusive_and_a_dead_holder_is_taken_over(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys
    import time

    from zoomfeat.store import Claim

    a, b = Claim(tmp_path, "s1"), Claim(tmp_path, "s1")
    assert a.acquire() and not b.acquire()
    record = json.loads(a.path.read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    a.release()
    assert not a.path.exists() and b.acquire()
    b.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    a.path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "time": time.time()}))
    assert Claim(tmp_path, "s1").acquire()  # its holder is gone: taken over
    a.path.write_text(json.dumps({"pid": 1, "host": "another-node", "time": time.time() - 100}))
    os.utime(a.path, (time.time() - 100, time.time() - 100))  # the holder's last refresh
    assert not Claim(tmp_path, "s1").acquire()  # another host, recent: alive as far as we can tell
    assert Claim(tmp_path, "s1", stale_after=50).acquire()  # older than stale_after: taken over
    a.path.write_text("")  # half-written by a process killed between create and write
    os.utime(a.path, (time.time() - 100, time.time() - 100))
    assert Claim(tmp_path, "s1", stale_after=50).acquire()


def test_feature_files_built_from_arrays_pass_verify(tmp_path):
    from zoomfeat.store import FeatureFile, write_feature_file

    path = write_feature_file(tmp_path, "s", {"20x": np.ones((6, 2)), "5x": np.zeros((2, 2))}, base_magnification=40)
    assert verify_file(path) == []
    with FeatureFile(path) as f:
        assert f.complete and f.version == 1 and f.base_magnification == 40.0 and [m.name for m in f.mags] == ["20x", "5x"]
        assert f.grid().patch_size_level0 == {"20x": 512, "5x": 2048} and f.extractor == "toy"
        assert f.fused_shape(["20x", "5x"]) == (6, 4)
