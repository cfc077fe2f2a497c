import numpy as np
import pytest
from helpers_slides import synthetic_slide, write_blank_slide  # noqa: F401

from zoomfeat.errors import ConfigError, SlideError
from zoomfeat.slides import Slide
from zoomfeat.tiling import grid_from_mask, make_grid, patch_sizes_level0
from zoomfeat.tissue import TissueMask, TissueParams, mask_from_rgb, otsu_threshold


def check_grid(grid):
    """Lattice and exact parent links for every pair of magnifications."""
    for i, fine in enumerate(grid.names):
        size = grid.patch_size_level0[fine]
        coords = grid.coords[fine]
        assert coords.dtype == np.int64 and (coords % size == 0).all()
        assert len(np.unique(coords, axis=0)) == len(coords)
        for coarse in grid.names[i + 1 :]:
            csize = grid.patch_size_level0[coarse]
            parents = grid.coords[coarse][grid.parents[fine][coarse]]
            assert ((coords // csize) * csize == parents).all()


def test_four_mags_on_one_lattice():
    mask = TissueMask(mask=np.ones((64, 64), bool), scale_x=64, scale_y=64, threshold=0)
    grid = grid_from_mask(4096, 4096, 20.0, [2.5, 20, 5, 10], mask, 0.5)
    assert grid.names == ("20x", "10x", "5x", "2.5x")
    assert grid.patch_size_level0 == {"20x": 256, "10x": 512, "5x": 1024, "2.5x": 2048}
    assert [len(grid.coords[n]) for n in grid.names] == [256, 64, 16, 4]
    check_grid(grid)
    # documented order: coarsest row-major, finer tiles grouped by coarsest ancestor
    assert grid.coords["2.5x"].tolist() == [[0, 0], [2048, 0], [0, 2048], [2048, 2048]]
    assert (np.diff(grid.parents["20x"]["2.5x"]) >= 0).all()
    assert grid.coords["20x"][:9].tolist()[8] == [0, 256]


def test_partial_tissue_keeps_parents():
    m = np.zeros((40, 40), bool)
    m[10:12, 20:23] = True  # a speck of tissue: 6 of the 64 mask px of one 20x tile
    grid = grid_from_mask(2560, 2560, 40.0, [20, 5], TissueMask(m, 64, 64, 0), 0.05)
    assert grid.patch_size_level0 == {"20x": 512, "5x": 2048}
    assert grid.coords["20x"].tolist() == [[1024, 512]] and grid.coords["5x"].tolist() == [[0, 0]]
    check_grid(grid)


def test_patch_size_errors():
    with pytest.raises(SlideError, match="--mags"):
        patch_sizes_level0(10.0, [20.0])
    with pytest.raises(SlideError, match="not whole"):
        patch_sizes_level0(30.3, [20.0])


def test_otsu_and_floor():
    values = np.concatenate([np.full(100, 10.0), np.full(100, 120.0)])
    assert 10 < otsu_threshold(values) <= 120
    white = np.full((32, 32, 3), 240, np.uint8)
    white[..., 0] += np.random.default_rng(0).integers(0, 8, (32, 32), dtype=np.uint8)
    mask, threshold = mask_from_rgb(white, TissueParams())
    assert not mask.any() and threshold >= 20
    with pytest.raises(ConfigError, match="--min-tissue"):
        TissueParams(min_tissue=1.5)


def test_make_grid_on_synthetic_slide(synthetic_slide):
    info = synthetic_slide(size=2048, label=1)
    with Slide(info.path) as slide:
        grid = make_grid(slide, ["5x", "20x"])
    check_grid(grid)
    assert 5 < len(grid.coords["20x"]) < 64 and 1 <= len(grid.coords["5x"]) <= 4


def test_blank_slide_has_no_tissue(tmp_path):
    path = write_blank_slide(tmp_path / "white.svs", size=1024)
    with Slide(path) as slide, pytest.raises(SlideError, match="no tissue"):
        make_grid(slide, [20.0, 5.0])


@pytest.mark.slow
def test_tile_extract_and_prepare_train_give_the_same_grid(tmp_path, synthetic_slide):
    """The one tile-grid function: the same slide and tissue flags through the three commands give the same
    tiles at every magnification (prepare-train keeps every patch when not subsampled)."""
    import h5py

    import cli

    info = synthetic_slide(size=3072, label=1, seed=9)
    flags = ["--mags", "20x,5x", "--min-tissue", "0.6", "--min-saturation", "30", "--mask-mag", "2.5"]
    assert cli.main(["tile", str(info.path), "--out", str(tmp_path / "tiles"), "--no-progress", *flags]) == 0
    assert cli.main(["extract", str(info.path), "--out", str(tmp_path / "feats"), "--encoder", "toy", "--device",
                     "cpu", "--workers", "0", *flags]) == 0
    assert cli.main(["prepare-train", str(info.path), "--out", str(tmp_path / "set"), "--conditioner", "toy",
                     "--zoomldm", "tiny", *flags]) == 0
    grids = {}
    for name, path in (("tile", tmp_path / "tiles" / f"{info.slide_id}.h5"),
                       ("extract", tmp_path / "feats" / f"{info.slide_id}.h5"),
                       ("prepare-train", tmp_path / "set" / "shards" / f"{info.slide_id}.h5")):
        with h5py.File(path, "r") as f:
            grids[name] = {m: f[m]["coords"][()] for m in ("20x", "5x")}
    with Slide(info.path) as slide:  # the flags matter: the default flags give another grid
        default = make_grid(slide, [20.0, 5.0])
        flagged = make_grid(slide, [20.0, 5.0], TissueParams(min_tissue=0.6, min_saturation=30, mask_mag=2.5))
    assert len(default.coords["20x"]) != len(flagged.coords["20x"])
    for name, grid in grids.items():
        for mag in ("20x", "5x"):
            np.testing.assert_array_equal(grid[mag], flagged.coords[mag], err_msg=f"{name} {mag}")
