"""``zoomfeat extract`` with the tiny golden ZoomLDM: rows equal a step-by-step computation through the
model API, runs are reproducible, an interrupted run resumes to the same result, bad slides are listed."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest

from tests.conftest import require_shared

import torch  # noqa: E402  (a required dependency: imported, never skipped)
import h5py  # noqa: E402

import cli  # noqa: E402
from zoomfeat.mags import grid_width, mag_index  # noqa: E402

SIZE = 2048  # level-0 px at base 20x: 8 x 8 20x tiles, 2 x 2 5x patches


@pytest.fixture(scope="module")
def tiny():
    return require_shared("golden", "zoomldm_tiny")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    from zoomfeat.synthetic import write_synthetic_slide

    folder = tmp_path_factory.mktemp("slides")
    write_synthetic_slide(folder / "slide1.svs", size=SIZE, seed=1, label=0)
    write_synthetic_slide(folder / "slide2.svs", size=SIZE // 2, seed=2, label=1)  # smaller: fewer patches
    return folder


def _extract(slides, out, tiny, *extra):
    argv = ["extract", str(slides), "--out", str(out), "--zoomldm", str(tiny), "--conditioner", "toy",
            "--mags", "20x,5x", "--device", "cpu", "--batch-size", "7", "--workers", "0", *extra]
    return cli.main(argv)


def _features(out, slide_id="slide1"):
    with h5py.File(out / f"{slide_id}.h5", "r") as f:
        return {g: (f[g]["features"][:], f[g]["coords"][:]) for g in ("20x", "5x")}, dict(f.attrs)


@pytest.fixture(scope="module")
def clean_run(slides, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "zoomldm"
    assert _extract(slides, out, tiny) == 0
    return out


@functools.lru_cache(maxsize=1)
def _networks(tiny):
    from zoomfeat.encoders import load_encoder
    from zoomfeat.model import load_zoomldm

    m = load_zoomldm(tiny / "config.yaml", tiny / "weights.ckpt")
    return m, load_encoder("toy", dim=m.conditioning_dim, seed=0)


def _direct_feature(slide_path, tiny, mag, x, y, slide_id):
    """The feature of one patch computed step by step through the model API (no extraction code)."""
    import torch.nn.functional as F

    from zoomfeat.extract.noise import patch_seed
    from zoomfeat.slides import Slide

    m, enc = _networks(tiny)
    g = grid_width(mag)
    with Slide(slide_path) as s, torch.inference_mode():
        pixels = torch.tensor(s.read_patch(x, y, mag)).permute(2, 0, 1)[None].float()
        tiles = [s.read_patch(x + 256 * j, y + 256 * i, 20.0) for i in range(g) for j in range(g)]
        tiles = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
        grid = enc(enc.preprocess(tiles)).T.reshape(-1, g, g)  # [C, g, g], row-major tiles
        context = m.summarize([m.preprocess_ssl(grid)], torch.tensor([mag_index(mag)]))
        res = m.first_stage_resolution
        image = F.interpolate(pixels, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
        z = m.encode_first_stage(image / 127.5 - 1.0)
        gen = torch.Generator().manual_seed(patch_seed(slide_id, f"{mag:g}x", x, y))
        noise = torch.randn(z.shape[1:], generator=gen)[None]
        t = torch.tensor([50])
        fmap = m.unet_features(m.q_sample(z, t, noise), t, context, block=3)
    return fmap.mean(dim=(2, 3))[0].numpy(), grid


@pytest.mark.slow
def test_rows_equal_direct_computation_through_the_model_api(clean_run, slides, tiny):
    feats, attrs = _features(clean_run)
    assert attrs["extractor"] == "zoomldm"
    config = json.loads(attrs["extractor_config"])
    assert config["timestep"] == 50 and config["block"] == 3 and config["pooling"] == "mean"
    assert config["conditioner"] == "toy" and len(config["checkpoint_sha256"]) == 64
    rng = np.random.default_rng(0)
    for mag, name in ((20.0, "20x"), (5.0, "5x")):
        values, coords = feats[name]
        assert values.dtype == np.float32 and values.shape == (len(coords), values.shape[1])
        for row in rng.choice(len(coords), size=1, replace=False):
            expected, _ = _direct_feature(slides / "slide1.svs", tiny, mag, *coords[row], "slide1")
            np.testing.assert_allclose(values[row], expected, rtol=1e-4, atol=1e-5)


def test_conditioning_written_as_20x_feature_files_and_read_back(clean_run, slides, tiny, tmp_path):
    from zoomfeat.extract.conditioning_io import load_table

    cond_dir = clean_run.parent / "toy"  # default: <out>/../<conditioner>
    coords20, emb = load_table(cond_dir / "slide1.h5")
    feats, _ = _features(clean_run)
    lat = {tuple(c) for c in feats["5x"][1].tolist()}
    assert len(coords20) >= len(feats["20x"][1])  # kept 20x tiles plus background tiles under 5x patches
    assert len(coords20) == 16 * len(lat)
    from zoomfeat.store import verify_file

    assert verify_file(cond_dir / "slide1.h5") == [] and verify_file(clean_run / "slide1.h5") == []
    with h5py.File(cond_dir / "slide1.h5", "r") as f:
        assert f.attrs["extractor"] == "toy"
        np.testing.assert_array_equal(f["20x"]["coords"][:], feats["20x"][1])  # the same tiles as the features
    x, y = feats["5x"][1][0]
    _, grid = _direct_feature(slides / "slide1.svs", tiny, 5.0, x, y, "slide1")
    row = {tuple(c): i for i, c in enumerate(coords20.tolist())}[(x + 256, y + 512)]
    np.testing.assert_allclose(emb[row], grid[:, 2, 1].numpy(), rtol=1e-5, atol=1e-5)
    out = tmp_path / "again"  # read back: the 5x patches need the background tiles of the extra group
    assert _extract(slides / "slide1.svs", out, tiny, "--conditioning", str(cond_dir), "--mags", "5x") == 0
    with h5py.File(out / "slide1.h5", "r") as f:  # its own 5x grid: compare the patches both runs have
        again = {tuple(c): v for c, v in zip(f["5x"]["coords"][:].tolist(), f["5x"]["features"][:])}
    common = [i for i, c in enumerate(feats["5x"][1].tolist()) if tuple(c) in again]
    assert common
    for i in common:  # batches of another size: equal up to float rounding
        np.testing.assert_allclose(again[tuple(feats["5x"][1][i])], feats["5x"][0][i], rtol=1e-5, atol=1e-5)


def test_interrupted_run_resumes_to_the_clean_result(clean_run, slides, tiny, tmp_path, monkeypatch):
    """Slide 2 is killed mid-way, then redone: this second run of it gives bitwise the features of the clean
    run, and the finished slide 1 (copied from the clean run, as if an earlier run had done it) is skipped."""
    from zoomfeat.extract.zoomldm import ZoomLDMFeaturizer

    out = tmp_path / "zoomldm"
    for folder in ("zoomldm", "toy"):  # features and conditioning files of slide 1, fingerprints intact
        (tmp_path / folder).mkdir()
        shutil.copy2(clean_run.parent / folder / "slide1.h5", tmp_path / folder / "slide1.h5")
    real_call = ZoomLDMFeaturizer.__call__
    calls = {"n": 0}

    def killed(self, batch):
        if batch.slide_id == "slide2":
            calls["n"] += 1
            if calls["n"] == 2:  # after one batch of slide 2 was written to the temp file
                raise KeyboardInterrupt
        return real_call(self, batch)

    monkeypatch.setattr(ZoomLDMFeaturizer, "__call__", killed)
    assert _extract(slides, out, tiny) == 130  # the CLI's exit code for an interrupt
    assert not (out / "slide2.h5").exists() and (out / "slide1.h5").exists()
    first_mtime = (out / "slide1.h5").stat().st_mtime_ns
    monkeypatch.setattr(ZoomLDMFeaturizer, "__call__", real_call)
    (out / ".slide2.h5.tmp99999").write_bytes(b"left by a kill -9")  # a stale temp file is cleaned up
    assert _extract(slides, out, tiny) == 0
    assert (out / "slide1.h5").stat().st_mtime_ns == first_mtime  # complete slide skipped
    for slide_id in ("slide1", "slide2"):
        a, _ = _features(clean_run, slide_id)
        b, _ = _features(out, slide_id)
        for name in ("20x", "5x"):
            np.testing.assert_array_equal(a[name][0], b[name][0])
    assert not [p for p in out.iterdir() if p.name.startswith(".") and "tmp" in p.name]


def test_bad_slide_listed_in_errors_csv_while_others_finish(slides, tiny, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(slides / "slide1.svs", folder / "good.svs")
    (folder / "broken.svs").write_bytes(b"not a slide at all")
    out = tmp_path / "zoomldm"
    assert _extract(folder, out, tiny, "--mags", "5x") == 1
    assert (out / "good.h5").exists() and not (out / "broken.h5").exists()
    assert "broken" in (out / "errors.csv").read_text()


def test_changed_settings_in_the_same_out_dir_are_refused(clean_run, slides, tiny, capsys):
    assert _extract(slides, clean_run, tiny, "--timestep", "10") == 2
    assert "extractor_config.timestep" in capsys.readouterr().err


def test_20x_read_once_gives_bitwise_the_features_of_a_second_read(clean_run, slides, tiny, tmp_path):
    """The clean run computed its 20x features from the conditioning pass's pixels; re-reading the 20x tiles
    with the conditioning read back from its file gives bitwise the same rows."""
    out = tmp_path / "reread"
    assert _extract(slides / "slide1.svs", out, tiny, "--conditioning", str(clean_run.parent / "toy")) == 0
    a, _ = _features(clean_run)
    b, _ = _features(out)
    for name in ("20x", "5x"):
        np.testing.assert_array_equal(a[name][1], b[name][1])
        np.testing.assert_array_equal(a[name][0], b[name][0])
