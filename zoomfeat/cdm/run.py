"""``train_cdm``: one CDM training run from a :class:`TrainCDMConfig` (``zoomfeat train-cdm``).

The runtime is the ZoomLDM training's (:mod:`zoomfeat.train.run`): devices, DDP without buffer broadcasting,
bf16-mixed on GPU, step-keyed batches, Lightning step checkpoints and ``resume: auto``. Outputs under
``trainer.out``:

- ``train_cdm_config.json``: the validated config (the ``model`` section rebuilds the DiT when sampling),
  plus ``data_settings`` and the context shape of the store it was trained on;
- ``checkpoints/step_<n>.ckpt`` + ``last.ckpt``: Lightning checkpoints (weights, EMA, optimiser, loops);
- ``official/step_<n>.ckpt`` + ``last.ckpt``: the official CDM checkpoint layout ``{"model","ema","opt","args"}``;
- ``logs/``: CSV metrics (train/loss, train/mse, train/vb).

Resuming into a folder whose saved config differs in its data, model or optimiser settings is refused.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from zoomfeat.cdm.config import TrainCDMConfig
from zoomfeat.cdm.context_store import ContextSet
from zoomfeat.cdm.dit import DiTConfig
from zoomfeat.config import to_jsonable, write_json_atomic
from zoomfeat.errors import ConfigError

CONFIG_NAME = "train_cdm_config.json"
FIXED_SECTIONS = ("data", "model", "optim")  # what a resumed run must share with the run it continues


def dit_config(cfg: TrainCDMConfig, store: ContextSet) -> DiTConfig:
    """The architecture for this store's contexts ([65, D] and the external condition's width)."""
    tokens, width = store.context_shape
    return replace(cfg.dit_overrides(), in_channels=int(width), num_tokens=int(tokens), cond_dim=store.cond_dim)


def run_record(cfg: TrainCDMConfig, store: ContextSet, dit: DiTConfig) -> dict:
    return {**to_jsonable(cfg), "dit": to_jsonable(dit), "data_settings": store.settings,
            "cond_labels": store.cond_labels}


def check_resume(out: Path, record: dict, resume: str | None) -> None:
    """A resumed run must continue the same data, model and optimiser (only trainer settings may change)."""
    path = out / CONFIG_NAME
    if resume is None and any((out / "checkpoints").glob("*.ckpt")):
        raise ConfigError(f"{out} already holds a CDM run and --resume is none: pass another --out "
                          "(a run folder is never overwritten) or --resume auto to continue it")
    if resume is None or not path.is_file():
        return
    saved = json.loads(path.read_text())
    keys = [*FIXED_SECTIONS, "dit", "data_settings"]
    differ = [k for k in keys if saved.get(k) != record.get(k)]
    if differ:
        detail = [f"{k}.{f}" for k in differ if isinstance(record[k], dict)
                  for f in record[k] if saved.get(k, {}).get(f) != record[k][f]] or differ
        raise ConfigError(f"{out} holds a run with other settings ({', '.join(detail)}): resume it with the same "
                          "settings, pass --resume none with a new --out, or use another --out")


def build_trainer(cfg: TrainCDMConfig, out: Path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from zoomfeat.train.run import OfficialExport, _loggers, parse_devices, resolve_precision, resolve_strategy

    t = cfg.trainer
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="step_{step:07d}", auto_insert_metric_name=False,
                           every_n_train_steps=t.every_n_steps, save_top_k=-1, save_last=True)
    devices = parse_devices(t.devices)
    return L.Trainer(
        accelerator=t.accelerator, devices=devices, num_nodes=t.num_nodes,
        strategy=resolve_strategy(t.strategy, devices, t.num_nodes),
        precision=resolve_precision(t.precision, t.accelerator), max_steps=t.max_steps, max_epochs=-1,
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps, default_root_dir=out,
        use_distributed_sampler=False, gradient_clip_val=cfg.optim.grad_clip, logger=_loggers(out),
        callbacks=[ckpt, OfficialExport(out / "official", t.every_n_steps)], enable_model_summary=False)


def train_cdm(cfg: TrainCDMConfig) -> Path:
    """Run (or resume) CDM training; returns the run folder."""
    from zoomfeat.cdm.data import CDMDataModule
    from zoomfeat.cdm.module import CDM, CDMLightning
    from zoomfeat.log import quiet_third_party
    from zoomfeat.train.run import resolve_resume

    out = Path(cfg.trainer.out)
    store = ContextSet(cfg.data.path)
    dit = dit_config(cfg, store)
    resume = resolve_resume(cfg.trainer.resume, out)
    record = run_record(cfg, store, dit)
    check_resume(out, record, resume)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / CONFIG_NAME, record)
    torch.manual_seed(cfg.data.seed)  # the DiT's random init
    module = CDMLightning(CDM(dit, cfg.optim.ema_decay), cfg.optim, seed=cfg.data.seed)
    quiet_third_party()
    trainer = build_trainer(cfg, out)
    trainer.fit(module, datamodule=CDMDataModule(cfg.data, store), ckpt_path=resume)
    return out
