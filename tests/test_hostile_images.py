"""Hostile images: every PIL mode (1, L, LA, P, RGB, RGBA, I;16, I;16B, I, F, CMYK) read at its true range by the
one image reader, checked mode by mode against numpy conversions written here (16-bit scaled by 255/65535, alpha
composited on white, palettes expanded, CMYK by (255-C)(255-K)/255), and modes with no faithful conversion refused
in one line naming the mode and the file by every command that reads images (invert, superres, gen-metrics, tile,
info, extract), which then write nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import cli
from conftest import require_shared
from hostile import one_error, snapshot
from zoomfeat.errors import DataError
from zoomfeat.plain_images import pil_to_rgb, read_rgb

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.default_rng(7)
H, W = 64, 64
RGB8 = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
GREY8 = RNG.integers(0, 256, (H, W), dtype=np.uint8)
ALPHA8 = RNG.integers(0, 256, (H, W), dtype=np.uint8)
GREY16 = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
FLOAT = RNG.random((H, W), dtype=np.float32)
CMYK8 = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)


# ---- the numpy oracles (independent of the code under test) ----
def grey(g):
    return np.repeat(np.asarray(g, np.uint8)[..., None], 3, axis=2)


def from16(v):
    return np.rint(np.asarray(v, np.float64) / 65535.0 * 255.0).astype(np.uint8)


def on_white(c, a):
    c, a = np.asarray(c, np.float64), np.asarray(a, np.float64)[..., None]
    return np.rint(c * a / 255.0 + (255.0 - a)).astype(np.uint8)


def cmyk(x):
    x = x.astype(np.float64)
    return np.rint((255.0 - x[..., :3]) * (255.0 - x[..., 3:]) / 255.0).astype(np.uint8)


PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
INDICES = RNG.integers(0, 256, (H, W), dtype=np.uint8)
BITS = RNG.random((H, W)) > 0.5


def pil_cases():
    """mode -> (PIL image in that mode, expected uint8 RGB)."""
    p = Image.fromarray(INDICES, "L").convert("P")
    p.putpalette(PALETTE.ravel().tolist())
    p = Image.frombytes("P", (W, H), INDICES.tobytes())
    p.putpalette(PALETTE.ravel().tolist())
    i16b = Image.frombytes("I;16B", (W, H), GREY16.astype(">u2").tobytes())
    return {
        "1": (Image.fromarray(BITS), grey(np.where(BITS, 255, 0))),
        "L": (Image.fromarray(GREY8, "L"), grey(GREY8)),
        "LA": (Image.fromarray(np.stack([GREY8, ALPHA8], 2), "LA"), grey(on_white(GREY8[..., None], ALPHA8)[..., 0])),
        "P": (p, PALETTE[INDICES]),
        "RGB": (Image.fromarray(RGB8, "RGB"), RGB8),
        "RGBA": (Image.fromarray(np.dstack([RGB8, ALPHA8]), "RGBA"), on_white(RGB8, ALPHA8)),
        "I;16": (Image.fromarray(GREY16), grey(from16(GREY16))),
        "I;16B": (i16b, grey(from16(GREY16))),
        "I": (Image.fromarray(GREY16.astype(np.int32), "I"), grey(from16(GREY16))),
        "F": (Image.fromarray(FLOAT, "F"), grey(np.rint(FLOAT.astype(np.float64) * 255.0).astype(np.uint8))),
        "CMYK": (Image.fromarray(CMYK8, "CMYK"), cmyk(CMYK8)),
    }


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B", "I", "F", "CMYK"])
def test_every_pil_mode_is_read_at_its_true_range(mode):
    image, expected = pil_cases()[mode]
    assert image.mode == mode
    got = pil_to_rgb(image, "x.png")
    assert got.dtype == np.uint8 and got.shape == (H, W, 3)
    assert np.array_equal(got, expected)


def test_palette_transparency_is_composited_on_white():
    p = Image.frombytes("P", (W, H), INDICES.tobytes())
    p.putpalette(PALETTE.ravel().tolist())
    p.info["transparency"] = 5
    expected = PALETTE[INDICES].copy()
    expected[INDICES == 5] = 255
    assert np.array_equal(pil_to_rgb(p, "x.png"), expected)


def _files(tmp_path):
    """file name -> expected RGB, one per way a mode reaches a file (PNG, JPEG, PIL and tifffile TIFFs)."""
    cases = pil_cases()
    out = {}
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
        image, expected = cases[mode]
        image.save(tmp_path / f"png_{mode.replace(';', '')}.png")
        out[f"png_{mode.replace(';', '')}.png"] = expected
    for mode in ("I;16B", "I", "F", "CMYK"):
        image, expected = cases[mode]
        image.save(tmp_path / f"pil_{mode.replace(';', '')}.tif")
        out[f"pil_{mode.replace(';', '')}.tif"] = expected
    cases["CMYK"][0].save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as im:  # lossy: the oracle converts the decoded CMYK samples
        assert im.mode == "CMYK"
        out["cmyk.jpg"] = cmyk(np.asarray(im))
    rgb16 = RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    out["rgb16.tif"] = from16(rgb16)
    rgba16 = RNG.integers(0, 65536, (H, W, 4), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgba16.tif", rgba16, photometric="rgb", extrasamples=["unassalpha"])
    out["rgba16.tif"] = on_white(from16(rgba16[..., :3]), from16(rgba16[..., 3]))
    tifffile.imwrite(tmp_path / "grey16_deflate.tif", GREY16, compression="zlib")
    out["grey16_deflate.tif"] = grey(from16(GREY16))
    tifffile.imwrite(tmp_path / "miniswhite.tif", GREY8, photometric="miniswhite")
    out["miniswhite.tif"] = grey(255 - GREY8)
    cmap = RNG.integers(0, 65536, (3, 256), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "palette.tif", INDICES, photometric="palette", colormap=cmap)
    out["palette.tif"] = from16(cmap.T)[INDICES]
    tifffile.imwrite(tmp_path / "cmyk.tif", CMYK8, photometric="separated")
    out["cmyk.tif"] = cmyk(CMYK8)
    return out


def test_every_file_kind_is_read_at_its_true_range(tmp_path):
    for name, expected in _files(tmp_path).items():
        got = read_rgb(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (H, W, 3), name
        assert np.array_equal(got, expected), name


def _refused(tmp_path):
    """file name -> the words the one-line refusal must hold."""
    Image.fromarray(RGB8, "RGB").convert("LAB").save(tmp_path / "lab.tif")
    tifffile.imwrite(tmp_path / "float_range.tif", FLOAT * 4.0)
    tifffile.imwrite(tmp_path / "negative.tif", (GREY16.astype(np.int32) - 40000))
    tifffile.imwrite(tmp_path / "nan.tif", np.where(BITS, np.nan, FLOAT).astype(np.float32))
    tifffile.imwrite(tmp_path / "six.tif", RNG.integers(0, 256, (H, W, 6), dtype=np.uint8), photometric="rgb",
                     extrasamples=["unspecified"] * 3)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return {"lab.tif": "CIELAB", "float_range.tif": "outside 0..1", "negative.tif": "outside 0..65535",
            "nan.tif": "non-finite", "six.tif": "pixel layout", "junk.png": "not a readable image"}


def test_modes_without_a_faithful_conversion_are_refused_naming_mode_and_file(tmp_path):
    for name, words in _refused(tmp_path).items():
        with pytest.raises(DataError, match=words) as info:
            read_rgb(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="PIL mode 'HSV'"):
        pil_to_rgb(Image.fromarray(RGB8, "RGB").convert("HSV"), "hsv.png")


# ---- every command that reads images ----
def _commands(image, tmp_path):
    tiny = str(require_shared("golden", "zoomldm_tiny"))
    return {
        "invert": (["invert", str(image), "--mag", "5x", "--zoomldm", tiny, "--device", "cpu",
                    "--out", str(tmp_path / "o" / "g.h5")], 2),
        "superres": (["superres", str(image), "--mag", "10x", "--zoomldm", tiny, "--rows", "bicubic",
                      "--device", "cpu", "--out", str(tmp_path / "o" / "sr")], 2),
        "gen-metrics": (["gen-metrics", "--real", str(image.parent), "--fake", str(image.parent), "--metric",
                         "ssim", "--out", str(tmp_path / "o" / "m.csv")], 2),
        "info": (["info", str(image), "--mpp", "0.5"], 2),
        "tile": (["tile", str(image), "--out", str(tmp_path / "o" / "tiles"), "--mpp", "0.5", "--mags", "20x",
                  "--min-tissue", "0"], 1),
        "extract": (["extract", str(image), "--out", str(tmp_path / "o" / "feats"), "--encoder", "toy", "--mpp",
                     "0.5", "--mags", "20x", "--min-tissue", "0", "--device", "cpu"], 1),
    }


@pytest.mark.parametrize("command", ["invert", "superres", "gen-metrics", "info", "tile", "extract"])
@pytest.mark.parametrize("name", ["lab.tif", "float_range.tif", "negative.tif"])
def test_every_image_command_refuses_a_bad_mode_in_one_line(command, name, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    words = _refused(folder)[name]
    for other in set(_refused(folder)) - {name}:
        (folder / other).unlink()
    image = folder / name
    argv, code = _commands(image, tmp_path)[command]
    before = snapshot(folder)
    line = one_error(argv, capsys, code=code)
    assert name in line and words in line, line
    assert snapshot(folder) == before
    made = [p.name for p in tmp_path.joinpath("o").rglob("*") if p.is_file()] if (tmp_path / "o").exists() else []
    assert not [m for m in made if m.endswith((".h5", ".png", ".pt", ".ckpt"))], made  # records only, no outputs


def test_gen_metrics_reads_a_16_bit_copy_as_the_picture_it_is(tmp_path, capsys):
    """The issue's case: PSNR between a picture and the same picture at 16 bits must be the 8-bit PSNR."""
    real, fake8, fake16 = (tmp_path / n for n in ("real", "fake8", "fake16"))
    for f in (real, fake8, fake16):
        f.mkdir()
    for k in range(2):
        a = RNG.integers(0, 256, (H, W), dtype=np.uint8)
        b = np.clip(a.astype(int) + RNG.integers(-20, 21, (H, W)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(real / f"{k}.png")
        Image.fromarray(b).save(fake8 / f"{k}.png")
        Image.fromarray(b.astype(np.uint16) * 257).save(fake16 / f"{k}.png")  # v * 257: the exact 16-bit copy
    outputs = []
    for fake in (fake8, fake16):
        assert cli.main(["gen-metrics", "--real", str(real), "--fake", str(fake), "--metric", "psnr,ssim"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_tile_reads_every_mode_as_its_numpy_conversion(tmp_path):
    """tile on 16-bit, alpha, palette and CMYK files finds the same tiles as on the oracle's 8-bit RGB PNG."""
    import shutil

    import h5py

    up = lambda a: np.kron(a, np.ones((4, 4) + (1,) * (a.ndim - 2), a.dtype))  # noqa: E731  (256 px sides)
    cmap = RNG.integers(0, 65536, (3, 256), dtype=np.uint16)
    rgba16 = RNG.integers(0, 65536, (H, W, 4), dtype=np.uint16)
    kinds = {
        "grey16.png": (lambda p: Image.fromarray(up(GREY16)).save(p), grey(from16(up(GREY16)))),
        "cmyk.tif": (lambda p: tifffile.imwrite(p, up(CMYK8), photometric="separated"), cmyk(up(CMYK8))),
        "rgba16.tif": (lambda p: tifffile.imwrite(p, up(rgba16), photometric="rgb", extrasamples=["unassalpha"]),
                       on_white(from16(up(rgba16)[..., :3]), from16(up(rgba16)[..., 3]))),
        "palette.tif": (lambda p: tifffile.imwrite(p, up(INDICES), photometric="palette", colormap=cmap),
                        from16(cmap.T)[up(INDICES)]),
        "la.png": (lambda p: Image.fromarray(up(np.stack([GREY8, ALPHA8], 2)), "LA").save(p),
                   grey(on_white(up(GREY8)[..., None], up(ALPHA8))[..., 0])),
    }
    for name, (write, expected) in kinds.items():
        for sub in ("a", "b", "in_a", "in_b"):
            shutil.rmtree(tmp_path / sub, ignore_errors=True)
            (tmp_path / sub).mkdir()
        write(tmp_path / "in_a" / f"s{Path(name).suffix}")
        Image.fromarray(expected).save(tmp_path / "in_b" / "s.png")
        for inp, out in (("in_a", "a"), ("in_b", "b")):
            slide = next((tmp_path / inp).iterdir())
            assert cli.main(["tile", str(slide), "--out", str(tmp_path / out), "--mpp", "0.5", "--mags", "20x",
                             "--min-tissue", "0"]) == 0, name
        with h5py.File(tmp_path / "a" / "s.h5") as a, h5py.File(tmp_path / "b" / "s.h5") as b:
            datasets = []
            a.visititems(lambda key, obj: datasets.append(key) if isinstance(obj, h5py.Dataset) else None)
            assert datasets
            for key in datasets:
                assert np.array_equal(a[key][()], b[key][()]), (name, key)
