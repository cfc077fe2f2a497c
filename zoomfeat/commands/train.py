"""``zoomfeat train``: train or fine-tune ZoomLDM on a ``prepare-train`` set with Lightning."""

from __future__ import annotations

import argparse

from zoomfeat.train.config import load_train_config, parse_set_options

HELP = "train or fine-tune ZoomLDM (Lightning: checkpoints, resume, DDP, official-format export)"

# flag -> dotted config key (flags win over --config; only flags given on the command line are applied)
FLAGS: dict[str, str] = {
    "data": "data.path", "batch_size": "data.batch_size", "workers": "data.workers", "seed": "data.seed",
    "mag_sampling": "data.mag_sampling",
    "zoomldm": "model.zoomldm", "init_from": "model.init_from",
    "lr": "optim.lr", "warmup_steps": "optim.warmup_steps", "summarizer_lr_scale": "optim.summarizer_lr_scale",
    "grad_clip": "optim.grad_clip",
    "out": "trainer.out", "accelerator": "trainer.accelerator", "devices": "trainer.devices",
    "num_nodes": "trainer.num_nodes", "strategy": "trainer.strategy", "precision": "trainer.precision",
    "max_steps": "trainer.max_steps", "every_n_steps": "trainer.every_n_steps", "resume": "trainer.resume",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="train.yaml with sections data/model/optim/trainer/validation "
                             "(example: zoomfeat/train/example_train.yaml); flags override it (default: none)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", help="training set folder written by prepare-train (required unless data.path is in --config)")
    data.add_argument("--batch-size", type=int, metavar="N", help="patches per device per step (default 8)")
    data.add_argument("--workers", type=int, metavar="N", help="DataLoader worker processes per device (default 2)")
    data.add_argument("--seed", type=int, help="seed of init, batch draws, noise and dropout (default 0)")
    data.add_argument("--mag-sampling", choices=("uniform", "proportional"),
                      help="magnification of each patch: uniform (official recipe) or proportional to patch "
                           "counts (default uniform)")
    model = parser.add_argument_group("model")
    model.add_argument("--zoomldm", metavar="CONFIG_OR_DIR",
                       help="official config.yaml or the folder holding it, or tiny (required unless in --config)")
    model.add_argument("--init-from", metavar="CKPT",
                       help="official weights.ckpt to fine-tune (default: random init, training from scratch)")
    optim = parser.add_argument_group("optim")
    optim.add_argument("--lr", type=float, help="AdamW learning rate after warm-up (default 2e-5)")
    optim.add_argument("--warmup-steps", type=int, metavar="N",
                       help="optimiser steps of linear LR warm-up (torch LinearLR) from lr x 1e-6 (default 1000)")
    optim.add_argument("--summarizer-lr-scale", type=float, metavar="S",
                       help="the Summarizer's learning rate as a multiple of the U-Net's (default 1: trained "
                            "jointly, as officially; 0 keeps it at its initialisation)")
    optim.add_argument("--grad-clip", type=float, metavar="NORM",
                       help="clip the gradient norm of each step to NORM (Lightning gradient_clip_val; default: "
                            "none, as officially)")
    trainer = parser.add_argument_group("trainer")
    trainer.add_argument("--out", metavar="DIR",
                         help="run folder: checkpoints/, official/, logs/, samples/ (default runs/zoomldm)")
    trainer.add_argument("--max-steps", type=int, metavar="N", help="optimiser steps in all (default 10000)")
    trainer.add_argument("--every-n-steps", type=int, metavar="N",
                         help="steps between checkpoint, official export and validation (default 1000)")
    trainer.add_argument("--resume", metavar="auto|none|CKPT",
                         help="auto: OUT/checkpoints/last.ckpt when present; none; or a checkpoint file; a resume "
                              "must keep the run's settings (default auto)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--accelerator", help="Lightning accelerator: auto, cpu or gpu (default auto)")
    runtime.add_argument("--devices", help="Lightning devices: auto, a count (4) or a list (0,1) (default auto)")
    runtime.add_argument("--num-nodes", type=int, metavar="N", help="machines for DDP (default 1)")
    runtime.add_argument("--strategy", help="Lightning strategy: auto or ddp (default auto: DDP when several "
                                            "processes)")
    runtime.add_argument("--precision",
                         help="auto (bf16-mixed on GPU, 32-true on CPU), fp32, bf16, fp16 or a Lightning precision "
                              "such as bf16-mixed (default auto)")
    validation = parser.add_argument_group("validation")
    validation.add_argument("--no-val-samples", action="store_true",
                            help="skip the decoded validation sample PNGs (default: write them)")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="any other config value, e.g. --set optim.p_uncond=0.2 (repeatable; default: none)")


def overrides(args: argparse.Namespace) -> dict:
    values = parse_set_options(args.set)
    values.update({key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None})
    if args.no_val_samples:
        values["validation.samples"] = False
    return values


def run(args: argparse.Namespace) -> int:
    from zoomfeat.train.run import train

    config = load_train_config(args.config, overrides(args))
    out = train(config)
    print(f"run folder: {out} (official weights: {out / 'official' / 'last.ckpt'})")
    return 0
