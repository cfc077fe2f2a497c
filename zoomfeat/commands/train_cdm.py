"""``zoomfeat train-cdm``: train the CDM (a DiT diffusion over Summarizer contexts) with Lightning."""

from __future__ import annotations

import argparse

from zoomfeat.cdm import config as c
from zoomfeat.cdm.config import TrainCDMConfig

HELP = "train the conditioning diffusion model (DiT over Summarizer contexts; checkpoints, resume, DDP)"

# argparse group = config section; every option's dest is the field name of that section
SECTIONS = ("data", "model", "optim", "trainer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainCDMConfig.__dataclass_fields__
    dd, md, od, td = (d[name].default_factory() for name in SECTIONS)
    data = parser.add_argument_group("data")
    data.add_argument("--data", dest="path", metavar="DIR", required=True,
                      help="folder written by `zoomfeat prepare-cdm` (its contexts.h5)")
    data.add_argument("--batch-size", type=int, default=dd.batch_size,
                      help=f"contexts per device and step (default {dd.batch_size}, the official global batch)")
    data.add_argument("--workers", type=int, default=dd.workers, help=f"DataLoader workers per device (default {dd.workers})")
    data.add_argument("--mag-sampling", choices=("uniform", "proportional"), default=dd.mag_sampling,
                      help="magnification of each sample: uniform (default, as ZoomLDM training) or by counts")
    data.add_argument("--steps-per-epoch", type=int, default=dd.steps_per_epoch,
                      help=f"logging epoch length in steps (default {dd.steps_per_epoch})")
    data.add_argument("--seed", type=int, default=dd.seed, help="seed of the init, batches and noise (default 0)")
    model = parser.add_argument_group("model")
    model.add_argument("--size", choices=("DiT-S", "DiT-B", "DiT-L", "DiT-XL"), default=md.size,
                       help="official DiT size (default DiT-B: 12 layers, 768 hidden, 12 heads)")
    model.add_argument("--depth", type=int, default=md.depth, help="blocks (default: the size's)")
    model.add_argument("--hidden-size", type=int, default=md.hidden_size, help="transformer width (default: the size's)")
    model.add_argument("--num-heads", type=int, default=md.num_heads, help="attention heads (default: the size's)")
    model.add_argument("--mlp-ratio", type=float, default=md.mlp_ratio, help="MLP width / hidden width (default 4)")
    model.add_argument("--class-dropout-prob", type=float, default=md.class_dropout_prob,
                       help="label dropout for classifier-free guidance on magnification (default 0, as official)")
    model.add_argument("--fixed-variance", dest="learn_sigma", action="store_false", default=md.learn_sigma,
                       help="fixed variance and the x0-MSE loss alone (default: learned-range variance and the "
                            "official hybrid loss mse + vb)")
    optim = parser.add_argument_group("optim")
    optim.add_argument("--lr", type=float, default=od.lr, help=f"AdamW learning rate, constant (default {od.lr:g})")
    optim.add_argument("--weight-decay", type=float, default=od.weight_decay, help="AdamW weight decay (default 0)")
    optim.add_argument("--ema-decay", type=float, default=od.ema_decay, help=f"EMA decay per step (default {od.ema_decay})")
    optim.add_argument("--grad-clip", type=float, default=od.grad_clip, help="gradient-norm clip (default: none)")
    trainer = parser.add_argument_group("trainer")
    trainer.add_argument("--out", metavar="DIR", required=True,
                         help="run folder (train_cdm_config.json, checkpoints/, official/, logs/)")
    trainer.add_argument("--accelerator", default=td.accelerator, help="auto (default) | cpu | gpu")
    trainer.add_argument("--devices", default=td.devices, help="auto (default) | a count (4) | a list (0,1)")
    trainer.add_argument("--num-nodes", type=int, default=td.num_nodes, help="nodes (default 1)")
    trainer.add_argument("--strategy", default=td.strategy, help="auto (default; DDP on several devices) | ddp | ...")
    trainer.add_argument("--precision", default=td.precision,
                         help="auto (default: bf16-mixed on GPU, 32-true on CPU) | 32-true | bf16-mixed | ...")
    trainer.add_argument("--max-steps", type=int, default=td.max_steps,
                         help=f"optimiser steps in all (default {td.max_steps})")
    trainer.add_argument("--every-n-steps", type=int, default=td.every_n_steps,
                         help=f"step checkpoint and official export interval in steps (default {td.every_n_steps})")
    trainer.add_argument("--log-every-n-steps", type=int, default=td.log_every_n_steps,
                         help=f"metrics interval in steps (default {td.log_every_n_steps})")
    trainer.add_argument("--resume", default=td.resume,
                         help="auto (default: OUT/checkpoints/last.ckpt when present) | none | PATH")


def build_config(args: argparse.Namespace):
    """TrainCDMConfig from the parsed options (validated before any work)."""
    import dataclasses
    from pathlib import Path

    types = {"data": c.DataSection, "model": c.ModelSection, "optim": c.OptimSection, "trainer": c.TrainerSection}
    sections = {}
    for name, cls in types.items():
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        for key in ("path", "out"):
            if key in values:
                values[key] = Path(values[key])
        sections[name] = cls(**values)
    return c.TrainCDMConfig(**sections)


def run(args: argparse.Namespace) -> int:
    from zoomfeat.cdm.run import train_cdm

    out = train_cdm(build_config(args))
    print(f"CDM run folder: {out} (official checkpoint: {out / 'official' / 'last.ckpt'})")
    return 0
