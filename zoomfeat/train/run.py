"""``train``: one ZoomLDM training run from a :class:`TrainConfig` (Trainer, loggers, checkpoints, resume, export).

Outputs under ``trainer.out``:

- ``train_config.json``: the validated config of the run; ``train_inputs.json``: fingerprints of the training set
  (index sha256, first-stage digest). A resume must keep both, except the settings in ``RESUME_FREE``;
- ``checkpoints/step_<n>.ckpt`` + ``last.ckpt``: Lightning checkpoints (model, optimiser, schedule, loops);
- ``official/step_<n>.ckpt`` + ``last.ckpt`` + ``config.yaml``: flat state_dicts in the official layout that
  ``zoomfeat.model.load_zoomldm(OUT/official, OUT/official/last.ckpt)`` reads strictly;
- ``logs/``: CSV metrics (and TensorBoard events when tensorboard is installed); ``samples/``: validation PNGs.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import lightning as L
import torch

from zoomfeat.config import save_config
from zoomfeat.errors import CheckpointError, ConfigError, DataError, one_line
from zoomfeat.fitting import atomic_checkpoint_io, fit, load_checkpoint, make_trainer
from zoomfeat.resolve import file_sha256
from zoomfeat.serial import to_jsonable
from zoomfeat.store import atomic_write, describe_diff, settings_diff, write_json_atomic
from zoomfeat.store.trainset import INDEX_NAME
from zoomfeat.train.config import TrainConfig, resolve_zoomldm_config
from zoomfeat.train.dataset import TrainingSet, ZoomLDMDataModule
from zoomfeat.train.module import ZoomLDMLightning
from zoomfeat.train.prepare import FIRST_STAGE_NAME, first_stage_digest


class OfficialExport(L.Callback):
    """Every ``every_n_steps`` optimiser steps and at the end: ``OUT/official/step_<n>.ckpt`` and ``last.ckpt``."""

    def __init__(self, out_dir: Path, every_n_steps: int):
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self._last_step = -1

    def export(self, trainer: L.Trainer, module: ZoomLDMLightning) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step:
            return
        path = module.model.save_official(self.out_dir / f"step_{step:07d}.ckpt")
        _copy_atomic(path, self.out_dir / "last.ckpt")
        self._last_step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module)


def parse_devices(value: str) -> str:
    """``trainer.devices`` as Lightning takes it (``"auto"``, ``"4"``, ``"0,1"``): Lightning parses it."""
    return str(value).strip()


def world_size(accelerator: str, devices, num_nodes: int = 1) -> int:
    """Processes Lightning will start, from its accelerators' own device parsing (ConfigError when refused)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and CUDAAccelerator.is_available())
    kind = CUDAAccelerator if cuda else CPUAccelerator
    try:
        parsed = kind.auto_device_count() if str(devices) == "auto" else kind.parse_devices(devices)
    except (MisconfigurationException, ValueError, TypeError) as exc:
        raise ConfigError(f"trainer.devices {devices!r} (--devices): {one_line(exc)}") from exc
    count = len(parsed) if isinstance(parsed, (list, tuple)) else int(parsed or 0)
    return count * int(num_nodes)


