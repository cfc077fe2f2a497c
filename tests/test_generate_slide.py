"""``zoomfeat generate-slide`` end to end on the fitted test model (16-px patches, 8x8 latents) and a synthetic
slide: the output opens in OpenSlide as a pyramid at 20x with the source's mpp, goes through ``tile`` and
``extract``, keeps the real slide's background, has no more seam across regions than inside them, and a run
killed with SIGKILL resumes into the same bytes. Also ``generate-large --format tiff|png``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

import cli
from helpers_generate import DATA

pytestmark = pytest.mark.usefixtures("one_thread", "generate_tiny")

# 5x -> 20x: regions of 4x4 20x patches (64 px); the 4096-px 20x slide gives 4x4 regions, a 256-px output
FAST = ["--zoomldm", str(DATA), "--conditioner", "toy", "--levels", "5x,20x", "--steps", "2", "--refine-t0", "300",
        "--refine-stride", "150", "--window-stride", "4", "--decode-stride", "4", "--device", "cpu",
        "--batch-size", "16", "--compression", "deflate", "--tile", "64"]
REGION_PX = 64
PATCH_PX = 16


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from zoomfeat.synthetic import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("real") / "real.svs", size=4096, seed=1).path


@pytest.fixture(scope="module")
def generated(real, tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "syn.tiff"
    assert cli.main(["generate-slide", *FAST, "--slide", str(real), "--out", str(out), "--keep-parts"]) == 0
    return out


def _tissue(real) -> np.ndarray:
    """The real slide's tissue mask at the output's scale (one mask px per 16 output px side: 1.25x of a
    20x slide is 16x smaller, and one 256-px 20x tile is one 16-px output patch)."""
    from zoomfeat.slides import Slide
    from zoomfeat.tissue import tissue_mask

    with Slide(real) as slide:
        return tissue_mask(slide).mask


def test_output_is_a_20x_pyramid_with_the_sources_mpp_and_provenance(generated, real):
    import openslide

    from zoomfeat.slides import Slide

    with openslide.OpenSlide(str(generated)) as slide:
        assert slide.level_dimensions == ((256, 256), (128, 128), (64, 64))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        record = json.loads(slide.properties["tiff.ImageDescription"])
    assert record["magnification"] == 20.0 and record["settings"]["levels"] == ["5x", "20x"]
    assert record["source_slide"]["file"] == "real.svs" and len(record["model"]["checkpoint_sha256"]) == 64
    with Slide(generated) as slide:
        assert (slide.info.base_magnification, slide.info.base_mpp) == (20.0, 0.5)


def test_background_stays_background_and_tissue_is_generated(generated, real):
    with tifffile.TiffFile(generated) as tif:
        img = tif.pages[0].asarray().astype(int)
    mask = _tissue(real)
    assert mask.shape == (256, 256)  # 4096 level-0 px / 16 (1.25x of 20x): one mask px per output px
    background = img[~mask]
    assert mask.mean() > 0.1 and (~mask).mean() > 0.5
    assert np.ptp(background, axis=0).max() == 0  # one colour: the real slide's background
    tissue = img[mask]
    assert tissue.std(axis=0).min() > 5 and not np.all(tissue == background[0])


def test_seams_across_regions_are_no_stronger_than_between_patches_inside_regions(generated, real):
    """The seam statistic: mean |difference| of horizontally and vertically adjacent tissue pixels that straddle
    a border. Borders between regions (sampled by separate runs) against borders between the 20x patches inside
    one region (one joint run): generating region by region must not add seams of its own."""
    with tifffile.TiffFile(generated) as tif:
        img = tif.pages[0].asarray().astype(float)
    mask = _tissue(real)
    cross, inside = [], []
    index = np.arange(1, 256)
    for axis in (0, 1):
        diff = np.abs(np.diff(img, axis=axis)).mean(axis=2)
        both = mask[1:] & mask[:-1] if axis == 0 else mask[:, 1:] & mask[:, :-1]
        region_border, patch_border = index % REGION_PX == 0, index % PATCH_PX == 0
        shape = (-1, 1) if axis == 0 else (1, -1)
        cross.append(diff[both & region_border.reshape(shape)])
        inside.append(diff[both & (patch_border & ~region_border).reshape(shape)])
    cross, inside = np.concatenate(cross), np.concatenate(inside)
    assert len(cross) > 100 and len(inside) > 300
    assert cross.mean() <= 1.2 * inside.mean(), (cross.mean(), inside.mean())


def test_at_least_eight_regions_were_sampled_and_background_regions_skipped(generated, real):
    mask = _tissue(real)
    with_tissue = {(i, j) for i in range(4) for j in range(4)
                   if mask[i * REGION_PX:(i + 1) * REGION_PX, j * REGION_PX:(j + 1) * REGION_PX].any()}
    stored = {tuple(int(p.stem.split("_")[k][1:]) for k in (1, 2))
              for p in Path(str(generated) + ".parts").glob("L1_*.npy")}
    assert len(stored) >= 8 and stored == with_tissue


def test_generated_slide_goes_through_tile_extract_and_verify(generated, tmp_path):
    """The 256-px output is one 20x tile, 15 % tissue: --min-tissue 0.05 keeps it."""
    import h5py

    tiles = tmp_path / "tiles"
    assert cli.main(["tile", str(generated), "--mags", "20x", "--out", str(tiles), "--min-tissue", "0.05",
                     "--no-progress"]) == 0
    feats = tmp_path / "feats"
    assert cli.main(["extract", str(generated), "--out", str(feats), "--encoder", "toy", "--mags", "20x",
                     "--min-tissue", "0.05", "--device", "cpu", "--workers", "1"]) == 0
    assert cli.main(["verify", str(feats)]) == 0
    with h5py.File(feats / "syn.h5") as h5:
        assert h5["20x/features"].shape[0] == 1 and h5["20x/coords"][0].tolist() == [0, 0]


def test_the_output_decoded_in_narrow_column_chunks_matches_one_chunk(generated, real, tmp_path, monkeypatch):
    """The finest level is decoded across a band in column chunks (memory bounded by the chunk, not the slide's
    width); each chunk with one window of margin: chunks of 32 px (8 per band) give the one-chunk file's pixels."""
    import shutil

    from zoomfeat.generate import slide as slide_module

    again = tmp_path / "again.tiff"
    shutil.copytree(str(generated) + ".parts", str(again) + ".parts")  # every region stored: only the decoding runs
    monkeypatch.setattr(slide_module, "DECODE_CHUNK_PX", 32)
    assert cli.main(["generate-slide", *FAST, "--slide", str(real), "--out", str(again)]) == 0
    with tifffile.TiffFile(generated) as a, tifffile.TiffFile(again) as b:
        one, chunked = a.pages[0].asarray().astype(int), b.pages[0].asarray().astype(int)
    assert np.abs(one - chunked).max() <= 1, np.abs(one - chunked).max()


