"""``zoomfeat sample`` and ``zoomfeat generate-large`` end to end on a synthetic slide (real OpenSlide, toy
conditioner, a small fitted ZoomLDM), exact regeneration from the manifest, and one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from helpers_generate import DATA
from helpers_slides import synthetic_slide  # noqa: F401  (pytest fixture)
from zoomfeat.generate.images import read_png

pytestmark = pytest.mark.usefixtures("one_thread", "generate_tiny")  # BASE names the fitted model's folder

BASE = ["--zoomldm", str(DATA), "--conditioner", "toy", "--mag", "10x", "--device", "cpu", "--batch-size", "4"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from zoomfeat.synthetic import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("gen_slide") / "gen.svs", size=2048, label=1, seed=3).path


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sample_run(slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "run"
    code = cli.main(["sample", *BASE, "--slide", str(slide), "--x", "512", "--y", "512", "--n", "3",
                     "--steps", "10", "--sampler", "plms", "--seed", "5", "--out", str(out)])
    assert code == 0
    return out


def test_sample_writes_images_sheet_and_manifest(sample_run):
    man = json.loads((sample_run / "manifest.json").read_text())
    files = sorted((sample_run / "images").glob("*.png"))
    assert [p.name for p in files] == ["p000_v000.png", "p000_v001.png", "p000_v002.png"]
    imgs = [read_png(p) for p in files]
    assert all(i.shape == (16, 16, 3) for i in imgs)
    assert not np.array_equal(imgs[0], imgs[1])  # different seeds, different variations
    sheet = read_png(sample_run / "contact_sheet.png")
    assert sheet.shape == (16 + 4, 3 * 16 + 4 * 2, 3)
    assert np.array_equal(sheet[2:18, 2:18], imgs[0])
    assert man["model"]["checkpoint_sha256"] == _sha(DATA / "weights.ckpt")
    assert man["model"]["config_sha256"] == _sha(DATA / "config.yaml")
    assert [e["seed"] for e in man["images"]] == [5, 6, 7]
    assert [e["sha256"] for e in man["images"]] == [_sha(p) for p in files]
    assert man["sampling"]["sampler"] == "plms" and man["sampling"]["steps"] == 10
    assert man["conditions"]["coords_level0"] == [[512, 512]] and man["conditions"]["mag"] == "10x"
    assert (sample_run / "sample.config.yaml").is_file()


def test_saved_conditions_are_the_toy_embeddings_of_the_20x_tiles(sample_run, slide):
    """Oracle: read the four 20x tiles under the 10x patch with OpenSlide and embed them with the toy encoder."""
    import openslide

    from zoomfeat.encoders import load_encoder

    with np.load(sample_run / "conditions.npz") as data:
        grids, coords = data["grids"], data["coords_level0"]
    assert grids.shape == (1, 32, 2, 2) and coords.tolist() == [[512, 512]]
    enc = load_encoder("toy", dim=32, seed=0)
    osl = openslide.OpenSlide(str(slide))
    tiles = [np.asarray(osl.read_region((512 + 256 * j, 512 + 256 * i), 0, (256, 256)).convert("RGB"))
             for i in range(2) for j in range(2)]
    osl.close()
    x = torch.from_numpy(np.stack(tiles).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        emb = enc(enc.preprocess(x)).numpy()  # [4, 32], row-major tiles
    assert np.allclose(grids[0].transpose(1, 2, 0).reshape(4, 32), emb, atol=1e-5)


def test_sample_regenerates_bit_identically_from_the_manifest(sample_run):
    from zoomfeat.generate.run import regenerate

    regenerated = regenerate(sample_run / "manifest.json")
    files = sorted((sample_run / "images").glob("*.png"))
    assert len(regenerated) == len(files)
    for img, path in zip(regenerated, files):
        assert np.array_equal(img, read_png(path))


def test_first_tissue_patch_and_several_patches(slide, tmp_path):
    out = tmp_path / "two"
    assert cli.main(["sample", *BASE, "--slide", str(slide), "--patches", "2", "--n", "1", "--steps", "10",
                     "--out", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    coords = np.array(man["conditions"]["coords_level0"])
    assert coords.shape == (2, 2) and (coords % 512 == 0).all()  # patches of the 10x lattice (512 level-0 px)
    assert len(man["images"]) == 2


def test_patches_from_a_tile_store(slide, tmp_path):
    """``--tiles``: the first tissue patches come from a `zoomfeat tile` store (oracle: the store's own rows)."""
    from zoomfeat.store import FeatureFile

    tiles = tmp_path / "tiles"
    assert cli.main(["tile", str(slide), "--mags", "20x,10x", "--out", str(tiles), "--no-progress"]) == 0
    out = tmp_path / "from_tiles"
    assert cli.main(["sample", *BASE, "--slide", str(slide), "--tiles", str(tiles), "--patches", "2", "--n", "1",
                     "--steps", "10", "--out", str(out)]) == 0
    with FeatureFile(tiles / f"{Path(slide).stem}.h5") as f:
        expected = f.coords("10x")[:2].tolist()
    man = json.loads((out / "manifest.json").read_text())
    assert man["conditions"]["coords_level0"] == expected and man["conditions"]["tiles_dir"] == str(tiles)


@pytest.mark.parametrize("method", ["joint", "grid"])
@pytest.mark.slow
def test_generate_large_end_to_end_and_regeneration(slide, tmp_path, method):
    from zoomfeat.generate.run import regenerate

    out = tmp_path / method
    assert cli.main(["generate-large", *BASE, "--slide", str(slide), "--method", method, "--steps", "5",
                     "--joint-iterations", "1", "--refine-t0", "100", "--seed", "1", "--out", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    large = read_png(out / "large.png")
    assert large.shape == (32, 32, 3)  # (20/10) x 16 px
    assert man["sampling"]["method"] == method and man["sampling"]["stride"] == 200
    if method == "joint":
        assert read_png(out / "guide.png").shape == (16, 16, 3)
        assert len(man["images"][0]["disagreement_per_step"]) == 5
        assert man["sampling"]["joint_update"] == "je" and man["images"][0]["joint_evaluations"] == 5 * (1 + 4 * 3)
    again = regenerate(out)
    assert np.array_equal(again[0], large)


def _error(argv, capsys) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_input_is_one_line(slide, tmp_path, capsys):
    out = str(tmp_path / "o")
    s = ["--slide", str(slide)]
    assert "does not exist" in _error(["sample", *BASE, "--slide", str(tmp_path / "nope.svs"), "--out", out], capsys)
    assert "magnification" in _error(["sample", *BASE[:4], "--mag", "7x", *s, "--out", out], capsys)
    assert "--x and --y" in _error(["sample", *BASE, *s, "--x", "0", "--out", out], capsys)
    assert "leaves the" in _error(["sample", *BASE, *s, "--x", "4096", "--y", "0", "--out", out], capsys)
    assert "--steps 3" in _error(["sample", *BASE, *s, "--steps", "3", "--out", out], capsys)
    assert "below 20x" in _error(["generate-large", *BASE[:4], "--mag", "20x", *s, "--out", out], capsys)
    assert "--conditioner" in _error(["sample", *BASE[:2], "--conditioner", "foo", "--mag", "10x", *s, "--out", out],
                                     capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.png").write_bytes(b"")
    assert "not an empty folder" in _error(["sample", *BASE, *s, "--out", str(tmp_path / "full")], capsys)
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.yaml").write_text((DATA / "config.yaml").read_text())
    assert "checkpoint" in _error(["sample", "--zoomldm", str(empty), *BASE[2:], *s, "--out", out], capsys)
    assert not Path(out).exists()  # nothing was written by any failed run


def test_regenerate_refuses_a_changed_checkpoint(sample_run, tmp_path):
    from zoomfeat.errors import CheckpointError
    from zoomfeat.generate.run import regenerate

    man = json.loads((sample_run / "manifest.json").read_text())
    man["model"]["checkpoint_sha256"] = "0" * 64
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "conditions.npz").write_bytes((sample_run / "conditions.npz").read_bytes())
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError):
        regenerate(copy)


def test_cli_choices_match_the_registries():
    from zoomfeat.commands import generate_large, sample
    from zoomfeat.generate.joint import JOINT_UPDATES
    from zoomfeat.generate.run import METHODS
    from zoomfeat.generate.samplers import sampler_names

    assert tuple(sorted(sample.SAMPLER_CHOICES)) == tuple(sampler_names())
    assert generate_large.JOINT_UPDATES == JOINT_UPDATES
    assert generate_large.METHODS == METHODS


@pytest.mark.slow
def test_images_above_4096_px_are_pyramidal_tiffs_openslide_opens(tmp_path):
    import openslide

    from zoomfeat.generate.images import save_large

    yy, xx = np.mgrid[0:4104, 0:4104]
    img = np.stack([(xx // 16) % 256, (yy // 16) % 256, ((xx + yy) // 32) % 256], axis=-1).astype(np.uint8)
    path = save_large(tmp_path / "big", img)
    assert path.suffix == ".tiff"
    osl = openslide.OpenSlide(str(path))
    try:
        assert osl.dimensions == (4104, 4104) and osl.level_count > 1
        assert json.loads(osl.properties["tiff.ImageDescription"])["magnification"] == 20.0
        region = np.asarray(osl.read_region((2000, 3000), 0, (64, 64)).convert("RGB")).astype(int)
    finally:
        osl.close()
    assert np.abs(region - img[3000:3064, 2000:2064].astype(int)).mean() < 4  # JPEG tiles, quality 90
    small = save_large(tmp_path / "small", img[:64, :64])
    assert small.suffix == ".png" and np.array_equal(read_png(small), img[:64, :64])


def test_a_registered_context_source_plugs_in_and_its_drawn_contexts_regenerate(tmp_path):
    """A source that draws contexts (as a CDM would) instead of reading grids: registered by name, used by
    run_sample, its contexts saved in conditions.npz and reused by regenerate."""
    from zoomfeat.generate.conditions import CONTEXT_SOURCES, ConditionRequest, Conditions, register_context_source
    from zoomfeat.generate.run import SampleConfig, regenerate, run_sample
    from zoomfeat.generate.samplers import SamplerSettings
    from zoomfeat.mags import parse_mag
    from zoomfeat.resolve import resolve_zoomldm

    @register_context_source("test-drawn")
    def drawn(model, request, runtime=None):
        g = torch.Generator().manual_seed(int(request.extra["seed"]))
        ctx = torch.randn(request.n_patches, 65, model.context_dim, generator=g)
        return Conditions(request.mag, ctx, None, None, {"source": "test-drawn", "seed": request.extra["seed"]})

    try:
        cfg = SampleConfig(resolve_zoomldm(DATA), ConditionRequest(mag=parse_mag("5x"), n_patches=2,
                                                                   extra={"seed": 4}),
                           tmp_path / "drawn", n=2, sampler=SamplerSettings("ddim", 10), device="cpu",
                           source="test-drawn")
        man = run_sample(cfg)
        with np.load(tmp_path / "drawn" / "conditions.npz") as data:
            assert data["contexts"].shape == (2, 65, 64) and "grids" not in data.files
        assert man["conditions"]["source"] == "test-drawn" and len(man["images"]) == 4
        for img, entry in zip(regenerate(tmp_path / "drawn"), man["images"]):
            assert np.array_equal(img, read_png(tmp_path / "drawn" / entry["file"]))
    finally:
        CONTEXT_SOURCES.pop("test-drawn", None)


# ----- manifest-first outputs, real/syn folders, several large images ------------------------------------------
def test_sample_resumes_an_interrupted_run_and_refuses_a_different_one(slide, sample_run, tmp_path, capsys):
    """A run whose last image never got written (as after a full disk): the rerun keeps the finished images and
    makes the missing one, identical to the uninterrupted run's; other settings in the same folder are refused."""
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(sample_run, out)
    man = json.loads((out / "manifest.json").read_text())
    assert all(e["status"] == "done" for e in man["images"])
    (out / "images" / "p000_v002.png").unlink()
    man["images"][2]["status"] = "pending"
    (out / "manifest.json").write_text(json.dumps(man))
    kept = (out / "images" / "p000_v000.png").stat().st_mtime_ns
    args = ["sample", *BASE, "--slide", str(slide), "--x", "512", "--y", "512", "--n", "3", "--steps", "10",
            "--sampler", "plms", "--seed", "5", "--out", str(out)]
    assert cli.main(args) == 0
    assert (out / "images" / "p000_v000.png").stat().st_mtime_ns == kept  # not redone
    assert _sha(out / "images" / "p000_v002.png") == _sha(sample_run / "images" / "p000_v002.png")
    assert json.loads((out / "manifest.json").read_text())["images"][2]["status"] == "done"
    args[args.index("--seed") + 1] = "6"
    assert cli.main(args) == 2
    assert "different run" in capsys.readouterr().err


def test_sample_write_real_gives_real_and_syn_folders(slide, tmp_path):
    from zoomfeat.mags import parse_mag
    from zoomfeat.slides import Slide

    out = tmp_path / "fid"
    assert cli.main(["sample", *BASE, "--slide", str(slide), "--patches", "2", "--n", "2", "--steps", "4",
                     "--write-real", "--out", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in (out / "syn").glob("*.png")) == [f"p{p:03d}_v{v:03d}.png" for p in range(2)
                                                                     for v in range(2)]
    assert sorted(p.name for p in (out / "real").glob("*.png")) == ["p000.png", "p001.png"]
    with Slide(slide) as s:  # the real patch under each condition, read here through OpenSlide
        for p, (x, y) in enumerate(man["conditions"]["coords_level0"]):
            assert np.array_equal(read_png(out / "real" / f"p{p:03d}.png"), s.read_patch(x, y, parse_mag("10x"), 16))
    assert all(e["status"] == "done" for e in man["images"])


def test_generate_large_n_seeds_from_one_load(slide, tmp_path):
    """--n 2 with --x/--y: one region, seeds 1 and 2; each image is the one a single run with that seed makes."""
    out = tmp_path / "two"
    common = [*BASE, "--slide", str(slide), "--x", "512", "--y", "512", "--method", "grid", "--steps", "3",
              "--no-refine"]
    assert cli.main(["generate-large", *common, "--n", "2", "--seed", "1", "--out", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert [(e["file"], e["seed"]) for e in man["images"]] == [("large_000.png", 1), ("large_001.png", 2)]
    assert man["sampling"]["refine_t0"] == 0
    single = tmp_path / "one"
    assert cli.main(["generate-large", *common, "--seed", "2", "--out", str(single)]) == 0
    assert np.array_equal(read_png(single / "large.png"), read_png(out / "large_001.png"))


def test_a_finished_joint_run_reruns_without_redoing_anything(slide, tmp_path, capsys):
    """The joint sampler adds its statistics to each finished image's manifest entry; a rerun of the same command
    (after a kill, or after it finished) must still see the same plan and resume, not refuse the folder, and keep
    those statistics (the chaos benchmark found both: a refused rerun, then a manifest that lost them)."""
    out = tmp_path / "joint"
    argv = ["generate-large", *BASE, "--slide", str(slide), "--method", "joint", "--steps", "2", "--no-refine",
            "--n", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert all("disagreement_per_step" in e for e in man["images"] if e["file"].startswith("large"))
    before = {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in out.glob("*.png")}
    manifest = (out / "manifest.json").read_bytes()
    capsys.readouterr()
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in out.glob("*.png")} == before
    assert (out / "manifest.json").read_bytes() == manifest  # the done items keep their statistics
