"""``zoomfeat generate-slide --cdm`` on the fitted test model (16-px patches) and a tiny CDM trained (train-cdm,
one step) on contexts of that model's Summarizer: a slide with no real counterpart opens in OpenSlide at 20x with
the nominal 0.5 mpp and the CDM's provenance, is the same file for the same seeds, and a CDM of another ZoomLDM
or of another magnification is refused with one line before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import cli
from helpers_generate import DATA

pytestmark = pytest.mark.usefixtures("one_thread", "generate_tiny")

TINY_DIT = ["--size", "DiT-S", "--depth", "1", "--hidden-size", "32", "--num-heads", "2"]
TRAIN = ["--batch-size", "4", "--workers", "0", "--accelerator", "cpu", "--devices", "1", "--max-steps", "1",
         "--every-n-steps", "1", "--log-every-n-steps", "1"]
# 5x -> 20x on a 128x64-px slide: 1x2 first-level (5x, 64-px) patches, 2 regions of 4x4 20x patches
FAST = ["--zoomldm", str(DATA), "--conditioner", "toy", "--levels", "5x,20x", "--steps", "1", "--refine-t0", "300",
        "--refine-stride", "300", "--window-stride", "4", "--decode-stride", "4", "--device", "cpu",
        "--batch-size", "16", "--compression", "deflate", "--tile", "64", "--cdm-steps", "2", "--size", "140,64"]


def _cdm_run(folder: Path, zoomldm_sha256: str, mags: tuple[str, ...]) -> Path:
    """A train-cdm run on 8 contexts of the fitted model's Summarizer (random 20x grids) at ``mags``, its store
    recording ``zoomldm_sha256`` as the ZoomLDM they came from (as prepare-cdm records it)."""
    import torch

    from zoomfeat.generate.conditions import contexts_for_mag
    from zoomfeat.mags import parse_mag
    from zoomfeat.model import load_zoomldm
    from zoomfeat.store.contexts import ContextWriter

    model = load_zoomldm(DATA, use_ema=True).eval()
    g = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for name in mags:
        mag = parse_mag(name)
        grids = torch.randn(8 // len(mags), model.conditioning_dim, mag.grid_width, mag.grid_width, generator=g)
        rows.append(contexts_for_mag(model, grids, mag).numpy())
        labels += [mag.index] * len(grids)
    contexts = np.concatenate(rows)
    store = folder / "contexts"
    writer = ContextWriter(store, settings=json.dumps({"zoomldm_weights_sha256": zoomldm_sha256}),
                           mags=np.array(labels, np.int64), source_shard=np.zeros(len(labels), np.int64),
                           source_row=np.arange(len(labels)), context_shape=contexts.shape[1:])
    writer.write(0, contexts)
    writer.commit()
    run = folder / "run"
    assert cli.main(["train-cdm", "--data", str(store), "--out", str(run), *TINY_DIT, *TRAIN]) == 0
    return run


@pytest.fixture(scope="module")
def cdm(tmp_path_factory) -> Path:
    from zoomfeat.resolve import file_sha256

    return _cdm_run(tmp_path_factory.mktemp("cdm"), file_sha256(DATA / "weights.ckpt"), ("5x",))


@pytest.fixture(scope="module")
def drawn(cdm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("drawn") / "new.tiff"
    assert cli.main(["generate-slide", *FAST, "--cdm", str(cdm), "--out", str(out), "--keep-parts"]) == 0
    return out


def test_a_drawn_slide_opens_at_20x_with_its_mpp_size_and_the_cdms_provenance(drawn, cdm):
    import openslide

    from zoomfeat.resolve import file_sha256
    from zoomfeat.slides import Slide

    with openslide.OpenSlide(str(drawn)) as slide:
        assert slide.level_dimensions == ((128, 64), (64, 32))  # 140 px rounded down to whole 64-px 5x patches
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        record = json.loads(slide.properties["tiff.ImageDescription"])
    with Slide(drawn) as slide:
        assert (slide.info.base_magnification, slide.info.base_mpp) == (20.0, 0.5)
    assert record["source_slide"] is None and record["drawn"]["contexts_drawn"] == 2
    assert record["drawn"]["cdm_sha256"] == file_sha256(cdm / "official" / "last.ckpt")
    assert record["drawn"]["cdm_trained_on_zoomldm_sha256"] == file_sha256(DATA / "weights.ckpt")
    assert "not the paper's" in record["drawn"]["rule"]
    assert record["settings"]["cdm_seed"] == 0 and record["settings"]["size"] == [140, 64]
    parts = Path(str(drawn) + ".parts")
    assert sorted(p.stem for p in parts.glob("*.npy")) == ["E1", "L0_r00000_c00000", "L1_r00000_c00000",
                                                           "L1_r00000_c00001", "cdm_contexts"]


def test_the_finer_level_is_conditioned_on_the_conditioners_embeddings_of_the_level_above(drawn):
    """E1 (the 20x grid that conditions the 20x level) is the toy conditioner on each 20x tile's 4x4 px of the 5x
    level as generated: recomputed here from the stored 5x latent with the model's decoder and the encoder."""
    import torch

    from zoomfeat.encoders import load_encoder
    from zoomfeat.model import load_zoomldm

    parts = Path(str(drawn) + ".parts")
    grid = np.load(parts / "E1.npy")
    assert grid.shape == (32, 4, 8) and np.isfinite(grid).all()
    model = load_zoomldm(DATA, use_ema=True).eval()
    latent = torch.from_numpy(np.load(parts / "L0_r00000_c00000.npy"))[None]  # [1, 3, 8, 16]: the 5x level
    with torch.no_grad():
        image = model.decode_first_stage(latent)  # the whole 5x level in one pass: 16x32 px
    pixels = (torch.clamp((image + 1) / 2, 0, 1) * 255).to(torch.uint8)[0]
    encoder = load_encoder("toy", dim=32, seed=0).eval()
    tile = pixels[:, 4:8, 8:12][None]  # 20x tile (1, 2): 4x4 px of the 5x level
    with torch.no_grad():
        expected = encoder(encoder.preprocess(tile))[0].numpy()
    # the run decodes the level with Gaussian-blended windows, so its pixels differ slightly from one pass's
    # decode: the grid entry nearest to the oracle's embedding must be tile (1, 2), and close to it
    flat = grid.reshape(32, -1).T
    distance = np.linalg.norm(flat - expected, axis=1)
    assert int(distance.argmin()) == 1 * 8 + 2, distance.round(3)  # row-major [D, 4, 8]
    spread = np.linalg.norm(flat - flat.mean(0), axis=1).mean()
    assert distance[1 * 8 + 2] < 0.25 * spread, (distance[1 * 8 + 2], spread)


