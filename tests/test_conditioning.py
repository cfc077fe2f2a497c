"""Conditioning grids: the 20x lattice under a patch, deduplicated embedding, gathering and pooling."""

from __future__ import annotations

import numpy as np
import pytest

from zoomfeat.conditioning import ConditioningGrids, lattice_20x, pool_grid
from zoomfeat.errors import DataError


def test_lattice_20x_is_row_major_level0_corners():
    coords = np.array([[0, 0], [2048, 4096]], dtype=np.int64)
    lat = lattice_20x(coords, "5x", base_mag=40.0)  # 20x tile = 512 level-0 px, 4 x 4 under a 5x patch
    assert lat.shape == (2, 4, 4, 2) and lat.dtype == np.int64
    assert lat[0, 0, 1].tolist() == [512, 0]  # row 0, column 1: one tile to the right
    assert lat[0, 1, 0].tolist() == [0, 512]  # row 1, column 0: one tile down
    assert lat[1, 3, 3].tolist() == [2048 + 3 * 512, 4096 + 3 * 512]
    assert lattice_20x(coords, "20x", base_mag=20.0)[:, 0, 0].tolist() == coords.tolist()


def test_pool_grid_block_means_to_8x8():
    grid = np.arange(2 * 3 * 16 * 16, dtype=np.float32).reshape(2, 3, 16, 16)
    pooled = pool_grid(grid, 8)
    assert pooled.shape == (2, 3, 8, 8)
    assert pooled[1, 2, 3, 5] == pytest.approx(grid[1, 2, 6:8, 10:12].mean())
    assert pool_grid(grid[:, :, :4, :4], 8).shape == (2, 3, 4, 4)  # smaller grids are left alone


def _table(base_mag: float, side: int) -> tuple[np.ndarray, np.ndarray]:
    step = int(256 * base_mag / 20)
    ys, xs = np.mgrid[0:side, 0:side]
    coords = np.stack([xs.ravel() * step, ys.ravel() * step], axis=1).astype(np.int64)
    emb = np.random.default_rng(0).standard_normal((len(coords), 5)).astype(np.float32)
    return coords, emb


def test_grids_gather_the_embedding_of_each_tile_under_the_patch():
    coords20, emb = _table(20.0, 8)
    patches = {"5x": np.array([[1024, 0], [0, 1024]], np.int64), "20x": coords20[[3, 10]]}
    # shuffled table: lookups must not depend on the order the embeddings come in
    perm = np.random.default_rng(1).permutation(len(coords20))
    cond = ConditioningGrids.from_embeddings(patches, coords20[perm], emb[perm], base_mag=20.0)
    grids = cond.grid("5x")
    assert grids.shape == (2, 5, 4, 4) and grids.dtype == np.float32
    by_xy = {tuple(c): e for c, e in zip(coords20.tolist(), emb)}
    np.testing.assert_array_equal(grids[0, :, 2, 1], by_xy[(1024 + 256, 512)])
    np.testing.assert_array_equal(cond.grid("20x")[:, :, 0, 0], emb[[3, 10]])
    np.testing.assert_array_equal(cond.grid("5x", rows=[1])[0], grids[1])
    np.testing.assert_array_equal(cond.embeddings_20x(coords20[[7]]), emb[[7]])
    assert cond.grid("5x", pool_to=2).shape == (2, 5, 2, 2)


def test_missing_tile_is_a_data_error_naming_the_source():
    coords20, emb = _table(20.0, 2)
    with pytest.raises(DataError, match=r"cond\.h5.*\(512, 0\)"):
        ConditioningGrids.from_embeddings({"5x": np.zeros((1, 2), np.int64)}, coords20, emb, base_mag=20.0,
                                          source="cond.h5")


def test_embeds_each_distinct_tile_once_and_matches_the_encoder(tmp_path):
    import torch
    from zoomfeat.encoders import load_encoder
    from zoomfeat.slides import Slide
    from zoomfeat.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.svs", size=1024, seed=3)
    encoder = load_encoder("toy", dim=8, seed=0)
    seen = []

    class Counting(torch.nn.Module):
        spec = encoder.spec

        def preprocess(self, images):
            seen.append(len(images))
            return encoder.preprocess(images)

        def forward(self, x):
            return encoder(x)

    # one 5x patch (1024 level-0 px) and two 20x tiles under it: 16 distinct tiles, each embedded once
    patches = {"5x": np.array([[0, 0]], np.int64), "20x": np.array([[0, 0], [256, 768]], np.int64)}
    cond = ConditioningGrids(slide.path, patches, Counting(), batch_size=5, workers=0)  # base mag from the file
    assert sum(seen) == 16 and len(cond.table) == 16
    with Slide(slide.path) as s:
        pixels = torch.tensor(s.read_patch(256, 768, 20.0)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        expected = encoder(encoder.preprocess(pixels)).numpy()
    np.testing.assert_allclose(cond.grid("20x")[1, :, 0, 0], expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cond.grid("5x")[0, :, 3, 1], expected[0], rtol=1e-5, atol=1e-5)
