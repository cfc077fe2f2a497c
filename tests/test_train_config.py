"""Training config, sampling and schedule: fast unit tests (no model, no slides)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zoomfeat.errors import ConfigError
from zoomfeat.train import EXAMPLE_TRAIN_YAML, TINY_ZOOMLDM_YAML
from zoomfeat.resolve import zoomldm_config_path
from zoomfeat.train.config import load_train_config
from zoomfeat.train.dataset import StepBatchSampler, split_rows, val_batches


def _resolved(argv: list[str]):
    """``zoomfeat train ARGV`` through the generic config loader: (TrainConfig, resolved config)."""
    import cli
    from zoomfeat.commands.train import train_config

    args, _path, config = cli.resolve(["train", *argv])
    return train_config(args), config


def test_example_yaml_is_valid_and_overrides_win():
    cfg, config = _resolved(["--config", str(EXAMPLE_TRAIN_YAML)])
    assert cfg.optim.lr == 2e-5 and cfg.optim.weight_decay == 0.01 and cfg.optim.warmup_steps == 1000
    assert cfg.optim.p_uncond == 0.1 and cfg.data.mag_sampling == "uniform" and cfg.trainer.resume == "auto"
    assert cfg.data.path == Path("trainset") and cfg.data.workers == 4 and cfg.trainer.max_steps == 100000
    assert zoomldm_config_path(cfg.model.zoomldm) == TINY_ZOOMLDM_YAML
    assert config["command"] == "train" and config["optim"]["p_uncond"] == 0.1 and config["data"]["path"] == "trainset"
    cfg, _ = _resolved(["--config", str(EXAMPLE_TRAIN_YAML), "--set", "optim.lr=1e-3", "--set", "data.batch_size=2",
                        "--no-val-samples", "--set", "model.init_from=null", "--batch-size", "3"])
    assert cfg.optim.lr == 1e-3 and cfg.data.batch_size == 3 and cfg.validation.samples is False  # flag > --set


def test_config_show_train_prints_the_resolved_config(capsys):
    """`zoomfeat config show train` (refused before train used the generic loader): every section, defaults of
    the dataclasses (here written out as numbers), values from flags and --set."""
    import yaml

    import cli

    assert cli.main(["config", "show", "train", "--data", "ts", "--zoomldm", "tiny", "--lr", "1e-3",
                     "--set", "validation.guidance=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["command"] == "train"
    assert {"data", "model", "optim", "trainer", "validation"} <= set(shown)
    assert shown["data"]["path"] == "ts" and shown["model"]["zoomldm"] == "tiny" and shown["optim"]["lr"] == 1e-3
    assert shown["validation"]["guidance"] == 3.0 and shown["validation"]["samples"] is True
    assert shown["trainer"]["max_steps"] == 10000 and shown["optim"]["p_uncond"] == 0.1
    assert shown["trainer"]["out"] == "runs/zoomldm" and shown["model"]["init_from"] is None


@pytest.mark.parametrize("override, message", [
    ({"optim.lr": -1}, "optim.lr"),
    ({"data.mag_sampling": "random"}, "mag_sampling"),
    ({"optim.warmup_steps": "many"}, "optim.warmup_steps"),
    ({"optim.learning_rate": 1}, "unknown key optim.learning_rate"),
    ({"trainer.resume": "/no/such.ckpt"}, "trainer.resume"),
    ({"model.init_from": "/no/such.ckpt"}, "model.init_from"),
    ({"model.zoomldm": "/no/such/config.yaml"}, "not found"),
    ({"model.zoomldm": None}, "model.zoomldm is not set"),
    ({"validation.samples": "maybe"}, "boolean"),
    ({"optim.summarizer_lr_scale": -0.5}, "optim.summarizer_lr_scale -0.5 must be a finite number >= 0"),
    ({"optim.summarizer_lr_scale": float("nan")}, "optim.summarizer_lr_scale nan must be a finite number"),
    ({"optim.summarizer_lr_scale": float("inf")}, "optim.summarizer_lr_scale inf must be a finite number"),
    ({"lr": 1}, "bad key 'lr'"),
])
def test_bad_values_fail_up_front_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config({"model.zoomldm": "tiny", **override})


@pytest.mark.parametrize("text, argv, message", [
    ("optimizer:\n  lr: 1\n", [], "unknown section 'optimizer'"),
    ("optim:\n  learning_rate: 1\n", [], "unknown key optim.learning_rate"),
    ("optim:\n  lr: fast\n", [], "'fast' is not valid"),
    ("", ["--set", "lr"], "use section.key=value"),
])
def test_bad_train_yaml_and_set_are_one_line_errors(tmp_path, capsys, text, argv, message):
    import cli

    bad = tmp_path / "t.yaml"
    bad.write_text(text)
    assert cli.main(["train", "--data", "ts", "--zoomldm", "tiny", "--config", str(bad), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_uniform_sampling_balances_magnifications_and_proportional_does_not():
    by_mag = [np.arange(0, 90), np.arange(90, 99), np.arange(99, 100)] + [np.zeros(0, np.int64)] * 5
    mag_of = np.repeat([0, 1, 2], [90, 9, 1])
    for sampling, expected in (("uniform", [1 / 3, 1 / 3, 1 / 3]), ("proportional", [0.9, 0.09, 0.01])):
        sampler = StepBatchSampler(by_mag, 50, seed=1, sampling=sampling)
        draws = np.concatenate([sampler.batch(s) for s in range(200)])
        freq = np.bincount(mag_of[draws], minlength=3) / len(draws)
        np.testing.assert_allclose(freq, expected, atol=0.02)


def test_batches_depend_only_on_seed_step_and_rank():
    by_mag = [np.arange(10), np.arange(10, 20)] + [np.zeros(0, np.int64)] * 6
    step = {"s": 0}
    a = StepBatchSampler(by_mag, 4, seed=0, steps_per_epoch=5, start_step=lambda: step["s"])
    first = list(a)
    assert len(first) == 5 and first[3] == a.batch(3)
    step["s"] = 3  # a run resumed at step 3 finishes the epoch with the same batches
    assert list(a) == first[3:]
    assert a.batch(3) != StepBatchSampler(by_mag, 4, seed=0, rank=1).batch(3)
    assert a.batch(3) != StepBatchSampler(by_mag, 4, seed=1).batch(3)


def test_validation_split_is_seeded_disjoint_and_capped():
    counts = np.array([40, 10, 1, 0, 0, 0, 0, 0])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    train, val = split_rows(counts, offsets, 0.1, 3, seed=0)
    assert [len(v) for v in val[:3]] == [3, 1, 0] and [len(t) for t in train[:3]] == [37, 9, 1]
    for t, v in zip(train, val):
        assert not set(t) & set(v)
    again = split_rows(counts, offsets, 0.1, 3, seed=0)[1]
    assert all(np.array_equal(x, y) for x, y in zip(val, again))
    batches = val_batches(val, 2)
    assert batches == [val[0][:2].tolist(), val[0][2:].tolist(), val[1].tolist()]


@pytest.mark.parametrize("warmup, start", [(1000, 1e-6), (10, 0.1), (0, 1e-6)])
def test_warmup_is_linear_then_constant(warmup, start):
    """torch's LinearLR gives lr * (start + (1 - start) * k / warmup) at step k < warmup, then lr."""
    import torch

    from zoomfeat.train.module import warmup_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    sched = warmup_scheduler(opt, warmup, start)
    got = []
    for _ in range(max(warmup, 5) + 5):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [2e-5 * (start + (1 - start) * k / warmup) if k < warmup else 2e-5 for k in range(len(got))]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_checkpoint_io_never_leaves_a_truncated_checkpoint(tmp_path, monkeypatch):
    """Lightning writes checkpoints in place; a write that dies half-way (disk full, kill) must leave the previous
    last.ckpt whole and no temporary file (zoomfeat.fitting.atomic_checkpoint_io)."""
    import torch

    from zoomfeat.errors import ZoomfeatError
    from zoomfeat.fitting import atomic_checkpoint_io

    io = atomic_checkpoint_io()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def dies_half_way(checkpoint, fh, *args, **kwargs):
        fh.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(ZoomfeatError, match="last.ckpt"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert int(torch.load(path, weights_only=True)["global_step"]) == 1
