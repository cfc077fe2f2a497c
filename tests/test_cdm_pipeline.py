"""CDM end to end on a tiny set: prepare-train -> prepare-cdm -> train-cdm -> sample_contexts, all real
(pyramidal SVS read by OpenSlide, HDF5 stores, Lightning loops), plus resume and bad-input behaviour."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import cli
from zoomfeat.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_DIT = ["--size", "DiT-S", "--depth", "1", "--hidden-size", "32", "--num-heads", "2"]
RUNTIME = ["--batch-size", "4", "--workers", "0", "--accelerator", "cpu", "--devices", "1", "--log-every-n-steps", "1"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from zoomfeat.synthetic import write_cohort

    return write_cohort(tmp_path_factory.mktemp("cdm_cohort"), n=2, size=2048, seed=5)


@pytest.fixture(scope="module")
def trainset(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cdm_trainset")
    assert cli.main(["prepare-train", str(cohort), "--out", str(out), "--conditioner", "toy", "--zoomldm", "tiny",
                     "--mags", "20x,5x", "--max-patches-per-mag", "2", "--batch-size", "16"]) == 0
    return out


@pytest.fixture(scope="module")
def zoomldm_weights(tmp_path_factory) -> Path:
    """A random tiny ZoomLDM saved in the official layout (its Summarizer makes the contexts)."""
    from zoomfeat.model import build_zoomldm
    from zoomfeat.resolve import tiny_config_path

    torch.manual_seed(11)
    return build_zoomldm(tiny_config_path()).save_official(tmp_path_factory.mktemp("zoomldm") / "tiny.ckpt")


@pytest.fixture(scope="module")
def contexts(trainset, zoomldm_weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cdm_contexts")
    assert cli.main(["prepare-cdm", "--data", str(trainset), "--zoomldm", "tiny", "--weights", str(zoomldm_weights),
                     "--out", str(out), "--batch-size", "4", "--workers", "1", "--device", "cpu"]) == 0
    return out


def _summarizer_reference(trainset: Path, weights: Path, shard: str, mag: str, row: int) -> np.ndarray:
    """The context of one stored patch computed directly with the model API (the oracle)."""
    from zoomfeat.mags import parse_mag
    from zoomfeat.model import load_zoomldm
    from zoomfeat.resolve import tiny_config_path

    model = load_zoomldm(tiny_config_path(), weights, use_ema=False)
    with h5py.File(trainset / "shards" / shard, "r") as f:
        grid = torch.from_numpy(f[mag]["grids"][row].astype(np.float32))
    with torch.no_grad():
        return model.summarize([model.preprocess_ssl(grid)], torch.tensor([parse_mag(mag).index]))[0].numpy()


@pytest.mark.slow
def test_prepare_cdm_stores_the_summarizer_output_of_every_patch(contexts, trainset, zoomldm_weights):
    from zoomfeat.mags import MAGNIFICATIONS, mag_name

    with h5py.File(contexts / "contexts.h5", "r") as f:
        assert f.attrs["complete"] and f["contexts"].shape[1:] == (65, 64)
        mags, shards, rows = f["mags"][()], f["source_shard"][()], f["source_row"][()]
        stored = f["contexts"][()]
    with h5py.File(trainset / "index.h5", "r") as f:
        names = [s.decode() if isinstance(s, bytes) else s for s in f["shards"][()]]
        total = int(f["counts"][()].sum())
    assert len(stored) == total == 8  # 2 slides x 2 mags x 2 patches
    assert np.bincount(mags).tolist() == [4, 0, 4]
    for k in (0, 5, 7):  # rows of both magnifications and slides
        mag = mag_name(MAGNIFICATIONS[mags[k]])
        expected = _summarizer_reference(trainset, zoomldm_weights, names[shards[k]], mag, int(rows[k]))
        np.testing.assert_allclose(stored[k], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_prepare_cdm_resumes_an_interrupted_store_and_refuses_mixed_inputs(trainset, zoomldm_weights, contexts,
                                                                        tmp_path, monkeypatch, capsys):
    import zoomfeat.cdm.prepare as prepare

    argv = ["prepare-cdm", "--data", str(trainset), "--zoomldm", "tiny", "--weights", str(zoomldm_weights),
            "--out", str(tmp_path / "ctx"), "--batch-size", "2", "--workers", "0", "--device", "cpu"]
    real, calls = prepare._contexts, []

    def interrupted(*args):  # the third batch is interrupted
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(prepare, "_contexts", interrupted)
    assert cli.main(argv) == 130
    partial = tmp_path / "ctx" / ".contexts.h5.partial"
    with h5py.File(partial, "r") as f:
        assert int(f.attrs["rows_done"]) == 4 and not f.attrs.get("complete", False)
    monkeypatch.setattr(prepare, "_contexts", real)
    assert cli.main(argv) == 0 and not partial.exists()
    with h5py.File(tmp_path / "ctx" / "contexts.h5", "r") as a, h5py.File(contexts / "contexts.h5", "r") as b:
        np.testing.assert_allclose(a["contexts"][()], b["contexts"][()], rtol=1e-6, atol=1e-6)
    other = tmp_path / "other.ckpt"
    from zoomfeat.model import build_zoomldm
    from zoomfeat.resolve import tiny_config_path

    torch.manual_seed(12)
    build_zoomldm(tiny_config_path()).save_official(other)
    capsys.readouterr()
    assert cli.main([*argv[:6], str(other), *argv[7:]]) == 2  # the same --out from another checkpoint
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another set, checkpoint or precision" in err[0]


def _train(argv_extra: list[str], data: Path, out: Path) -> int:
    return cli.main(["train-cdm", "--data", str(data), "--out", str(out), *TINY_DIT, *RUNTIME, *argv_extra])


def test_train_cdm_writes_official_checkpoints_that_sample(contexts, tmp_path):
    from zoomfeat.cdm.sample import load_cdm, sample_contexts

    import signal

    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    assert _train(["--max-steps", "4", "--every-n-steps", "2", "--ema-decay", "0.5", "--lr", "1e-2"], contexts, out) == 0
    # Lightning may leave SIGINT ignored after fit; train-cdm restores what it found (a later Ctrl-C must work)
    assert signal.getsignal(signal.SIGINT) is before
    official = sorted(p.name for p in (out / "official").iterdir())
    assert official == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"]
    ckpt = torch.load(out / "official" / "last.ckpt", weights_only=True)
    assert set(ckpt) == {"model", "ema", "opt", "args"} and set(ckpt["model"]) == set(ckpt["ema"])
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])
    assert (out / "train-cdm.config.yaml").is_file()
    assert "train/vb" in (out / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    cdm = load_cdm(out)  # the run folder: architecture from train_cdm_config.json, EMA weights, strict
    assert cdm.cfg.depth == 1 and cdm.cfg.in_channels == 64 and cdm.context_shape == (65, 64)
    from zoomfeat.model.checkpoint import check_keys

    check_keys(cdm.dit, ckpt["ema"], "ema")
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in cdm.dit.state_dict().items())
    from_file = load_cdm(out / "official" / "step_0000002.ckpt")  # a file: the architecture from its "args"
    assert from_file.cfg == cdm.cfg
    raw = load_cdm(out / "official" / "last.ckpt", use_ema=False)
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in raw.dit.state_dict().items())
    a = sample_contexts(cdm, "10x", 5, steps=4, seed=3)
    b = sample_contexts(cdm, "10x", 5, steps=4, seed=3, batch_size=2)
    assert a.shape == (5, 65, 64) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the seed decides, not the batching
    with pytest.raises(ConfigError, match="label dropout"):
        sample_contexts(cdm, "10x", 2, guidance=1.75)


def _lightning_state(path: Path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["state_dict"], ckpt["optimizer_states"][0], int(ckpt["global_step"])


def test_train_cdm_resumes_to_the_same_weights(contexts, tmp_path, capsys):
    common = ["--every-n-steps", "2", "--ema-decay", "0.9", "--lr", "5e-3", "--class-dropout-prob", "0.3"]
    assert _train(["--max-steps", "4", *common], contexts, tmp_path / "whole") == 0
    assert _train(["--max-steps", "2", *common], contexts, tmp_path / "part") == 0
    assert _train(["--max-steps", "4", *common], contexts, tmp_path / "part") == 0  # resume: auto
    a_state, a_opt, a_step = _lightning_state(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    b_state, b_opt, b_step = _lightning_state(tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert a_step == b_step == 4
    assert any(k.startswith("model.ema.") for k in a_state)  # the EMA shadows are resumed too
    for key, value in a_state.items():
        torch.testing.assert_close(b_state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for pid, entry in a_opt["state"].items():
        torch.testing.assert_close(b_opt["state"][pid]["exp_avg_sq"], entry["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    step2 = tmp_path / "whole" / "checkpoints" / "step_0000002.ckpt"  # an explicit step checkpoint, new folder
    assert _train(["--max-steps", "4", *common, "--resume", str(step2)], contexts, tmp_path / "from_step") == 0
    c_state, _, c_step = _lightning_state(tmp_path / "from_step" / "checkpoints" / "last.ckpt")
    assert c_step == 4
    for key, value in a_state.items():
        torch.testing.assert_close(c_state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    capsys.readouterr()
    assert _train(["--max-steps", "6", *common[:-2], "--class-dropout-prob", "0.5"], contexts, tmp_path / "part") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.class_dropout_prob" in err[0]  # another model: no mixed resume
    assert _train(["--max-steps", "6", *common, "--resume", "none"], contexts, tmp_path / "part") == 2
    assert "never overwritten" in capsys.readouterr().err


def _cosine_abar() -> np.ndarray:
    """abar_t of squaredcos_cap_v2 from the README formula (betas capped at 0.999)."""
    f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    i = np.arange(1000)
    return np.cumprod(1 - np.minimum(1 - f((i + 1) / 1000) / f(i / 1000), 0.999))


def test_guidance_on_magnification_follows_the_cfg_formula(contexts, tmp_path):
    """Two respaced steps (t = 999, then 0) by hand: x0 = x0_u + s (x0_c - x0_u) with the null label row,
    the DDIM update to abar_0, and the t = 0 prediction as the sample."""
    from zoomfeat.cdm.sample import load_cdm, sample_contexts

    out = tmp_path / "cfg"
    assert _train(["--max-steps", "3", "--every-n-steps", "3", "--class-dropout-prob", "0.5", "--lr", "2e-2",
                   "--ema-decay", "0"], contexts, out) == 0
    cdm = load_cdm(out)
    assert cdm.cfg.has_null_class and cdm.dit.y_embedder.embedding_table.weight.shape[0] == 9
    s, abar = 2.5, torch.tensor(_cosine_abar(), dtype=torch.float32)
    got = sample_contexts(cdm, "5x", 3, steps=2, guidance=s, seed=4)
    x = torch.randn((3, 64, 65), generator=torch.Generator().manual_seed(4))

    def guided_x0(x, t):
        tt = torch.full((3,), t)
        with torch.no_grad():
            c = cdm.dit(x, tt, torch.full((3,), 2))[:, :64]
            u = cdm.dit(x, tt, torch.full((3,), 8))[:, :64]  # the null row
        return u + s * (c - u)

    x0 = guided_x0(x, 999)
    eps = (x / abar[999].sqrt() - x0) / (1 / abar[999] - 1).sqrt()
    x = x0 * abar[0].sqrt() + (1 - abar[0]).sqrt() * eps
    torch.testing.assert_close(got, guided_x0(x, 0).transpose(1, 2), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, sample_contexts(cdm, "5x", 3, steps=2, guidance=1.0, seed=4))


def test_external_condition_from_slide_labels(trainset, zoomldm_weights, cohort, tmp_path):
    """prepare-cdm --labels: one-hot slide labels become the external condition p(z | c) of the CDM."""
    from zoomfeat.store.contexts import ContextSet
    from zoomfeat.cdm.sample import load_cdm, sample_contexts

    ctx = tmp_path / "ctx"
    assert cli.main(["prepare-cdm", "--data", str(trainset), "--zoomldm", "tiny", "--weights", str(zoomldm_weights),
                     "--out", str(ctx), "--labels", str(cohort / "labels.csv"), "--workers", "0",
                     "--device", "cpu"]) == 0
    store = ContextSet(ctx)
    assert store.cond_dim == len(store.cond_labels) == 2
    cond = np.stack([store.item(k)[2] for k in range(len(store))])
    assert (cond.sum(1) == 1).all() and set(cond.argmax(1)) == {0, 1}  # one slide per label here
    assert _train(["--max-steps", "2", "--every-n-steps", "2"], ctx, tmp_path / "run") == 0
    cdm = load_cdm(tmp_path / "run")
    assert cdm.cfg.cond_dim == 2 and "cond_embedder.weight" in cdm.dit.state_dict()
    a = sample_contexts(cdm, "20x", 2, steps=2, cond=torch.tensor([1.0, 0.0]))
    assert a.shape == (2, 65, 64)
    with pytest.raises(ConfigError, match="external vector of width 2"):
        sample_contexts(cdm, "20x", 2, steps=2)


@pytest.mark.parametrize("argv, fragment", [
    (["train-cdm", "--data", "/nonexistent/ctx", "--out", "{tmp}/r"], "ctx not found: pass --data"),
    (["train-cdm", "--data", "{tmp}", "--out", "{tmp}/r"], "contexts.h5 not found"),
    (["train-cdm", "--data", "{ctx}", "--out", "{tmp}/r", "--hidden-size", "30", "--num-heads", "4"],
     "not divisible"),
    (["train-cdm", "--data", "{ctx}", "--out", "{tmp}/r", "--set", "model.size=DiT-Q"], "not one of DiT-S"),
    (["train-cdm", "--data", "{ctx}", "--out", "{tmp}/r", "--set", "model.depht=2"], "unknown key model.depht"),
    (["prepare-cdm", "--data", "/nonexistent", "--zoomldm", "tiny", "--out", "{tmp}/c"], "is not a folder"),
    (["prepare-cdm", "--data", "{tmp}", "--zoomldm", "tiny", "--weights", "{tmp}/none.ckpt", "--out", "{tmp}/c"],
     "not found"),
    (["prepare-cdm", "--data", "{tmp}", "--zoomldm", "tiny", "--weights", "{w}", "--out", "{tmp}/c"],
     "index.h5 not found"),
])
def test_bad_input_is_one_line(argv, fragment, contexts, zoomldm_weights, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, ctx=contexts, w=zoomldm_weights) for a in argv]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_a_diverging_loss_stops_training_with_one_line(tmp_path, capsys):
    from zoomfeat.store.contexts import ContextWriter

    writer = ContextWriter(tmp_path / "huge", settings="h", mags=np.zeros(4, np.int64), source_shard=np.zeros(4),
                           source_row=np.arange(4), context_shape=(65, 8))
    writer.write(0, np.full((4, 65, 8), 3e38, np.float32))  # finite, but its square is not
    writer.commit()
    capsys.readouterr()
    assert _train(["--max-steps", "2", "--every-n-steps", "2"], tmp_path / "huge", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite CDM loss at step 0" in err[0]
    assert not (tmp_path / "run" / "official" / "last.ckpt").exists()


def test_store_rejects_non_finite_contexts_and_out_of_order_rows(tmp_path):
    from zoomfeat.store.contexts import ContextWriter

    w = ContextWriter(tmp_path, settings="s", mags=np.zeros(4, np.int64), source_shard=np.zeros(4),
                      source_row=np.arange(4), context_shape=(65, 8))
    with pytest.raises(DataError, match="non-finite"):
        w.write(0, np.full((2, 65, 8), np.nan, np.float32))
    with pytest.raises(DataError, match="in order"):
        w.write(2, np.zeros((2, 65, 8), np.float32))
    with pytest.raises(DataError, match="cannot commit"):
        w.commit()
    w.close()
    with pytest.raises(DataError, match="other settings"):
        ContextWriter(tmp_path, settings="t", mags=np.zeros(4, np.int64), source_shard=np.zeros(4),
                      source_row=np.arange(4), context_shape=(65, 8))


@pytest.mark.slow
def test_cdm_context_source_makes_novel_images_that_regenerate(contexts, zoomldm_weights, tmp_path):
    """The "cdm" source of zoomfeat.generate: contexts drawn by the CDM (no slide), ZoomLDM images from them,
    the CDM's sha256 and draw in the manifest, and regeneration bit-identical to the written PNGs."""
    import zoomfeat.cdm.source  # noqa: F401  (registers the source)
    from zoomfeat.cdm.sample import load_cdm, sample_contexts
    from zoomfeat.generate.conditions import ConditionRequest
    from zoomfeat.generate.guidance import Guidance
    from zoomfeat.generate.images import read_png
    from zoomfeat.generate.manifest import load_conditions
    from zoomfeat.generate.run import SampleConfig, regenerate, run_sample
    from zoomfeat.generate.samplers import SamplerSettings
    from zoomfeat.mags import parse_mag
    from zoomfeat.resolve import file_sha256, resolve_zoomldm

    run = tmp_path / "cdm"
    assert _train(["--max-steps", "2", "--every-n-steps", "2"], contexts, run) == 0
    request = ConditionRequest(mag=parse_mag("5x"), n_patches=2, extra={"cdm": run, "cdm_steps": 4, "cdm_seed": 9})
    cfg = SampleConfig(zoomldm=resolve_zoomldm("tiny", zoomldm_weights), conditions=request, out=tmp_path / "gen",
                       n=2, sampler=SamplerSettings("ddim", 2, Guidance(1.75)), source="cdm", device="cpu")
    manifest = run_sample(cfg)
    rec = manifest["conditions"]
    assert rec["source"] == "cdm" and rec["mag"] == "5x" and rec["contexts_drawn"] == 2
    assert rec["cdm_sha256"] == file_sha256(run / "official" / "last.ckpt")
    saved = load_conditions(tmp_path / "gen" / rec["file"])
    expected = sample_contexts(load_cdm(run), "5x", 2, steps=4, seed=9)
    np.testing.assert_allclose(saved["contexts"], expected.numpy(), rtol=1e-6, atol=1e-6)
    images = [read_png(tmp_path / "gen" / e["file"]) for e in manifest["images"]]
    assert len(images) == 4 and not np.array_equal(images[0], images[2])  # two contexts, two variations each
    for again, written in zip(regenerate(tmp_path / "gen"), images):
        np.testing.assert_array_equal(again, written)
    import zoomfeat.generate.run as gen_run

    wide = tmp_path / "wide"  # a CDM of 32-wide contexts cannot condition a 64-wide ZoomLDM
    from zoomfeat.store.contexts import ContextWriter

    writer = ContextWriter(wide, settings="w", mags=np.zeros(4, np.int64), source_shard=np.zeros(4),
                           source_row=np.arange(4), context_shape=(65, 32))
    writer.write(0, np.zeros((4, 65, 32), np.float32))
    writer.commit()
    assert _train(["--max-steps", "1", "--every-n-steps", "1"], wide, tmp_path / "wide_run") == 0
    bad = SampleConfig(zoomldm=cfg.zoomldm, out=tmp_path / "gen2", n=1, sampler=cfg.sampler, source="cdm",
                       device="cpu", conditions=ConditionRequest(mag=parse_mag("20x"),
                                                                 extra={"cdm": tmp_path / "wide_run"}))
    with pytest.raises(ConfigError, match="32-wide contexts but this ZoomLDM takes 64"):
        gen_run.run_sample(bad)


