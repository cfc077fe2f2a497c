"""The streamed pyramidal TIFF writer (zoomfeat.generate.pyramid): levels against numpy downsampling written
here, metadata round trips through OpenSlide and zoomfeat's slide reader, determinism, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from zoomfeat.errors import ConfigError, DataError
from zoomfeat.generate.pyramid import PyramidSettings, write_pyramid_array, write_pyramid_streamed

LOSSLESS = PyramidSettings(tile=64, compression="deflate")


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _halve(a: np.ndarray) -> np.ndarray:
    """The oracle: mean of each 2x2 block rounded half up, an odd last row/column dropped."""
    h, w = a.shape[0] // 2, a.shape[1] // 2
    blocks = a[:2 * h, :2 * w].astype(np.int64).reshape(h, 2, w, 2, 3).sum(axis=(1, 3))
    return ((blocks + 2) // 4).astype(np.uint8)


def test_levels_equal_numpy_downsampling_of_level0(tmp_path):
    img = _image(203, 290)
    path = write_pyramid_array(tmp_path / "s.tiff", img, mpp=0.5, magnification=20, settings=LOSSLESS)
    with tifffile.TiffFile(path) as tif:
        pages = [p.asarray() for p in tif.pages]
    expected = [img]
    while max(expected[-1].shape[:2]) > 64:
        expected.append(_halve(expected[-1]))
    assert [p.shape for p in pages] == [e.shape for e in expected] == [(203, 290, 3), (101, 145, 3), (50, 72, 3), (25, 36, 3)]
    for page, oracle in zip(pages, expected):
        np.testing.assert_array_equal(page, oracle)


def test_bands_are_requested_once_top_to_bottom_and_only_tile_rows_tall(tmp_path):
    img = _image(150, 100, 1)
    calls = []

    def band(y0, y1):
        calls.append((y0, y1))
        return img[y0:y1]

    write_pyramid_streamed(tmp_path / "s.tiff", 150, 100, band, mpp=0.25, magnification=40, settings=LOSSLESS)
    assert calls == [(0, 64), (64, 128), (128, 150)]


def test_openslide_reads_a_pyramid_with_the_mpp_and_zoomfeat_the_magnification(tmp_path):
    import openslide

    from zoomfeat.slides import Slide

    meta = {"source_slide": {"sha256": "ab" * 32}, "model_sha256": "cd" * 32, "seeds": [1, 2]}
    path = write_pyramid_array(tmp_path / "syn.tiff", _image(300, 260, 2), mpp=0.5, magnification=20,
                               metadata=meta, settings=PyramidSettings(tile=128))
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions == ((260, 300), (130, 150), (65, 75))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        record = json.loads(slide.properties["tiff.ImageDescription"])
    assert record["magnification"] == 20.0 and record["mpp"] == 0.5
    assert {k: record[k] for k in meta} == meta
    with Slide(path) as slide:
        assert (slide.info.base_magnification, slide.info.base_mpp, slide.info.level_count) == (20.0, 0.5, 3)


def test_same_pixels_and_metadata_give_the_same_bytes(tmp_path):
    img = _image(130, 140, 3)
    a = write_pyramid_array(tmp_path / "a.tiff", img, mpp=0.5, magnification=20, metadata={"k": 1})
    b = write_pyramid_array(tmp_path / "b.tiff", img, mpp=0.5, magnification=20, metadata={"k": 1})
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tiff", "b.tiff"]  # no scratch files left


def test_bad_band_and_bad_settings_are_one_line_errors_and_leave_no_file(tmp_path):
    with pytest.raises(DataError, match=r"uint8 \[64, 100, 3\]"):
        write_pyramid_streamed(tmp_path / "x.tiff", 100, 100, lambda y0, y1: np.zeros((y1 - y0, 99, 3), np.uint8),
                               mpp=0.5, magnification=20, settings=LOSSLESS)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="multiple of 16"):
        PyramidSettings(tile=100)
    with pytest.raises(ConfigError, match="compression"):
        PyramidSettings(compression="lzw9")