def test_a_resumed_run_redraws_and_regenerates_into_the_same_file(drawn, cdm, tmp_path):
    """The parts of the first run less the drawn contexts, the embeddings of the 5x level and the last region:
    the run started again draws, embeds and samples them again and writes the same bytes."""
    import shutil

    again = tmp_path / "again.tiff"
    parts = Path(str(again) + ".parts")
    shutil.copytree(str(drawn) + ".parts", parts)
    for name in ("cdm_contexts", "E1", "L1_r00000_c00001"):
        (parts / f"{name}.npy").unlink()
    assert cli.main(["generate-slide", *FAST, "--cdm", str(cdm), "--out", str(again), "--keep-parts"]) == 0
    assert again.read_bytes() == drawn.read_bytes()
    for name in ("cdm_contexts", "E1", "L1_r00000_c00001"):
        assert (parts / f"{name}.npy").read_bytes() == Path(f"{drawn}.parts/{name}.npy").read_bytes()


def test_another_cdm_seed_gives_another_slide(drawn, cdm, tmp_path):
    other = tmp_path / "other.tiff"
    assert cli.main(["generate-slide", *FAST, "--cdm", str(cdm), "--cdm-seed", "1", "--out", str(other)]) == 0
    assert other.read_bytes() != drawn.read_bytes()


def test_a_cdm_of_another_zoomldm_or_magnification_is_refused_with_one_line(cdm, tmp_path, capsys):
    foreign = _cdm_run(tmp_path / "foreign", "0" * 64, ("5x",))
    cases = ((foreign, [], "another ZoomLDM"), (cdm, ["--levels", "1.25x,20x"], "never saw 1.25x"))
    for run, extra, expected in cases:
        out = tmp_path / "refused.tiff"
        capsys.readouterr()
        assert cli.main(["generate-slide", *FAST, "--cdm", str(run), *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
        assert not out.exists() and not Path(str(out) + ".parts").exists()  # nothing written


def test_bad_cdm_input_is_one_line(cdm, tmp_path, capsys):
    real = tmp_path / "real.svs"
    real.write_bytes(b"")
    for argv, expected in (
        (["--cdm", str(cdm), "--slide", str(real)], "drop --slide"),
        (["--cdm", str(cdm), "--size", "40,40"], "smaller than one 5x patch"),
        (["--cdm", str(cdm), "--size", "40"], "bad --size"),
        (["--cdm", str(tmp_path / "nowhere")], "not found"),
        (["--slide", str(real), "--cdm", str(cdm), "--region", "0,0,64,64"], "drop --slide, --region"),
    ):
        capsys.readouterr()
        code = cli.main(["generate-slide", *FAST, *argv, "--out", str(tmp_path / "x.tiff")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], (argv, err)
    size_only = [a for a in FAST]
    assert cli.main(["generate-slide", *size_only, "--out", str(tmp_path / "y.tiff")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--slide" in err[0] and "--cdm" in err[0], err