def test_grid_files_are_written_band_by_band_and_read_by_crops(tmp_path):
    """save_bands writes what np.save would hold (read back by np.load); read_crop is the slice of it."""
    from zoomfeat.errors import DataError
    from zoomfeat.generate.slide import read_crop, save_bands

    array = np.random.default_rng(0).standard_normal((3, 10, 7)).astype(np.float32)
    save_bands(tmp_path / "a.npy", array.shape, ((r, array[:, r:r + 4]) for r in range(0, 10, 4)))
    assert np.array_equal(np.load(tmp_path / "a.npy"), array)
    crop = read_crop(tmp_path / "a.npy", np.s_[:, 3:9, 2:5])
    assert type(crop) is np.ndarray and np.array_equal(crop, array[:, 3:9, 2:5])
    with pytest.raises(DataError, match="8 of 10 rows"):
        save_bands(tmp_path / "b.npy", array.shape, ((r, array[:, r:r + 4]) for r in range(0, 8, 4)))
    assert not (tmp_path / "b.npy").exists()


def _run(args, env):
    return subprocess.Popen([sys.executable, "-m", "cli", "generate-slide", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_and_rerun_gives_a_byte_identical_tiff(real, tmp_path):
    """A 2x1 region (2 regions): killed after its first region is stored, run again, same bytes as a run that
    was never interrupted."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [*FAST, "--slide", str(real), "--region", "1024,1024,2048,1024"]
    whole = tmp_path / "whole.tiff"
    assert subprocess.run([sys.executable, "-m", "cli", "generate-slide", *args, "--out", str(whole)],
                          env=env, capture_output=True).returncode == 0
    killed = tmp_path / "killed.tiff"
    parts = Path(str(killed) + ".parts")
    proc = _run([*args, "--out", str(killed)], env)
    deadline = time.time() + 300
    while not list(parts.glob("L1_*.npy")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed.exists() and list(parts.glob("L1_*.npy"))
    assert subprocess.run([sys.executable, "-m", "cli", "generate-slide", *args, "--out", str(killed)],
                          env=env, capture_output=True).returncode == 0
    assert killed.read_bytes() == whole.read_bytes()
    assert not parts.exists()  # the parts store is removed once the TIFF is complete


def test_bad_input_is_one_line(real, tmp_path, capsys):
    for argv, expected in (
        (["--levels", "5x"], "ending at 20x"),
        (["--region", "0,0,10"], "X,Y,W,H"),
        (["--region", "0,0,100,100"], "smaller than one 5x patch"),
        (["--region", "0,0,9000,1024"], "leaves the 4096x4096 slide"),
    ):
        code = cli.main(["generate-slide", *FAST, "--slide", str(real), "--out", str(tmp_path / "x.tiff"), *argv])
        err = capsys.readouterr().err.strip()
        assert code != 0 and expected in err and len(err.splitlines()) == 1, err


def test_generate_large_format_tiff_and_png_text_chunks(tmp_path):
    import openslide
    from PIL import Image

    from zoomfeat.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.svs", size=2048, label=1, seed=3).path
    base = ["generate-large", "--zoomldm", str(DATA), "--conditioner", "toy", "--mag", "5x", "--device", "cpu",
            "--batch-size", "16", "--slide", str(slide), "--steps", "2", "--no-refine", "--seed", "4"]
    assert cli.main([*base, "--format", "tiff", "--out", str(tmp_path / "t")]) == 0
    with openslide.OpenSlide(str(tmp_path / "t" / "large.tiff")) as osl:
        assert osl.dimensions == (64, 64) and float(osl.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert json.loads(osl.properties["tiff.ImageDescription"])["seed"] == "4"
    assert cli.main([*base, "--format", "png", "--out", str(tmp_path / "p")]) == 0
    with Image.open(tmp_path / "p" / "large.png") as png:
        text = dict(png.text)
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert (text["magnification"], text["mpp"], text["seed"]) == ("20", "0.5", "4")
    assert text["model_sha256"] == manifest["model"]["checkpoint_sha256"]
