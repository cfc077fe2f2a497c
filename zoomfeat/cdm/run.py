"""``train_cdm``: one CDM training run from a :class:`TrainCDMConfig` (``zoomfeat train-cdm``).

The runtime is the ZoomLDM training's (:mod:`zoomfeat.train.run`): devices, DDP without buffer broadcasting,
bf16-mixed on GPU, step-keyed batches, Lightning step checkpoints and ``resume: auto``. Outputs under
``trainer.out``:

- ``train_cdm_config.json``: under ``"cdm"`` the run record (data, model and optimiser settings, the DiT
  architecture that sampling rebuilds, the store's settings), beside it the trainer settings and label names;
- ``checkpoints/step_<n>.ckpt`` + ``last.ckpt``: Lightning checkpoints (weights, EMA, optimiser, loops);
- ``official/step_<n>.ckpt`` + ``last.ckpt``: the official CDM checkpoint layout ``{"model","ema","opt","args"}``;
- ``logs/``: CSV metrics (train/loss, train/mse, train/vb).

Resuming into a folder whose record differs in its data, model or optimiser settings is refused
(:func:`zoomfeat.store.check_output_folder`), and so is ``--resume none`` over a folder with checkpoints.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from zoomfeat.cdm.config import TrainCDMConfig
from zoomfeat.store.contexts import ContextSet
from zoomfeat.cdm.dit import DiTConfig
from zoomfeat.serial import to_jsonable
from zoomfeat.errors import ConfigError
from zoomfeat.fitting import fit, make_trainer
from zoomfeat.mags import MAGNIFICATIONS, mag_name

CONFIG_NAME = "train_cdm_config.json"
RECORD_SECTION = "cdm"  # the run record's section in CONFIG_NAME (data, model, optim, dit, data_settings)


def dit_config(cfg: TrainCDMConfig, store: ContextSet) -> DiTConfig:
    """The architecture for this store's contexts ([65, D] and the external condition's width)."""
    tokens, width = store.context_shape
    return replace(cfg.dit_overrides(), in_channels=int(width), num_tokens=int(tokens), cond_dim=store.cond_dim)


def run_record(cfg: TrainCDMConfig, store: ContextSet, dit: DiTConfig) -> dict:
    """What a resumed run must share with the run it continues (trainer settings may change)."""
    data = {k: v for k, v in to_jsonable(cfg.data).items() if k != "workers"}
    return {"data": data, "model": to_jsonable(cfg.model), "optim": to_jsonable(cfg.optim), "dit": to_jsonable(dit),
            "data_settings": store.settings}


def check_out(out: Path, cfg: TrainCDMConfig, record: dict, labels: list[str], resume: str | None,
              mags_seen: list[str] | None = None) -> None:
    """Refuse to overwrite a run (``--resume none`` over checkpoints) or to continue one with other settings;
    then write ``OUT/train_cdm_config.json`` (the run record under ``"cdm"``, the trainer settings beside it)."""
    from zoomfeat.store import check_output_folder

    if resume is None and any((out / "checkpoints").glob("*.ckpt")):
        raise ConfigError(f"{out} already holds a CDM run and --resume is none: pass another --out "
                          "(a run folder is never overwritten) or --resume auto to continue it")
    check_output_folder(out, "--out", record, CONFIG_NAME, section=RECORD_SECTION,
                        extra={"trainer": to_jsonable(cfg.trainer), "cond_labels": labels,
                               **({"mags_seen": mags_seen} if mags_seen is not None else {})})


def build_trainer(cfg: TrainCDMConfig, out: Path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from zoomfeat.train.run import OfficialExport, parse_devices, run_loggers, resolve_precision, resolve_strategy

    t = cfg.trainer
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="step_{step:07d}", auto_insert_metric_name=False,
                           every_n_train_steps=t.every_n_steps, save_top_k=-1, save_last=True)
    devices = parse_devices(t.devices)
    return make_trainer(
        options={"accelerator": "--accelerator", "devices": "--devices", "num_nodes": "--num-nodes",
                 "precision": "--precision", "strategy": "--strategy"},
        accelerator=t.accelerator, devices=devices, num_nodes=t.num_nodes,
        strategy=resolve_strategy(t.strategy, devices, t.num_nodes, t.accelerator),
        precision=resolve_precision(t.precision, t.accelerator), max_steps=t.max_steps, max_epochs=-1,
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps, default_root_dir=out,
        use_distributed_sampler=False, gradient_clip_val=cfg.optim.grad_clip, logger=run_loggers(out),
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
    seen = [mag_name(MAGNIFICATIONS[i]) for i in sorted({int(i) for i in store.mags})]
    check_out(out, cfg, run_record(cfg, store, dit), store.cond_labels, resume, mags_seen=seen)
    torch.manual_seed(cfg.data.seed)  # the DiT's random init
    module = CDMLightning(CDM(dit, cfg.optim.ema_decay), cfg.optim, seed=cfg.data.seed)
    quiet_third_party()
    trainer = build_trainer(cfg, out)
    fit(trainer, module, datamodule=CDMDataModule(cfg.data, store), ckpt_path=resume)  # Ctrl-C: KeyboardInterrupt
    return out
