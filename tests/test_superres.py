"""Super-resolution on the tiny golden model: right size, the measurement constraint (the output downsampled by the
Resizer gives back the input, PSNR computed here), the bicubic and uncond rows, the gt row's real embeddings,
and one-line errors at the command boundary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from conftest import require_shared
from helpers_slides import synthetic_slide  # noqa: F401  (fixture)
from zoomfeat.generate import superres as sr
from zoomfeat.generate.invert import InversionSettings
from zoomfeat.generate.joint import JointSettings
from zoomfeat.generate.resize import Resizer
from zoomfeat.mags import parse_mag

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = JointSettings(t_start=1000, stride=1000, iterations=1)  # 1 joint step: a plumbing-sized run
CONSISTENT_DB = 40.0  # stated bound: downsampled output vs input with --consistency project (uint8 output)


@pytest.fixture(scope="module")
def tiny():
    from zoomfeat.model import load_zoomldm

    return load_zoomldm(require_shared("golden", "zoomldm_tiny"))


def lr_image(h=64, w=128, seed=0):
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([np.sin(xx / 5) * 90 + 128, np.cos(yy / 7) * 90 + 128, (xx * 2 + yy) % 200 + 20], -1)
    return (img + rng.normal(0, 5, img.shape)).clip(0, 255).astype(np.uint8)


def down_psnr(output: np.ndarray, lr: np.ndarray, factor: int) -> float:
    """PSNR (dB, [0, 1] scale) of the Resizer-downsampled output against the input, computed here."""
    x = torch.from_numpy(output.transpose(2, 0, 1).copy()).double() / 255
    h, w = lr.shape[:2]
    down = Resizer(x.shape, 1 / factor, output_shape=(h, w))(x)
    mse = float(((down - torch.from_numpy(lr.transpose(2, 0, 1).copy()).double() / 255) ** 2).mean())
    return 10 * np.log10(1 / mse)


@pytest.mark.parametrize("row", ["inverted", "uncond"])
@pytest.mark.slow
def test_superres_output_size_and_measurement_constraint(tiny, row):
    lr = lr_image(64, 128 if row == "inverted" else 64)  # 1x2 (tiled) or 1x1 patches of 64 px at 10x
    settings = sr.SuperResSettings(row=row, joint=FAST, inversion=InversionSettings(iterations=3))
    res = sr.superres(tiny, lr, parse_mag("10x"), settings)
    patches = lr.shape[1] // 64
    assert res.image.shape == (128, 128 * patches, 3) and res.image.dtype == np.uint8
    assert down_psnr(res.image, lr, 2) >= CONSISTENT_DB
    assert res.psnr_final == pytest.approx(down_psnr(res.image, lr, 2), abs=0.05)
    assert len(res.disagreement) == patches and all(len(d) == 1 for d in res.disagreement)
    if row == "inverted":
        assert res.grid.shape == (32, 2, 4) and len(res.inversion_probe) == 2
    else:
        assert res.grid is None


@pytest.mark.slow
def test_without_projection_the_sampler_output_is_returned_and_measured(tiny):
    lr = lr_image(64, 64)
    res = sr.superres(tiny, lr, parse_mag("10x"), sr.SuperResSettings(row="uncond", joint=FAST, consistency="none"))
    raw = down_psnr(res.image, lr, 2)
    assert res.psnr_final == pytest.approx(raw, abs=0.05)
    assert res.psnr_sampler == pytest.approx(raw, abs=0.5)  # before vs after the uint8 cast
    assert raw < CONSISTENT_DB  # the random tiny model cannot meet the measurement by itself


def test_bicubic_row_is_the_resizer_upscaling(tiny):
    lr = lr_image(64, 64)
    res = sr.superres(tiny, lr, parse_mag("5x"), sr.SuperResSettings(row="bicubic", consistency="none"))
    x = torch.from_numpy(lr.transpose(2, 0, 1).copy()).float() / 127.5 - 1
    up = Resizer(x.shape, 4.0, output_shape=(256, 256))(x)
    want = (torch.clamp((up + 1) / 2, 0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(res.image, want)


def test_projection_is_exact_and_leaves_consistent_images_alone():
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(1, 3, 16, 24, generator=gen) * 1.2 - 0.6
    x = torch.rand(1, 3, 64, 96, generator=gen) * 1.6 - 0.8
    p = sr.project_consistent(x, y, 4, iterations=20)
    down = Resizer((64, 96), 0.25, output_shape=(16, 24))
    assert float((down(p) - y).abs().max()) < 1e-3
    again = sr.project_consistent(p, y, 4, iterations=1)
    assert float((again - p).abs().max()) < 1e-3
    # the smallest change: the correction is orthogonal to the null space of the operator
    assert float((down(p - x) - (y - down(x))).abs().max()) < 1e-3


@pytest.mark.slow
def test_gt_row_uses_the_slides_real_embeddings(tiny, synthetic_slide, tmp_path):
    import openslide

    from zoomfeat.encoders import load_encoder

    slide = synthetic_slide(size=1024, label=0)
    enc = load_encoder("toy", dim=32)
    grid = sr.gt_grid_from_slide(slide.path, 256, 0, 1, 1, parse_mag("10x"), enc)
    with openslide.OpenSlide(str(slide.path)) as osr:  # the 2x2 20x tiles under the 10x patch at (256, 0)
        tiles = [np.asarray(osr.read_region((256 + 256 * j, 256 * i), 0, (256, 256)).convert("RGB"))
                 for i in range(2) for j in range(2)]
    x = torch.from_numpy(np.stack(tiles).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        emb = enc(enc.preprocess(x)).numpy()
    assert grid.shape == (32, 2, 2)
    assert np.allclose(grid.numpy().reshape(32, 4).T, emb, atol=1e-5)
    res = sr.superres(tiny, lr_image(64, 64), parse_mag("10x"), sr.SuperResSettings(row="gt", joint=FAST),
                      gt_grid=grid)
    assert res.image.shape == (128, 128, 3) and torch.equal(res.grid, grid)


@pytest.mark.slow
def test_superres_command_writes_rows_and_manifests(tmp_path, capsys):
    folder = require_shared("golden", "zoomldm_tiny")
    Image.fromarray(lr_image(64, 64)).save(tmp_path / "a.png")
    out = tmp_path / "sr"
    rc = cli.main(["superres", str(tmp_path / "a.png"), "--mag", "10x", "--zoomldm", str(folder), "--rows",
                   "uncond,bicubic", "--steps", "1", "--joint-iterations", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    for row in ("uncond", "bicubic"):
        img = np.asarray(Image.open(out / row / "a.png"))
        assert img.shape == (128, 128, 3)
        record = json.loads((out / row / "a.json").read_text())
        assert record["row"] == row and record["psnr_final_db"] >= CONSISTENT_DB and record["zoomldm_sha256"]
    assert "dB final" in capsys.readouterr().out
    assert cli.main(["superres", str(tmp_path / "a.png"), "--mag", "10x", "--zoomldm", str(folder), "--rows",
                     "bicubic", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("extra, size, message", [
    (["--mag", "10x"], (64, 80), "multiples of 64"),
    (["--mag", "20x"], (64, 64), "coarser than 20x"),
    (["--mag", "10x", "--rows", "gt"], (64, 64), "--slide"),
    (["--mag", "10x", "--rows", "nope"], (64, 64), "bad --rows"),
    (["--mag", "10x", "--rows", "uncond,bicubic", "--out-file"], (64, 64), "one file"),
])
@pytest.mark.slow
def test_superres_command_errors_are_one_line(tmp_path, capsys, extra, size, message):
    folder = require_shared("golden", "zoomldm_tiny")
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(tmp_path / "a.png")
    out = str(tmp_path / ("x.png" if "--out-file" in extra else "o"))
    extra = [e for e in extra if e != "--out-file"]
    rc = cli.main(["superres", str(tmp_path / "a.png"), "--zoomldm", str(folder), "--device", "cpu",
                   "--out", out] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error:") and message in err[-1], err


def test_row_names_of_the_command_are_the_library_rows():
    from zoomfeat.commands import superres as command

    assert command.ROWS == sr.ROWS


@pytest.mark.slow
def test_superres_command_gt_row_from_a_slide(tmp_path, synthetic_slide):
    folder = require_shared("golden", "zoomldm_tiny")
    slide = synthetic_slide(size=1024, label=0)
    Image.fromarray(lr_image(64, 64)).save(tmp_path / "a.png")
    out = tmp_path / "gt.png"
    assert cli.main(["superres", str(tmp_path / "a.png"), "--mag", "10x", "--zoomldm", str(folder), "--rows", "gt",
                     "--slide", str(slide.path), "--x", "0", "--y", "0", "--conditioner", "toy", "--steps", "1",
                     "--joint-iterations", "1", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["row"] == "gt" and np.asarray(Image.open(out)).shape == (128, 128, 3)
    assert record["psnr_final_db"] >= CONSISTENT_DB
