import json
import shutil

import h5py
import numpy as np
import pytest
from conftest import require_shared
from helpers_slides import synthetic_slide, write_blank_slide  # noqa: F401

from cli import main
from zoomfeat.store import read_grid, temp_path

FIX = ("fixtures", "openslide-python")


@pytest.mark.slow
def test_tile_8192_aperio_and_verify(tmp_path, synthetic_slide):
    """Done-when: 20x and 5x groups on one lattice, exact parent_5x links, verify passes."""
    info = synthetic_slide(size=8192, label=1, seed=7)
    out = tmp_path / "tiles"
    assert main(["tile", str(info.path), "--out", str(out), "--mags", "20x,5x", "--preview", "--no-progress"]) == 0
    grid = read_grid(out / f"{info.slide_id}.h5")
    fine, coarse = grid.coords["20x"], grid.coords["5x"]
    assert len(fine) > 50 and (fine % 256 == 0).all() and (coarse % 1024 == 0).all()
    assert (fine // 1024 * 1024 == coarse[grid.parents["20x"]["5x"]]).all()
    assert set(map(tuple, coarse.tolist())) == set(map(tuple, (fine // 1024 * 1024).tolist()))
    assert (out / "previews" / f"{info.slide_id}.png").is_file()
    assert json.loads((out / "tile_config.json").read_text())["mags"] == ["20x", "5x"]
    assert main(["verify", str(out)]) == 0


def test_bad_slides_do_not_stop_the_batch(tmp_path, synthetic_slide, capsys):
    slides = tmp_path / "in"
    slides.mkdir()
    for name in ("unopenable.tiff", "unreadable.svs", "small.svs", "boxes.tiff"):
        shutil.copy(require_shared(*FIX, name), slides / name)
    shutil.copy(synthetic_slide(size=1024, label=0).path, slides / "good.svs")
    write_blank_slide(slides / "white.svs", size=1024)
    out = tmp_path / "out"
    assert main(["tile", str(slides), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert {line.split(":")[1].strip().rsplit("/", 1)[-1] for line in errors} == {
        "unopenable.tiff", "unreadable.svs", "boxes.tiff", "white.svs"}
    assert "--mpp" in next(line for line in errors if "boxes.tiff" in line)
    assert "warning:" in err and "small.svs" in err and "smaller than one 20x tile" in err
    with h5py.File(out / "small.h5") as f:
        assert f["20x"]["coords"].shape == (0, 2) and f.attrs["complete"]
    assert (out / "good.h5").is_file()
    assert len((out / "errors.csv").read_text().splitlines()) == 5
    # second run: finished slides are skipped
    assert main(["tile", str(slides), "--out", str(out), "--no-progress"]) == 1
    assert "done 0, skipped 2, failed 4" in capsys.readouterr().err
    # boxes.tiff works with a scale override (at 5x: 1024-px tiles, still smaller -> empty grid)
    assert main(["tile", str(slides / "boxes.tiff"), "--out", str(out), "--mpp", "0.5", "--no-progress"]) == 0


def test_killed_run_is_redone(tmp_path, synthetic_slide, capsys):
    info = synthetic_slide(size=1024, label=0)
    out = tmp_path / "out"
    out.mkdir()
    target = out / f"{info.slide_id}.h5"
    from zoomfeat.slides import Slide
    from zoomfeat.store import TileStoreWriter
    from zoomfeat.tiling import make_grid

    with Slide(info.path) as slide:  # what a killed run leaves behind: the writer never committed nor cleaned up
        writer = TileStoreWriter(target, slide.info, make_grid(slide, [20.0, 5.0]))
        writer._file.close()
    assert temp_path(target).is_file() and not target.exists()
    assert main(["verify", str(out)]) == 1
    assert main(["tile", str(info.path), "--out", str(out), "--no-progress"]) == 0
    assert "done 1, skipped 0" in capsys.readouterr().err
    assert main(["verify", str(out)]) == 0


def test_user_errors_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["tile", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no slides found" in capsys.readouterr().err
    assert main(["tile", str(empty), "--out", str(tmp_path / "o"), "--mags", "3x"]) == 2
    assert "unknown magnification '3x'" in capsys.readouterr().err
    assert main(["tile", str(empty), "--out", str(tmp_path / "o"), "--min-tissue", "2"]) == 2


def test_info_and_synth(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "c"), "--n", "2", "--size", "512", "--format", "tiff"]) == 0
    capsys.readouterr()
    slide = tmp_path / "c" / "case-000-slide-0.tiff"
    assert main(["info", str(slide), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["vendor"] == "generic-tiff" and data["base_magnification"] == 20.0
    assert data["magnification_source"] == "mpp" and data["width"] == 512
    assert main(["info", str(slide)]) == 0
    assert "20x (from mpp)" in capsys.readouterr().out


@pytest.mark.parametrize("mags", ["20x,10x,5x,2.5x"])
def test_four_magnifications(tmp_path, synthetic_slide, mags):
    info = synthetic_slide(size=4096, label=1)
    assert main(["tile", str(info.path), "--out", str(tmp_path), "--mags", mags, "--no-progress"]) == 0
    grid = read_grid(tmp_path / f"{info.slide_id}.h5")
    assert grid.names == ("20x", "10x", "5x", "2.5x")
    for fine in grid.names:
        for coarse, rows in grid.parents[fine].items():
            size = grid.patch_size_level0[coarse]
            assert np.array_equal(grid.coords[fine] // size * size, grid.coords[coarse][rows])
