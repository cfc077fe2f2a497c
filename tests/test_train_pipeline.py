"""ZoomLDM training end to end on a tiny synthetic cohort: prepare-train -> Lightning training -> official export.

Everything is real (pyramidal SVS read by OpenSlide, HDF5 shards, Lightning loops) but tiny: two 2048-px
slides, the packaged tiny ZoomLDM (64-px images, [3, 16, 16] latents), a 32-d toy conditioner, a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import require_shared
from zoomfeat.errors import ConfigError
from zoomfeat.mags import PATCH_SIZE
from zoomfeat.train import TINY_ZOOMLDM_YAML
from zoomfeat.train.config import PrepareConfig, load_train_config
from zoomfeat.train.dataset import TrainingSet, collate
from zoomfeat.train.module import ZoomLDMLightning, step_generator
from zoomfeat.train.prepare import prepare_training_set, shard_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from zoomfeat.synthetic import write_cohort

    return write_cohort(tmp_path_factory.mktemp("cohort"), n=2, size=2048, seed=3)


def _prepare_cfg(cohort: Path, out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(slides=(cohort,), out=out, conditioner="toy", conditioner_weights=None,
                         zoomldm=TINY_ZOOMLDM_YAML, batch_size=16, **kw)


@pytest.fixture(scope="module")
def trainset(cohort, tmp_path_factory) -> Path:
    """Written through the CLI: `zoomfeat prepare-train COHORT --out DIR --conditioner toy --zoomldm tiny`."""
    from cli import main

    out = tmp_path_factory.mktemp("trainset")
    assert main(["prepare-train", str(cohort), "--out", str(out), "--conditioner", "toy", "--zoomldm", "tiny",
                 "--batch-size", "16"]) == 0
    return out


def _train_cfg(trainset: Path, out: Path, **overrides):
    values = {"model.zoomldm": "tiny", "data.path": trainset, "data.batch_size": 4, "data.workers": 0,
              "data.val_fraction": 0.1, "data.val_max_per_mag": 2, "data.steps_per_epoch": 4,
              "optim.lr": 2e-3, "optim.warmup_steps": 0, "trainer.out": out, "trainer.accelerator": "cpu",
              "trainer.devices": "1", "trainer.log_every_n_steps": 1, "validation.enabled": False}
    values.update(overrides)
    return load_train_config(values)


# -- prepare-train ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_prepare_counts_shapes_and_index(trainset):
    with h5py.File(trainset / "index.h5", "r") as f:
        counts = {k: int(v) for k, v in zip(["20x", "10x", "5x", "2.5x", "1.25x", "0.625x", "0.3125x",
                                               "0.15625x"], f["counts"][()].sum(axis=0))}
        assert f.attrs["grid_pool_to"] == 8 and "pooled" in f.attrs["grid_storage"]
        assert len(f["slide_ids"]) == 2 and f["counts"].shape == (2, 8)
    # 2048-px slides at 20x: tiles of 256, 512, 1024, 2048 px fit; 1.25x (4096 px) and coarser give nothing
    assert all(counts[m] > 0 for m in ("20x", "10x", "5x", "2.5x"))
    assert all(counts[m] == 0 for m in ("1.25x", "0.625x", "0.3125x", "0.15625x"))
    data = TrainingSet(trainset)
    assert data.latent_shape == (3, 16, 16) and data.grid_channels == 32
    shard = sorted((trainset / "shards").glob("*.h5"))[0]
    with h5py.File(shard, "r") as f:
        assert f["20x/latents"].dtype == np.float16 and f["20x/grids"].shape[1:] == (32, 1, 1)
        assert f["2.5x/grids"].shape[1:] == (32, 8, 8)
        assert f["5x/grids"].shape[1:] == (32, 4, 4)


def test_prepare_latents_and_grids_match_the_model_and_conditioner(trainset):
    import torch.nn.functional as F

    from zoomfeat.conditioning import ConditioningGrids
    from zoomfeat.encoders import load_encoder
    from zoomfeat.model import load_zoomldm
    from zoomfeat.slides import Slide

    shard = sorted((trainset / "shards").glob("*.h5"))[0]
    with h5py.File(shard, "r") as f:
        slide_path = Path(f.attrs["slide_path"])
        coords = f["5x/coords"][()]
        latent, grid = f["5x/latents"][0].astype(np.float32), f["5x/grids"][0].astype(np.float32)
    model = load_zoomldm(TINY_ZOOMLDM_YAML, None, use_ema=False)
    model.first_stage_model.load_state_dict(torch.load(trainset / "first_stage.pt", weights_only=True))
    with Slide(slide_path) as slide:
        pixels = slide.read_patch(int(coords[0, 0]), int(coords[0, 1]), 5.0, PATCH_SIZE)
        base_mag = slide.info.base_magnification
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        expected = model.encode_first_stage(x)[0].numpy()
    np.testing.assert_allclose(latent, expected, rtol=1e-2, atol=1e-2)
    grids = ConditioningGrids(slide_path, {"5x": coords[:1]}, load_encoder("toy", dim=32, seed=0), base_mag=base_mag)
    np.testing.assert_allclose(grid, grids.grid("5x", None, pool_to=8)[0], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_prepare_resumes_and_limits(cohort, trainset, tmp_path):
    shard = sorted((trainset / "shards").glob("*.h5"))[0]
    mtime = shard.stat().st_mtime_ns
    report = prepare_training_set(_prepare_cfg(cohort, trainset))
    assert shard.stat().st_mtime_ns == mtime and report.n_shards == 2  # finished slides are skipped
    limited = prepare_training_set(_prepare_cfg(cohort, tmp_path, max_patches_per_mag=2, mags=(20.0, 5.0)))
    assert limited.counts["20x"] == 4 and limited.counts["10x"] == 0 and 0 < limited.counts["5x"] <= 4
    assert shard_path(tmp_path, shard.stem).is_file()


# -- training --------------------------------------------------------------------------------------------

def _fixed_loss(model, trainset: Path) -> float:
    """Mean eps-MSE over a fixed set of patches with fixed t and noise (no context dropout)."""
    data = TrainingSet(trainset)
    rows = np.linspace(0, len(data) - 1, 16).astype(int)
    batch = collate([data[int(i)] for i in rows])
    module = ZoomLDMLightning(model, _dummy_optim(), _dummy_val())
    with torch.no_grad():
        return float(module.diffusion_loss(batch, step_generator(123, 0, 0), 0.0).mean())


def _dummy_optim():
    from zoomfeat.train.config import OptimSection
    return OptimSection()


def _dummy_val():
    from zoomfeat.train.config import ValidationSection
    return ValidationSection()


@pytest.mark.slow
def test_training_lowers_the_loss_validates_and_exports(trainset, tmp_path):
    from zoomfeat.model import load_zoomldm
    from zoomfeat.train.run import build_model, train

    cfg = _train_cfg(trainset, tmp_path / "run", **{
        "trainer.max_steps": 16, "trainer.every_n_steps": 8, "validation.enabled": True, "data.val_fraction": 0.3,
        "validation.sample_steps": 2, "validation.samples_per_mag": 2})
    initial = build_model(cfg).eval()
    start = _fixed_loss(initial, trainset)
    out = train(cfg)
    official = out / "official"
    assert sorted(p.name for p in official.iterdir()) == ["config.yaml", "last.ckpt", "step_0000008.ckpt",
                                                           "step_0000016.ckpt"]
    trained = load_zoomldm(official / "config.yaml", official / "last.ckpt", use_ema=False)  # strict
    end = _fixed_loss(trained, trainset)
    assert end < 0.8 * start, (start, end)
    before, after = initial.state_dict(), trained.state_dict()
    for prefix in ("model.diffusion_model.", "cond_stage_model."):  # both trained jointly
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    first_stage = torch.load(trainset / "first_stage.pt", weights_only=True)  # adopted from the set, frozen
    assert all(torch.equal(after[f"first_stage_model.{k}"], v) for k, v in first_stage.items())
    metrics = (next((out / "logs").glob("version_*")) / "metrics.csv").read_text().splitlines()[0]
    assert "val/loss_20x" in metrics and "val/loss_5x" in metrics
    assert any(p.name.endswith("_20x.png") for p in (out / "samples").iterdir())
    ema = load_zoomldm(official / "config.yaml", official / "last.ckpt", use_ema=True)
    assert int(ema.model_ema.num_updates) == 16


def _lightning_state(path: Path) -> tuple[dict, dict, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["state_dict"], ckpt["optimizer_states"][0], int(ckpt["global_step"])


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(trainset, tmp_path):
    from zoomfeat.train.run import train

    whole = train(_train_cfg(trainset, tmp_path / "whole", **{"trainer.max_steps": 4, "trainer.every_n_steps": 2}))
    from cli import main

    part = tmp_path / "part"  # the first half through the CLI, the same settings as flags
    assert main(["train", "--data", str(trainset), "--zoomldm", "tiny", "--out", str(part), "--max-steps", "2",
                 "--every-n-steps", "2", "--batch-size", "4", "--workers", "0", "--lr", "2e-3", "--warmup-steps",
                 "0", "--accelerator", "cpu", "--devices", "1", "--set", "validation.enabled=false",
                 "--set", "data.val_fraction=0.1", "--set", "data.val_max_per_mag=2",
                 "--set", "data.steps_per_epoch=4"]) == 0
    resumed = train(_train_cfg(trainset, tmp_path / "part", **{"trainer.max_steps": 4, "trainer.every_n_steps": 2}))
    a_state, a_opt, a_step = _lightning_state(whole / "checkpoints" / "last.ckpt")
    b_state, b_opt, b_step = _lightning_state(resumed / "checkpoints" / "last.ckpt")
    assert a_step == b_step == 4
    for key, value in a_state.items():
        torch.testing.assert_close(b_state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for pid, entry in a_opt["state"].items():
        torch.testing.assert_close(b_opt["state"][pid]["exp_avg_sq"], entry["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert float(b_opt["state"][pid]["step"]) == float(entry["step"]) == 4


def test_finetuning_needs_latents_from_the_same_first_stage(trainset, tmp_path):
    golden = require_shared("golden", "zoomldm_tiny")
    from zoomfeat.errors import DataError
    from zoomfeat.train.run import train

    cfg = _train_cfg(trainset, tmp_path / "ft", **{"model.zoomldm": golden, "model.init_from": golden / "weights.ckpt"})
    with pytest.raises(DataError, match="first stage"):
        train(cfg)


@pytest.mark.slow
def test_finetuning_from_golden_tiny_keeps_the_official_keys(cohort, tmp_path):
    golden = require_shared("golden", "zoomldm_tiny")
    from zoomfeat.train.run import train

    data = tmp_path / "data"
    prepare_training_set(PrepareConfig(slides=(cohort,), out=data, conditioner="toy", conditioner_weights=None,
                                       zoomldm=golden, mags=(20.0, 5.0), max_patches_per_mag=3))
    cfg = _train_cfg(data, tmp_path / "ft", **{"model.zoomldm": golden, "model.init_from": golden / "weights.ckpt",
                                                  "trainer.max_steps": 2, "trainer.every_n_steps": 2})
    out = train(cfg)
    reference = torch.load(golden / "weights.ckpt", map_location="cpu", weights_only=True)
    exported = torch.load(out / "official" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(exported) == set(reference)
    assert all(exported[k].shape == reference[k].shape for k in reference)
    changed = [k for k in reference if k.startswith("model.diffusion_model.")
               and not torch.equal(exported[k], reference[k])]
    assert changed  # the U-Net was trained
    frozen = [k for k in reference if k.startswith("first_stage_model.")]
    assert all(torch.equal(exported[k], reference[k]) for k in frozen)  # the first stage was not


@pytest.mark.slow
def test_prepare_needs_and_uses_base_mag_or_mpp_for_slides_without_metadata(tmp_path):
    """A generic TIFF with a bogus 352 um/px (no objective power) fails on its own line, then works with --mpp."""
    from cli import main
    from zoomfeat.synthetic import write_synthetic_slide

    slides = tmp_path / "slides"
    write_synthetic_slide(slides / "nometa.tiff", size=2048, fmt="tiff", mpp=352.8, seed=1)
    argv = ["prepare-train", str(slides), "--conditioner", "toy", "--zoomldm", "tiny", "--mags", "20x,5x",
            "--max-patches-per-mag", "2"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 1
    assert "--mpp" in (tmp_path / "a" / "errors.csv").read_text()
    assert main([*argv, "--out", str(tmp_path / "b"), "--mpp", "0.5"]) == 0
    saved = json.loads((tmp_path / "b" / "prepare_config.json").read_text())
    assert saved["mpp"] == 0.5 and saved["base_mag"] is None
    with h5py.File(tmp_path / "b" / "shards" / "nometa.h5", "r") as f:
        assert len(f["20x"]["coords"]) == 2 and len(f["5x"]["coords"]) == 2
    with pytest.raises(ConfigError, match="not both"):
        _prepare_cfg(slides, tmp_path / "c", base_mag=20.0, mpp=0.5)


def _cli_train(trainset: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(trainset), "--zoomldm", "tiny", "--out", str(out), "--max-steps", "2",
            "--every-n-steps", "2", "--batch-size", "4", "--workers", "0", "--lr", "2e-3", "--warmup-steps", "0",
            "--accelerator", "cpu", "--devices", "1", "--set", "validation.enabled=false", *extra]


@pytest.mark.slow
def test_resume_with_other_settings_is_refused_naming_the_keys(trainset, tmp_path, capsys):
    """A resume must keep what shaped the steps already taken (lr, batch size, ...); it may run longer."""
    from cli import main

    out = tmp_path / "run"
    assert main(_cli_train(trainset, out)) == 0
    record = (out / "train_config.json").read_bytes()
    last = (out / "checkpoints" / "last.ckpt").read_bytes()
    capsys.readouterr()
    for extra, key in ((("--lr", "1e-3"), "optim.lr 0.002 -> 0.001"), (("--batch-size", "2"), "data.batch_size 4 -> 2")):
        argv = _cli_train(trainset, out, "--max-steps", "4")
        argv[argv.index(extra[0]) + 1] = extra[1]
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and key in lines[0] and "Traceback" not in err, err
    assert main([*_cli_train(trainset, out), "--resume", "none"]) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert (out / "train_config.json").read_bytes() == record and (out / "checkpoints" / "last.ckpt").read_bytes() == last
    inputs = out / "train_inputs.json"
    real = inputs.read_text()
    inputs.write_text(json.dumps({**json.loads(real), "index_sha256": "0" * 64}))  # the run began on another set
    assert main(_cli_train(trainset, out, "--max-steps", "3")) == 2
    assert "inputs.index_sha256" in capsys.readouterr().err
    inputs.write_text(real)
    assert main([*_cli_train(trainset, out)[:-2], "--max-steps", "3", "--set", "validation.enabled=false"]) == 0
    assert json.loads((out / "train_config.json").read_text())["trainer"]["max_steps"] == 3  # longer is fine


def test_ctrl_c_in_train_prints_interrupted_and_exits_130(trainset, tmp_path, capsys, monkeypatch):
    import signal

    from cli import main

    def interrupt(self, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(ZoomLDMLightning, "training_step", interrupt)
    before = signal.getsignal(signal.SIGINT)
    assert main(_cli_train(trainset, tmp_path / "run")) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    assert signal.getsignal(signal.SIGINT) is before  # Lightning's SIG_IGN undone: the handler it found is back
    assert not [p for p in (tmp_path / "run").rglob("*") if ".tmp" in p.name]


@pytest.mark.slow
def test_train_output_has_no_third_party_noise(trainset, tmp_path):
    """A normal `zoomfeat train` run prints no Lightning tips, litlogger, eval-mode, pytree or GPU lines."""
    import os
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-m", "cli", *_cli_train(trainset, tmp_path / "run")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    third_party = re.compile(r"💡|litlogger|LitLogger|eval mode|pytree|LeafSpec|GPU available|TPU available|"
                             r"Trainer\.fit|[A-Za-z]+Warning:|warnings\.warn|rank_zero", re.IGNORECASE)
    noise = [line for line in (done.stderr + done.stdout).splitlines() if third_party.search(line)]
    assert not noise, noise


def test_summarizer_lr_scale_freezes_or_slows_the_summarizer_and_old_runs_resume(trainset, tmp_path, capsys):
    """--summarizer-lr-scale 0 trains the U-Net alone (the Summarizer stays at its initialisation, bit for bit);
    0.5 gives the Summarizer its own parameter group at half the lr; a run recorded before the setting existed
    resumes as the default (1), and asking for another value on resume is refused naming it."""
    from cli import main
    from zoomfeat.model import load_zoomldm

    frozen = tmp_path / "frozen"
    assert main([*_cli_train(trainset, frozen), "--seed", "5", "--summarizer-lr-scale", "0"]) == 0
    joint = tmp_path / "joint"
    assert main([*_cli_train(trainset, joint), "--seed", "5"]) == 0
    a = load_zoomldm(frozen / "official" / "config.yaml", frozen / "official" / "last.ckpt").state_dict()
    b = load_zoomldm(joint / "official" / "config.yaml", joint / "official" / "last.ckpt").state_dict()
    ckpt = torch.load(frozen / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    summarizer = [k for k in a if k.startswith("cond_stage_model.")]
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    assert summarizer and unet
    # the same seed starts both runs from the same weights: the joint run moved the Summarizer, the frozen one not
    assert any(not torch.equal(a[k], b[k]) for k in summarizer)
    assert len(ckpt["optimizer_states"][0]["param_groups"]) == 1
    from zoomfeat.train.run import build_model

    fresh = build_model(load_train_config({"model.zoomldm": "tiny", "data.path": trainset, "data.seed": 5,
                                           "trainer.out": tmp_path / "unused"})).state_dict()
    assert all(torch.equal(a[k], fresh[k]) for k in summarizer)
    assert any(not torch.equal(a[k], fresh[k]) for k in unet)

    half = tmp_path / "half"
    assert main([*_cli_train(trainset, half), "--summarizer-lr-scale", "0.5"]) == 0
    groups = torch.load(half / "checkpoints" / "last.ckpt", map_location="cpu",
                        weights_only=False)["optimizer_states"][0]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([2e-3, 1e-3])

    record = joint / "train_config.json"  # as a run recorded before the setting existed
    old = json.loads(record.read_text())
    del old["optim"]["summarizer_lr_scale"]
    record.write_text(json.dumps(old))
    capsys.readouterr()
    assert main([*_cli_train(trainset, joint, "--seed", "5"), "--max-steps", "3"]) == 0
    assert main([*_cli_train(trainset, joint, "--seed", "5"), "--max-steps", "4", "--summarizer-lr-scale", "0"]) == 2
    assert "optim.summarizer_lr_scale 1.0 -> 0.0" in capsys.readouterr().err


def test_loss_watch_stops_nan_exploded_and_collapsed_runs_only():
    """The rule, fed loss sequences: windows of 50 steps; trivial level 1 (a model that predicts no noise)."""
    from zoomfeat.errors import TrainingError
    from zoomfeat.train.module import LossWatch

    def run(values):
        watch = LossWatch(window=50)
        for step, value in enumerate(values):
            watch(float(value), step)

    rng = np.random.default_rng(0)
    healthy = np.concatenate([np.linspace(1.0, 0.05, 200), 0.05 + 0.02 * rng.random(800)])
    healthy[[300, 301, 650]] = 0.9  # single bad steps do not move a window's mean past 0.8
    run(healthy)
    run(np.full(400, 0.95))  # a run that has not learned yet is not stopped
    with pytest.raises(TrainingError, match=r"training loss is nan at step 7"):
        run([1.0] * 7 + [float("nan")])
    with pytest.raises(TrainingError, match=r"averaged 2e\+0?3 over steps 0-49, over 10x"):
        run(np.full(50, 2000.0))
    collapsed = np.concatenate([np.full(100, 0.3), np.full(50, 0.6), np.full(50, 0.98)])
    with pytest.raises(TrainingError) as info:
        run(collapsed)
    message = str(info.value)
    assert "averaged 0.98 over steps 150-199 after 0.3 over steps 0-49" in message
    assert "step_0000100 predate it" in message and "--grad-clip" in message and "\n" not in message


def test_a_diverging_run_stops_with_one_line_and_exports_nothing(trainset, tmp_path, capsys):
    """A learning rate that blows the tiny model up (loss 9e9 at the first step, NaN at the second): exit 2,
    one error line of its own after the progress bar, no checkpoint or official export of the NaN weights."""
    from cli import main

    out = tmp_path / "run"
    argv = _cli_train(trainset, out, "--max-steps", "20", "--every-n-steps", "1")
    argv[argv.index("--lr") + 1] = "1e3"
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "training loss is nan at step" in lines[0] and "Traceback" not in err, err
    step = int(lines[0].split("at step ")[1].split(":")[0])
    saved = sorted(p.name for p in (out / "checkpoints").glob("step_*.ckpt"))
    assert saved == [f"step_{k:07d}.ckpt" for k in range(1, step + 1)]  # every step before the NaN one
    for path in (out / "checkpoints").glob("step_*.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()), path


def test_a_saved_train_config_reruns_the_training(trainset, tmp_path):
    """`zoomfeat train` saves OUT/train.config.yaml (the generic config system); `train --config` of it trains
    the same run again: the same settings record and, bit for bit, the same official weights."""
    import yaml

    from cli import main

    first, again = tmp_path / "first", tmp_path / "again"
    assert main(_cli_train(trainset, first, "--seed", "3", "--set", "optim.p_uncond=0.3")) == 0
    saved = first / "train.config.yaml"
    config = yaml.safe_load(saved.read_text())
    assert config["command"] == "train" and config["data"]["seed"] == 3 and config["optim"]["p_uncond"] == 0.3
    assert main(["train", "--config", str(saved), "--out", str(again)]) == 0
    records = [json.loads((run / "train_config.json").read_text()) for run in (first, again)]
    assert records[0]["trainer"].pop("out") == str(first) and records[1]["trainer"].pop("out") == str(again)
    assert records[0] == records[1] and records[0]["optim"]["p_uncond"] == 0.3
    weights = [torch.load(run / "official" / "last.ckpt", map_location="cpu", weights_only=True)
               for run in (first, again)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_grad_clip_flag_reaches_the_trainer(trainset, tmp_path):
    from cli import main

    out = tmp_path / "run"
    assert main(_cli_train(trainset, out, "--grad-clip", "0.5")) == 0
    assert json.loads((out / "train_config.json").read_text())["optim"]["grad_clip"] == 0.5


def test_a_non_finite_gradient_stops_the_run_before_the_update(trainset, tmp_path, capsys, monkeypatch):
    """A finite loss whose backward overflows (here an op whose gradient is inf): stopped before the update."""
    from cli import main

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    real = ZoomLDMLightning.diffusion_loss

    def overflowing(self, batch, gen, p_uncond):
        loss = real(self, batch, gen, p_uncond)
        return InfGrad.apply(loss) if self.global_step == 1 else loss

    monkeypatch.setattr(ZoomLDMLightning, "diffusion_loss", overflowing)
    out = tmp_path / "run"
    assert main(_cli_train(trainset, out, "--max-steps", "4", "--every-n-steps", "1")) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "gradient is not finite at step 1" in lines[0], err
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*.ckpt")) == ["step_0000001.ckpt"]