def resolve_strategy(strategy: str, devices, num_nodes: int = 1, accelerator: str = "auto"):
    """DDP without buffer broadcasting for ``ddp`` (or ``auto`` when Lightning would start several processes).

    The EMA shadows are buffers as large as the U-Net; DDP would broadcast them every step although every
    rank updates them identically from identical weights.
    """
    if strategy == "ddp" or (strategy == "auto" and world_size(accelerator, devices, num_nodes) > 1):
        import inspect

        from lightning.pytorch.strategies import DDPStrategy
        from torch.nn.parallel import DistributedDataParallel

        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        return DDPStrategy(**({"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}))
    return strategy


LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def resolve_precision(precision: str, accelerator: str) -> str:
    """A Lightning precision string: ``auto`` follows extract's rule (:func:`zoomfeat.runtime.resolve_runtime`:
    bf16, or fp16 where bf16 is unsupported, on a GPU; fp32 on the CPU); fp32/bf16/fp16 map to 32-true /
    bf16-mixed / 16-mixed; Lightning's own strings pass through (its precision plugins do the rest)."""
    if precision == "auto":
        from zoomfeat.runtime import resolve_runtime

        device = "cpu" if accelerator == "cpu" else "auto"
        precision = resolve_runtime(device, "auto").precision
    return LIGHTNING_PRECISION.get(precision, precision)


def resolve_resume(resume: str, out: Path) -> str | None:
    """Checkpoint to resume from: ``auto`` = ``OUT/checkpoints/last.ckpt`` when it exists."""
    if resume == "none":
        return None
    if resume == "auto":
        last = out / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    return resume


def build_model(cfg: TrainConfig):
    """The ZoomLDM to train: official weights from ``init_from`` (fine-tuning) or a random init."""
    from zoomfeat.model import build_zoomldm, load_zoomldm

    config = resolve_zoomldm_config(cfg.model.zoomldm)
    if cfg.model.init_from is not None:
        return load_zoomldm(config, cfg.model.init_from, use_ema=False, device="cpu").train()
    torch.manual_seed(cfg.data.seed)
    return build_zoomldm(config)


def adopt_first_stage(data: TrainingSet, model, from_checkpoint: bool) -> None:
    """Make the model's first stage the one that encoded the training latents.

    From scratch, the first stage comes from ``DATA/first_stage.pt``; when fine-tuning, the checkpoint's
    first stage must be that one (same digest), or the latents would not match the decoder.
    """
    if not from_checkpoint:
        path = data.root / FIRST_STAGE_NAME
        if not path.is_file():
            raise DataError(f"{path} not found: rerun prepare-train (it saves the first stage it used)")
        model.first_stage_model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if data.first_stage_digest and first_stage_digest(model) != data.first_stage_digest:
        raise DataError(f"{data.root}: the latents were made with another first stage than {model.config.source}'s "
                        "weights: rerun prepare-train with --weights set to the --init-from file")


def check_data(data: TrainingSet, model) -> None:
    """The training set must have been prepared for this architecture and conditioner width."""
    d = model.config.diffusion
    want = (int(d.channels), int(d.image_size), int(d.image_size))
    if tuple(data.latent_shape) != want:
        raise DataError(f"{data.root}: latents are {list(data.latent_shape)} but the model takes {list(want)}: "
                        "rerun prepare-train with this --zoomldm config")
    if data.grid_channels != int(model.conditioning_dim):
        raise DataError(f"{data.root}: grids have {data.grid_channels} channels but the Summarizer takes "
                        f"{model.conditioning_dim}: rerun prepare-train with the matching conditioner")


def run_loggers(out: Path) -> list:
    """The loggers of a training run in ``out``: CSV always, TensorBoard when it is installed."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: list = [CSVLogger(out, name="logs")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(out, name="logs_tb"))
    return loggers


def build_trainer(cfg: TrainConfig, out: Path) -> L.Trainer:
    """The Lightning Trainer of a run; devices, precision and strategy are parsed by Lightning (one-line
    ConfigError for what it refuses)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    t, v = cfg.trainer, cfg.validation
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="step_{step:07d}", auto_insert_metric_name=False,
                           every_n_train_steps=t.every_n_steps, save_top_k=-1, save_last=True)
    limit_val = (v.max_batches if v.max_batches is not None else 1.0) if v.enabled else 0
    devices = parse_devices(t.devices)
    return make_trainer(
        options={"accelerator": "--accelerator", "devices": "--devices", "num_nodes": "--num-nodes",
                 "precision": "--precision", "strategy": "--strategy"},
        accelerator=t.accelerator, devices=devices, num_nodes=t.num_nodes,
        strategy=resolve_strategy(t.strategy, devices, t.num_nodes, t.accelerator),
        precision=resolve_precision(t.precision, t.accelerator), max_steps=t.max_steps, max_epochs=-1,
        val_check_interval=t.every_n_steps, check_val_every_n_epoch=None, limit_val_batches=limit_val,
        num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps, default_root_dir=out,
        use_distributed_sampler=False, gradient_clip_val=cfg.optim.grad_clip, logger=run_loggers(out),
        callbacks=[ckpt, OfficialExport(out / "official", t.every_n_steps)], plugins=[atomic_checkpoint_io()],
        enable_model_summary=False)


# ------------------------------------------------------------------------------------------------ resume
CONFIG_NAME = "train_config.json"
INPUTS_NAME = "train_inputs.json"
# settings that may change when a run is resumed: how long it runs, how often it saves and validates, how it
# reads the data; everything else (optimiser, batch, devices, data, model) shapes the steps already taken
# (the folders may move: the training set's content is checked by its fingerprint instead of its path)
RESUME_FREE: tuple[str, ...] = ("trainer.max_steps", "trainer.resume", "trainer.every_n_steps",
                                "trainer.log_every_n_steps", "trainer.out", "data.path", "data.workers",
                                "validation")


# settings added after runs were recorded, with the value every run recorded before them trained with: an older
# record lacking one resumes as if it held that value
ADDED_SETTINGS: dict[str, object] = {"optim.summarizer_lr_scale": 1.0}


def run_inputs(data: TrainingSet) -> dict:
    """Content fingerprints of a run's inputs: the training set's index (sha256) and first-stage digest."""
    return {"index_sha256": file_sha256(data.root / INDEX_NAME), "first_stage_digest": data.first_stage_digest}


def _fixed(settings: dict) -> dict:
    """The settings of a run that a resume must keep (RESUME_FREE dropped), in dotted form."""
    flat = {f"{section}.{key}": value for section, values in to_jsonable(settings).items()
            if isinstance(values, dict) for key, value in values.items()}
    return {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in RESUME_FREE)}


def _read_json(path: Path) -> dict:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable JSON record ({exc}); use a new --out") from exc
    return data if isinstance(data, dict) else {}


def check_resume(cfg: TrainConfig, out: Path, resume: str | None, inputs: dict) -> None:
    """Refuse a resume whose settings or inputs differ from those the run began with, and a fresh start
    (``--resume none``) over a folder that holds another run's checkpoints. ConfigError naming the keys."""
    if resume is None:
        if any((out / "checkpoints").glob("*.ckpt")):
            raise ConfigError(f"{out} holds checkpoints of an earlier run and --resume is none: continue it with "
                              "--resume auto, or train into a new --out")
        return
    record = Path(resume).parent.parent / CONFIG_NAME if not (out / CONFIG_NAME).is_file() else out / CONFIG_NAME
    if not record.is_file():
        return
    diff = settings_diff({**ADDED_SETTINGS, **_fixed(_read_json(record))}, _fixed(to_settings(cfg)))
    old_inputs = _read_json(record.with_name(INPUTS_NAME)) if record.with_name(INPUTS_NAME).is_file() else None
    diff.update({f"inputs.{k}": v for k, v in settings_diff(old_inputs or {}, inputs).items()} if old_inputs else {})
    if diff:
        raise ConfigError(f"resuming {resume} with other settings than the run began with ({describe_diff(diff)}): "
                          f"pass the run's values ({record}), or train into a new --out. Changeable on resume: "
                          f"{', '.join(RESUME_FREE)}")


def to_settings(cfg: TrainConfig) -> dict:
    return to_jsonable(cfg)


def check_resume_checkpoint(path: str | None) -> None:
    """CheckpointError (one line) for a resume file that is not a Lightning checkpoint of this trainer."""
    if path is None:
        return
    fix = "pass OUT/checkpoints/last.ckpt of a `zoomfeat train` run, or --resume none"
    ckpt = load_checkpoint(path, fix, mmap=True)
    missing = [k for k in ("state_dict", "global_step", "optimizer_states") if k not in ckpt]
    if missing:
        raise CheckpointError(f"--resume {path}: not a Lightning training checkpoint (no {', '.join(missing)}); "
                              f"{fix}")


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_write(dst) as tmp:
        shutil.copyfile(src, tmp)


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the output folder. Every check (Lightning settings, training set,
    model, resume settings and checkpoint) runs before anything is written."""
    out = Path(cfg.trainer.out)
    trainer = build_trainer(cfg, out)
    resume = resolve_resume(cfg.trainer.resume, out)
    check_resume_checkpoint(resume)
    data = TrainingSet(cfg.data.path)  # fail early on a missing or mismatched set
    model = build_model(cfg)
    check_data(data, model)
    adopt_first_stage(data, model, from_checkpoint=cfg.model.init_from is not None)
    inputs = run_inputs(data)
    check_resume(cfg, out, resume, inputs)
    save_config(cfg, out / CONFIG_NAME)
    write_json_atomic(out / INPUTS_NAME, inputs)
    _copy_atomic(resolve_zoomldm_config(cfg.model.zoomldm), out / "official" / "config.yaml")
    module = ZoomLDMLightning(model, cfg.optim, cfg.validation, seed=cfg.data.seed, sample_dir=out / "samples")
    fit(trainer, module, datamodule=ZoomLDMDataModule(cfg.data), ckpt_path=resume, weights_only=True)
    return out
