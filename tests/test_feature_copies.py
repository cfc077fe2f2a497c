"""``zoomfeat feature-copies``: every synthetic tile equals a step-by-step computation through the model API;
copies are resumable, refused when settings change, partial copies keep real rows, pixel encoders decode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cli
from conftest import require_shared
from zoomfeat.store import FeatureFile

STEPS = 2


@pytest.fixture(scope="module")
def tiny():
    return require_shared("golden", "zoomldm_tiny")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny):
    from zoomfeat.synthetic import write_synthetic_slide

    root = tmp_path_factory.mktemp("syn")
    write_synthetic_slide(root / "slides" / "s1.svs", size=2048, seed=1, label=0)
    write_synthetic_slide(root / "slides" / "s2.svs", size=1024, seed=2, label=1)
    common = ["--device", "cpu", "--workers", "0", "--batch-size", "16"]
    assert cli.main(["extract", str(root / "slides"), "--out", str(root / "feats" / "zoomldm"), "--zoomldm", str(tiny),
                     "--conditioner", "toy", "--mags", "20x,5x", *common]) == 0
    assert cli.main(["extract", str(root / "slides"), "--out", str(root / "feats" / "toy20"), "--encoder", "toy",
                     "--mags", "20x", *common]) == 0
    return root


def _feature_copies(root, tiny, out, *extra):
    return cli.main(["feature-copies", "--features", str(root / "feats" / "zoomldm"), "--conditioning",
                     str(root / "feats" / "toy"), "--zoomldm", str(tiny), "--steps", str(STEPS), "--out", str(out),
                     "--device", "cpu", "--batch-size", "8", *extra])


@pytest.fixture(scope="module")
def copies(extracted, tiny):
    out = extracted / "syn"
    assert _feature_copies(extracted, tiny, out, "--copies", "2") == 0
    return out


def _direct_row(tiny, root, slide_id: str, copy: int, mag: str, row: int) -> np.ndarray:
    """One synthetic feature row through the model API alone: Summarizer context of the real grid, x_T from the
    tile's seed, ``m.sample`` (DDIM, guidance 2), then q_sample at the extraction timestep with the copy's seeded
    noise, U-Net to output_blocks[3], spatial mean."""
    from zoomfeat.extract.noise import seeded_noise
    from zoomfeat.mags import parse_mag
    from zoomfeat.model import load_zoomldm
    from zoomfeat.feature_copies import tile_seed

    m = load_zoomldm(tiny / "config.yaml", tiny / "weights.ckpt", use_ema=True).eval()
    with FeatureFile(root / "feats" / "zoomldm" / f"{slide_id}.h5") as f:
        x, y = f.coords(mag)[row]
        config = f.extractor_config
    with FeatureFile(root / "feats" / "toy" / f"{slide_id}.h5") as f:
        table = {tuple(c): v for c, v in zip(f.coords("20x"), f.features("20x"))}
        extra = f.extra("conditioning_extra_20x")
        if extra is not None:
            table.update({tuple(c): v for c, v in zip(*extra)})
    g, step = parse_mag(mag).grid_width, 256  # base 20x: a 20x tile is 256 level-0 px
    grid = np.stack([np.stack([table[(x + j * step, y + i * step)] for j in range(g)], -1) for i in range(g)], -2)
    with torch.no_grad():
        context = m.summarize([m.preprocess_ssl(torch.from_numpy(grid).float())],
                              torch.tensor([parse_mag(mag).index]))
        seed = tile_seed(0, slide_id, copy, mag, int(x), int(y))
        side = int(m.config.diffusion.image_size)
        x_T = torch.randn((int(m.latent_channels), side, side), generator=torch.Generator().manual_seed(seed))[None]
        z = m.sample(context, x_T, steps=STEPS, guidance=2.0, sampler="ddim")
        t = torch.full((1,), int(config["timestep"]), dtype=torch.long)
        noise = seeded_noise(f"{slide_id}~syn{copy}", mag, np.array([[x, y]]), tuple(z.shape[1:]))
        fmap = m.unet_features(m.q_sample(z, t, noise), t, context, block=int(config["block"]))
    return fmap.mean(dim=(2, 3))[0].numpy()


@pytest.mark.slow
def test_copies_have_the_real_grid_and_provenance(copies, extracted):
    for slide_id in ("s1", "s2"):
        with FeatureFile(extracted / "feats" / "zoomldm" / f"{slide_id}.h5") as f:
            real_grid, real = f.grid(), {m.name: f.features(m) for m in f.mags}
        per_copy = []
        for k in (0, 1):
            with FeatureFile(copies / f"{slide_id}~syn{k}.h5") as f:
                assert f.complete and f.slide_id == f"{slide_id}~syn{k}" and f.extractor == "zoomldm"
                record = f.extractor_config["synthetic"]
                assert record["synthetic_of"] == slide_id and record["copy"] == k and record["unit"] == "patch"
                made = record["made_from"]  # what the copy was made from, by sha256 (issue 37)
                assert made["features_sha256"] == _sha256(extracted / "feats" / "zoomldm" / f"{slide_id}.h5")
                assert made["conditioner"]["conditioning_sha256"] == _sha256(extracted / "feats" / "toy" /
                                                                             f"{slide_id}.h5")
                assert record["generation"]["steps"] == STEPS and record["generation"]["sampler"] == "ddim"
                for name in real_grid.names:
                    np.testing.assert_array_equal(f.coords(name), real_grid.coords[name])
                feats = {m.name: f.features(m) for m in f.mags}
            for name, value in feats.items():
                assert value.shape == real[name].shape and np.isfinite(value).all()
                assert not np.allclose(value, real[name])
            per_copy.append(feats)
        assert not np.allclose(per_copy[0]["20x"], per_copy[1]["20x"])  # fresh seeds per copy


@pytest.mark.parametrize("slide_id, copy, mag, row", [("s1", 1, "20x", 5), ("s1", 0, "5x", 1), ("s2", 0, "20x", 0)])
@pytest.mark.slow
def test_a_synthetic_row_equals_the_model_api_computation(copies, extracted, tiny, slide_id, copy, mag, row):
    with FeatureFile(copies / f"{slide_id}~syn{copy}.h5") as f:
        stored = f.features(mag)[row]
    expected = _direct_row(tiny, extracted, slide_id, copy, mag, row)
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.slow
def test_rerun_skips_and_changed_settings_are_refused(copies, extracted, tiny, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in copies.glob("*.h5")}
    assert _feature_copies(extracted, tiny, copies, "--copies", "2") == 0
    assert {p.name: p.stat().st_mtime_ns for p in copies.glob("*.h5")} == before
    capsys.readouterr()
    assert _feature_copies(extracted, tiny, copies, "--copies", "2", "--guidance", "3.0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "guidance" in err[0]
    assert {p.name: p.stat().st_mtime_ns for p in copies.glob("*.h5")} == before


@pytest.mark.slow
def test_partial_copy_keeps_the_other_rows_real(extracted, tiny):
    out = extracted / "syn_half"
    assert _feature_copies(extracted, tiny, out, "--fraction", "0.5", "--mags", "20x") == 0
    with FeatureFile(extracted / "feats" / "zoomldm" / "s1.h5") as f:
        real = f.features("20x")
    with FeatureFile(out / "s1~syn0.h5") as f:
        syn = f.features("20x")
        assert f.mags == (20.0,) and f.mags[0].name == "20x"
    same = np.all(syn == real, axis=1)
    assert same.sum() == len(real) - round(0.5 * len(real))


@pytest.mark.slow
def test_pixel_encoder_features_come_from_decoded_tiles(extracted, tiny):
    out = extracted / "syn_toy"
    argv = ["feature-copies", "s2", "--features", str(extracted / "feats" / "toy20"), "--conditioning",
            str(extracted / "feats" / "toy"), "--zoomldm", str(tiny), "--steps", "2", "--out", str(out),
            "--device", "cpu"]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.glob("*.h5")) == ["s2~syn0.h5"]
    with FeatureFile(out / "s2~syn0.h5") as f, FeatureFile(extracted / "feats" / "toy20" / "s2.h5") as r:
        assert f.extractor == "toy" and f.features("20x").shape == r.features("20x").shape
        assert np.isfinite(f.features("20x")).all()
        assert json.dumps(f.extractor_config["synthetic"]["generation"]["seed_rule"])


@pytest.mark.parametrize("extra, fragment", [(["--fraction", "0"], "--fraction"), (["--copies", "0"], "--copies")])
def test_bad_options_are_one_line_errors(extracted, tiny, tmp_path, capsys, extra, fragment):
    assert _feature_copies(extracted, tiny, tmp_path / "o", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_same_seed_same_copy_another_seed_another(copies, extracted, tiny):
    """A fresh run with the same seed reproduces a copy bit for bit (also when it is restricted to one slide and
    one magnification: the seed of a tile depends on its identity only); ``--seed 1`` gives other tiles."""
    runs = {}
    for seed in (0, 1):
        out = extracted / f"syn_seed{seed}"
        assert _feature_copies(extracted, tiny, out, "s2", "--mags", "20x", "--seed", str(seed)) == 0
        with FeatureFile(out / "s2~syn0.h5") as f:
            runs[seed] = f.features("20x")
    with FeatureFile(copies / "s2~syn0.h5") as f:
        np.testing.assert_array_equal(runs[0], f.features("20x"))
    assert not np.allclose(runs[0], runs[1])


# ----- --unit slide: whole synthetic slides (generate-slide's cascade), extracted like the real ones -----------
SLIDE_FAST = ["--unit", "slide", "--levels", "5x,20x", "--steps", "2", "--refine-t0", "300", "--refine-stride", "150",
              "--window-stride", "4", "--decode-stride", "4", "--device", "cpu", "--batch-size", "16"]


@pytest.fixture(scope="module")
def slide_cohort(tmp_path_factory, generate_tiny):
    """Six 1024-px slides (two classes), ZoomLDM features of the fitted 16-px model at 20x (toy conditioner),
    labels and three folds."""
    import pandas as pd

    from zoomfeat.synthetic import write_synthetic_slide

    root = tmp_path_factory.mktemp("slide_unit")
    for i in range(6):
        write_synthetic_slide(root / "slides" / f"c{i}.svs", size=1024, seed=10 + i, label=i % 2)
    pd.DataFrame({"case_id": [f"c{i}" for i in range(6)], "slide_id": [f"c{i}" for i in range(6)],
                  "label": [i % 2 for i in range(6)]}).to_csv(root / "labels.csv", index=False)
    assert cli.main(["extract", str(root / "slides"), "--out", str(root / "feats" / "zoomldm"), "--zoomldm",
                     str(generate_tiny), "--conditioner", "toy", "--mags", "20x", "--device", "cpu", "--workers", "0",
                     "--batch-size", "16"]) == 0
    assert cli.main(["splits", "make", "--labels", str(root / "labels.csv"), "--out", str(root / "splits"),
                     "--folds", "3", "--mode", "kfold", "--seed", "0"]) == 0
    return root


def _slide_copies(root, model, out, *extra):
    return cli.main(["feature-copies", "--features", str(root / "feats" / "zoomldm"), "--conditioning",
                     str(root / "feats" / "toy"), "--zoomldm", str(model), "--out", str(out), *SLIDE_FAST, *extra])


@pytest.fixture(scope="module")
def slide_copies(slide_cohort, generate_tiny):
    out = slide_cohort / "syn_slide"
    assert _slide_copies(slide_cohort, generate_tiny, out) == 0
    return out


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_slide_unit_copies_are_extracted_synthetic_slides_with_their_provenance(slide_copies, slide_cohort,
                                                                                generate_tiny):
    import openslide

    for i in range(6):
        real_file = slide_cohort / "feats" / "zoomldm" / f"c{i}.h5"
        with FeatureFile(real_file) as f:
            real_config, real_n = f.extractor_config, len(f.coords("20x"))
        view = slide_copies / "slides" / f"c{i}~syn0.tiff"
        with openslide.OpenSlide(str(view)) as slide:  # the 20x view: 1024 px as the real slide, mpp 0.5
            assert slide.dimensions == (1024, 1024) and float(slide.properties["openslide.mpp-x"]) == 0.5
        with openslide.OpenSlide(str(slide_copies / "slides" / f"c{i}~syn0.generated.tiff")) as slide:
            assert slide.dimensions == (64, 64)  # 4x4 patches of the 16-px model
        with FeatureFile(slide_copies / f"c{i}~syn0.h5") as f:
            assert f.complete and f.slide_id == f"c{i}~syn0" and f.extractor == "zoomldm"
            assert f.attrs["slide_path"] == str(view)
            feats, config = f.features("20x"), f.extractor_config
        assert 0 < len(feats) <= 16 and abs(len(feats) - real_n) <= 4 and np.isfinite(feats).all()
        record = config.pop("synthetic")
        assert config == real_config  # featurised with the feature set's own settings
        made = record["made_from"]
        assert record["unit"] == "slide" and record["synthetic_of"] == f"c{i}" and made["unit"] == "slide"
        assert made["features_sha256"] == _sha256(real_file) and made["features_file"] == f"c{i}.h5"
        assert made["zoomldm_checkpoint_sha256"] == _sha256(generate_tiny / "weights.ckpt")
        assert made["zoomldm_config_sha256"] == _sha256(generate_tiny / "config.yaml")
        assert made["conditioner"] == {"conditioner": "toy", "toy_seed": 0, "weights_sha256": None}
    assert cli.main(["verify", str(slide_copies)]) == 0


def test_the_20x_view_repeats_every_generated_pixel(slide_copies):
    import tifffile

    with tifffile.TiffFile(slide_copies / "slides" / "c0~syn0.generated.tiff") as tif:
        generated = tif.pages[0].asarray()
    with tifffile.TiffFile(slide_copies / "slides" / "c0~syn0.tiff") as tif:
        view = tif.pages[0].asarray()
    np.testing.assert_array_equal(view, np.kron(generated, np.ones((16, 16, 1), np.uint8)))


def test_train_mil_augments_with_slide_copies(slide_copies, slide_cohort, tmp_path):
    import pandas as pd

    out = tmp_path / "run"
    assert cli.main(["train-mil", "--task", "custom", "--label-col", "label", "--labels",
                     str(slide_cohort / "labels.csv"), "--splits", str(slide_cohort / "splits"), "--features",
                     f"{slide_cohort / 'feats' / 'zoomldm'}@20x", "--model", "abmil", "--epochs", "2", "--seed", "0",
                     "--augment", str(slide_copies), "--out", str(out)]) == 0
    for fold in range(3):
        metrics = json.loads((out / f"fold_{fold}" / "metrics.json").read_text())
        assert metrics["augmentation"]["synthetic_added"] == metrics["augmentation"]["train_real"] == 4
        assert not pd.read_csv(out / f"fold_{fold}" / "predictions.csv").slide_id.str.contains("~syn").any()


def test_slide_unit_rerun_skips_resumes_one_copy_identically_and_refuses_other_settings(slide_copies, slide_cohort,
                                                                                       generate_tiny, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in slide_copies.glob("*.h5")}
    assert _slide_copies(slide_cohort, generate_tiny, slide_copies) == 0
    assert {p.name: p.stat().st_mtime_ns for p in slide_copies.glob("*.h5")} == before
    # a copy lost with its slides (as after a kill before anything of it was kept) is made again, bit for bit
    victim = slide_copies / "c3~syn0.h5"
    with FeatureFile(victim) as f:
        feats = f.features("20x")
    view = slide_copies / "slides" / "c3~syn0.tiff"
    tiff_bytes = view.read_bytes()
    for path in (victim, view, slide_copies / "slides" / "c3~syn0.generated.tiff"):
        path.unlink()
    assert _slide_copies(slide_cohort, generate_tiny, slide_copies) == 0
    with FeatureFile(victim) as f:
        np.testing.assert_array_equal(f.features("20x"), feats)
    assert view.read_bytes() == tiff_bytes
    assert {p.name: p.stat().st_mtime_ns for p in slide_copies.glob("*.h5") if p != victim} == \
        {k: v for k, v in before.items() if k != victim.name}
    capsys.readouterr()
    assert _slide_copies(slide_cohort, generate_tiny, slide_copies, "--guidance", "3.0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "guidance" in err[0]


def test_slide_unit_same_seed_same_copy_another_seed_another(slide_copies, slide_cohort, generate_tiny, tmp_path):
    runs = {}
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        assert _slide_copies(slide_cohort, generate_tiny, out, "c1", "--seed", str(seed)) == 0
        with FeatureFile(out / "c1~syn0.h5") as f:
            runs[seed] = f.features("20x")
    with FeatureFile(slide_copies / "c1~syn0.h5") as f:
        np.testing.assert_array_equal(runs[0], f.features("20x"))
    assert runs[0].shape != runs[1].shape or not np.allclose(runs[0], runs[1])


@pytest.mark.parametrize("extra, fragment", [(["--fraction", "0.5"], "--fraction"),
                                             (["--conditioner", "uni=/nonexistent"], "--conditioner"),
                                             (["--slide-dir", "/nonexistent"], "--slide-dir"),
                                             (["--levels", "5x"], "ending at 20x")])
def test_slide_unit_bad_options_are_one_line_errors(slide_cohort, generate_tiny, tmp_path, capsys, extra, fragment):
    assert _slide_copies(slide_cohort, generate_tiny, tmp_path / "o", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "o").exists()


def test_slide_options_without_the_slide_unit_are_refused(extracted, tiny, tmp_path, capsys):
    assert _feature_copies(extracted, tiny, tmp_path / "o", "--levels", "5x,20x") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--unit slide" in err[0]
