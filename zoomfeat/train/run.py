"""``train``: one ZoomLDM training run from a :class:`TrainConfig` (Trainer, loggers, checkpoints, resume, export).

Outputs under ``trainer.out``:

- ``train_config.json``: the validated config of the run;
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
from zoomfeat.errors import ConfigError, DataError
from zoomfeat.train.config import TrainConfig, resolve_zoomldm_config
from zoomfeat.train.dataset import TrainingSet, ZoomLDMDataModule
from zoomfeat.train.module import ZoomLDMLightning


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
        shutil.copyfile(path, self.out_dir / "last.ckpt")
        self._last_step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module)


def parse_devices(value: str) -> int | str | list[int]:
    """``"auto"`` -> "auto", ``"4"`` -> 4, ``"0,1"`` -> [0, 1]."""
    value = str(value).strip()
    if value == "auto":
        return value
    try:
        if "," in value:
            return [int(v) for v in value.split(",") if v.strip()]
        return int(value)
    except ValueError as e:
        raise ConfigError(f"trainer.devices {value!r}: use auto, a count (4) or a list (0,1)") from e


def resolve_strategy(strategy: str, devices: int | str | list[int], num_nodes: int):
    """DDP without buffer broadcasting for ``ddp`` (or ``auto`` on several devices).

    The EMA shadows are buffers as large as the U-Net; DDP would broadcast them every step although every
    rank updates them identically from identical weights.
    """
    many = num_nodes > 1 or (isinstance(devices, list) and len(devices) > 1) or \
        (isinstance(devices, int) and devices > 1) or (devices == "auto" and torch.cuda.device_count() > 1)
    if strategy == "ddp" or (strategy == "auto" and many):
        import inspect

        from lightning.pytorch.strategies import DDPStrategy
        from torch.nn.parallel import DistributedDataParallel

        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        return DDPStrategy(**({"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}))
    return strategy


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto`` -> bf16-mixed when a GPU will be used, 32-true on CPU."""
    if precision != "auto":
        return precision
    gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if gpu else "32-true"


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
    from zoomfeat.train.prepare import FIRST_STAGE_NAME, first_stage_digest

    if not from_checkpoint:
        path = data.root / FIRST_STAGE_NAME
        if not path.is_file():
            raise DataError(f"{path} not found: rerun prepare-train (it saves the first stage it used)")
        model.first_stage_model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if data.first_stage_digest and first_stage_digest(model) != data.first_stage_digest:
        raise DataError(f"{data.root}: the latents were made with another first stage than {model.config.source}'s "
                        "weights: rerun prepare-train with --zoomldm-weights set to the --init-from file")


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


def _loggers(out: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: list = [CSVLogger(out, name="logs")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(out, name="logs_tb"))
    return loggers


def build_trainer(cfg: TrainConfig, out: Path) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    t, v = cfg.trainer, cfg.validation
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="step_{step:07d}", auto_insert_metric_name=False,
                           every_n_train_steps=t.every_n_steps, save_top_k=-1, save_last=True)
    limit_val = (v.max_batches if v.max_batches is not None else 1.0) if v.enabled else 0
    devices = parse_devices(t.devices)
    return L.Trainer(
        accelerator=t.accelerator, devices=devices, num_nodes=t.num_nodes,
        strategy=resolve_strategy(t.strategy, devices, t.num_nodes),
        precision=resolve_precision(t.precision, t.accelerator), max_steps=t.max_steps, max_epochs=-1,
        val_check_interval=t.every_n_steps, check_val_every_n_epoch=None, limit_val_batches=limit_val,
        num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps, default_root_dir=out,
        use_distributed_sampler=False, gradient_clip_val=cfg.optim.grad_clip, logger=_loggers(out),
        callbacks=[ckpt, OfficialExport(out / "official", t.every_n_steps)],
        enable_model_summary=False)


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the output folder."""
    out = Path(cfg.trainer.out)
    data = TrainingSet(cfg.data.path)  # fail early on a missing or mismatched set
    model = build_model(cfg)
    check_data(data, model)
    adopt_first_stage(data, model, from_checkpoint=cfg.model.init_from is not None)
    resume = resolve_resume(cfg.trainer.resume, out)
    (out / "official").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "train_config.json")
    shutil.copyfile(resolve_zoomldm_config(cfg.model.zoomldm), out / "official" / "config.yaml")
    module = ZoomLDMLightning(model, cfg.optim, cfg.validation, seed=cfg.data.seed, sample_dir=out / "samples")
    trainer = build_trainer(cfg, out)
    trainer.fit(module, datamodule=ZoomLDMDataModule(cfg.data), ckpt_path=resume)
    return out