@pytest.mark.slow
def test_ddp_step_equals_the_averaged_gradients_of_both_ranks(contexts, tmp_path):
    """Two CPU ranks (ddp_spawn): one optimiser step equals AdamW on the mean of the two ranks' loss gradients,
    each rank with its own step-keyed batch and draws, computed here in one process."""
    from zoomfeat.cdm.config import OptimSection
    from zoomfeat.store.contexts import ContextSet
    from zoomfeat.cdm.data import ContextDataset, collate
    from zoomfeat.cdm.dit import DiTConfig
    from zoomfeat.cdm.module import CDM, CDMLightning
    from zoomfeat.train.dataset import StepBatchSampler
    from zoomfeat.train.module import step_generator

    out = tmp_path / "ddp"
    assert _train(["--max-steps", "1", "--every-n-steps", "1", "--lr", "1e-2", "--devices", "2",
                   "--strategy", "ddp_spawn", "--ema-decay", "0.5"], contexts, out) == 0
    got = torch.load(out / "official" / "last.ckpt", weights_only=True)
    torch.manual_seed(0)  # train-cdm seeds the init with data.seed (0)
    cfg = DiTConfig(in_channels=64, hidden_size=32, depth=1, num_heads=2)
    model = CDM(cfg, ema_decay=0.5)
    init = {k: v.clone() for k, v in model.dit.state_dict().items()}
    module = CDMLightning(model, OptimSection(lr=1e-2))
    store = ContextSet(contexts)
    data = ContextDataset(store)
    grads = []
    for rank in (0, 1):
        sampler = StepBatchSampler(store.by_mag(), 4, 0, rank=rank)
        batch = collate([data[k] for k in sampler.batch(0)])
        model.dit.zero_grad()
        module.losses(batch, step_generator(0, 0, rank))["loss"].mean().backward()
        grads.append([p.grad.clone() for p in model.dit.parameters() if p.requires_grad])
    opt = torch.optim.AdamW(model.dit.parameters(), lr=1e-2, weight_decay=0)
    for p, g0, g1 in zip([p for p in model.dit.parameters() if p.requires_grad], *grads):
        p.grad = (g0 + g1) / 2
    opt.step()
    model.update_ema()
    for key, value in model.dit.state_dict().items():
        torch.testing.assert_close(got["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)
        torch.testing.assert_close(got["ema"][key], 0.5 * init[key] + 0.5 * value, rtol=1e-4, atol=1e-6, msg=key)


def test_sample_cli_draws_novel_images_from_a_cdm(contexts, zoomldm_weights, tmp_path, capsys):
    """`zoomfeat sample --cdm RUN` (no slide): contexts from the CDM, images, manifest, saved config."""
    import json

    from zoomfeat.resolve import file_sha256

    run = tmp_path / "cdm"
    assert _train(["--max-steps", "2", "--every-n-steps", "2"], contexts, run) == 0
    base = ["sample", "--zoomldm", "tiny", "--weights", str(zoomldm_weights), "--mag", "5x", "--device", "cpu",
            "--steps", "2", "--n", "2"]
    out = tmp_path / "gen"
    assert cli.main([*base, "--cdm", str(run), "--patches", "3", "--cdm-steps", "4", "--cdm-seed", "2",
                     "--out", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    rec = man["conditions"]
    assert rec["source"] == "cdm" and rec["contexts_drawn"] == 3 and rec["cdm_steps"] == 4 and rec["cdm_seed"] == 2
    assert rec["cdm_sha256"] == file_sha256(run / "official" / "last.ckpt") and rec["mag"] == "5x"
    assert len(man["images"]) == 6 and (out / "contact_sheet.png").is_file()
    assert (out / "sample.config.yaml").is_file()
    capsys.readouterr()
    assert cli.main([*base, "--out", str(tmp_path / "none")]) == 2  # neither a slide nor a CDM
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--slide" in err[0] and "--cdm" in err[0]
    assert cli.main([*base, "--cdm", str(run), "--slide", str(run), "--out", str(tmp_path / "both")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cdm draws" in err[0]
    assert cli.main([*base, "--cdm", str(tmp_path / "nowhere"), "--out", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
