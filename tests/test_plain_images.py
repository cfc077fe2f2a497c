"""Plain large images (PNG, JPEG, flat TIFF) open through the Slide interface with an explicit scale."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import require_shared
from zoomfeat.errors import SlideError
from zoomfeat.slides import Slide

RNG = np.random.default_rng(0)


def _image(h=768, w=1024) -> np.ndarray:
    """Tissue-like pink blobs on white: a tissue mask finds them."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 245, np.uint8)
    blob = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 2.2) ** 2
    img[blob] = (RNG.integers(0, 40, size=(int(blob.sum()), 3)) + np.array([180, 90, 150])).astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    pixels = _image()
    Image.fromarray(pixels).save(root / "a.png")
    Image.fromarray(pixels).save(root / "b.jpg", quality=95)
    tifffile.imwrite(root / "c.tif", pixels)  # flat, uncompressed: memory-mapped
    tifffile.imwrite(root / "d.tiff", pixels, compression="zlib")  # flat, compressed: decoded
    return root, pixels


@pytest.mark.parametrize("name", ["a.png", "c.tif", "d.tiff"])
def test_lossless_plain_images_read_exactly(images, name):
    root, pixels = images
    with Slide(root / name, mpp=0.5) as slide:
        assert (slide.info.width, slide.info.height) == (1024, 768)
        assert slide.info.base_magnification == 20.0 and slide.info.base_mpp == 0.5
        np.testing.assert_array_equal(slide.read_region_level0(256, 256, 256, 256), pixels[256:512, 256:512])
        edge = slide.read_region_level0(768, 512, 512, 512)  # runs off the right and bottom edges: white
        np.testing.assert_array_equal(edge[:256, :256], pixels[512:768, 768:1024])
        assert (edge[256:, :] == 255).all() and (edge[:, 256:] == 255).all()
        coarse = slide.read_patch(0, 0, 5.0, size=64)  # 256 level-0 px -> 64 px, box filter
        expected = pixels[:256, :256].reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
        assert np.abs(coarse.astype(float) - expected).max() <= 1.0


def test_uncompressed_tiff_is_memory_mapped(images):
    root, _ = images
    with Slide(root / "c.tif", base_mag=20) as slide:
        assert isinstance(slide._slide._pixels, np.memmap)


def test_jpeg_reads_close(images):
    root, pixels = images
    with Slide(root / "b.jpg", base_mag=40) as slide:
        region = slide.read_region_level0(0, 0, 1024, 1024)[:768]
        assert np.abs(region.astype(int) - pixels.astype(int)).mean() < 6


@pytest.mark.parametrize("name", ["a.png", "c.tif"])
def test_plain_image_without_scale_is_a_one_line_error(images, name):
    root, _ = images
    with pytest.raises(SlideError, match="pass --base-mag .* or --mpp"):
        Slide(root / name)


def test_garbage_png_is_a_slide_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(SlideError, match="not a readable image"):
        Slide(bad, mpp=0.5)


def _cli(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "cli", *map(str, argv)], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_tile_and_extract_a_png_and_a_flat_tiff(images, tmp_path):
    from zoomfeat.store import read_grid

    root, _ = images
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    result = _cli("tile", root / "a.png", root / "c.tif", "--out", tmp_path / "tiles", "--mags", "20x",
                  "--mpp", "0.5", cwd=repo)
    assert result.returncode == 0, result.stderr
    grid = read_grid(tmp_path / "tiles" / "a.h5")
    assert len(grid.coords["20x"]) >= 4
    result = _cli("extract", root / "a.png", "--out", tmp_path / "feats", "--encoder", "toy", "--mags", "20x",
                  "--mpp", "0.5", "--device", "cpu", "--workers", "0", cwd=repo)
    assert result.returncode == 0, result.stderr
    from zoomfeat.store import read_features

    feats = read_features(tmp_path / "feats" / "a.h5", "20x")
    assert feats.shape[0] == len(grid.coords["20x"]) and np.isfinite(feats).all()


@pytest.mark.slow
def test_tile_refuses_a_png_without_scale_in_one_line(images, tmp_path):
    root, _ = images
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    result = _cli("tile", root / "a.png", "--out", tmp_path / "t", "--mags", "20x", cwd=repo)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--mpp" in lines[0] and "Traceback" not in result.stderr


def test_dicom_fixture_opens_through_openslide():
    dicom = require_shared("fixtures", "openslide-python", "boxes_0.dcm")
    with Slide(dicom) as slide:
        assert slide.info.base_magnification == 20.0 and slide.info.vendor == "dicom"
        assert slide.read_region_level0(0, 0, 16, 16).shape == (16, 16, 3)
