"""``zoomfeat train``: train or fine-tune ZoomLDM on a ``prepare-train`` set with Lightning.

Its options are the sections of :class:`zoomfeat.train.config.TrainConfig` (argument group = section, option
destination = key), so the generic ``--config``/``--set`` loader of every command reads a sectioned
``train.yaml`` (``zoomfeat/train/example_train.yaml``), ``zoomfeat config show train`` prints the resolved
config, and the ``<out>/train.config.yaml`` saved by a run reruns it. Defaults are the dataclasses' own.
"""

from __future__ import annotations

import argparse
import dataclasses

from zoomfeat.commands.options import add_workers_option
from zoomfeat.train.config import (DataSection, ModelSection, OptimSection, TrainerSection, TrainConfig,
                                   ValidationSection, load_train_config)

HELP = "train or fine-tune ZoomLDM (Lightning: checkpoints, resume, DDP, official-format export)"

SECTIONS = {"data": DataSection, "model": ModelSection, "optim": OptimSection, "trainer": TrainerSection,
            "validation": ValidationSection}
_DATA, _OPTIM, _TRAINER, _VAL = DataSection(), OptimSection(), TrainerSection(), ValidationSection()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", dest="path", metavar="DIR", required=True,
                      help="training set folder written by prepare-train (required)")
    data.add_argument("--batch-size", type=int, metavar="N", default=_DATA.batch_size,
                      help=f"patches per device per step (default {_DATA.batch_size})")
    add_workers_option(data)
    data.add_argument("--seed", type=int, default=_DATA.seed,
                      help=f"seed of init, batch draws, noise and dropout (default {_DATA.seed})")
    data.add_argument("--mag-sampling", choices=("uniform", "proportional"), default=_DATA.mag_sampling,
                      help="magnification of each patch: uniform (official recipe) or proportional to patch "
                           f"counts (default {_DATA.mag_sampling})")
    data.add_argument("--steps-per-epoch", type=int, metavar="N", default=_DATA.steps_per_epoch,
                      help=f"steps per epoch; epochs only pace logging (default {_DATA.steps_per_epoch})")
    data.add_argument("--val-fraction", type=float, metavar="F", default=_DATA.val_fraction,
                      help="share of each magnification's patches held out for validation, in [0, 1) "
                           f"(default {_DATA.val_fraction})")
    data.add_argument("--val-max-per-mag", type=int, metavar="N", default=_DATA.val_max_per_mag,
                      help=f"held-out patches per magnification at most (default {_DATA.val_max_per_mag})")
    model = parser.add_argument_group("model")
    model.add_argument("--zoomldm", metavar="CONFIG_OR_DIR", default=None,
                       help="official config.yaml or the folder holding it, or tiny (required)")
    model.add_argument("--init-from", metavar="CKPT", default=None,
                       help="official weights.ckpt to fine-tune (default: random init, training from scratch)")
    optim = parser.add_argument_group("optim")
    optim.add_argument("--lr", type=float, default=_OPTIM.lr,
                       help=f"AdamW learning rate after warm-up (default {_OPTIM.lr:g})")
    optim.add_argument("--weight-decay", type=float, default=_OPTIM.weight_decay,
                       help=f"AdamW weight decay (default {_OPTIM.weight_decay:g})")
    optim.add_argument("--warmup-steps", type=int, metavar="N", default=_OPTIM.warmup_steps,
                       help="optimiser steps of linear LR warm-up (torch LinearLR) from lr x warmup-start-factor "
                            f"(default {_OPTIM.warmup_steps})")
    optim.add_argument("--warmup-start-factor", type=float, metavar="F", default=_OPTIM.warmup_start_factor,
                       help=f"first warm-up learning rate as a share of lr, in (0, 1] "
                            f"(default {_OPTIM.warmup_start_factor:g})")
    optim.add_argument("--p-uncond", type=float, metavar="P", default=_OPTIM.p_uncond,
                       help="classifier-free dropout: probability of training a step's context as zeros "
                            f"(default {_OPTIM.p_uncond:g})")
    optim.add_argument("--ema-decay", type=float, metavar="D", default=_OPTIM.ema_decay,
                       help=f"U-Net EMA decay, in [0, 1) (default {_OPTIM.ema_decay:g})")
    optim.add_argument("--summarizer-lr-scale", type=float, metavar="S", default=_OPTIM.summarizer_lr_scale,
                       help="the Summarizer's learning rate as a multiple of the U-Net's (default "
                            f"{_OPTIM.summarizer_lr_scale:g}: trained jointly, as officially; 0 keeps it at its "
                            "initialisation)")
    optim.add_argument("--grad-clip", type=float, metavar="NORM", default=None,
                       help="clip the gradient norm of each step to NORM (Lightning gradient_clip_val; default: "
                            "none, as officially)")
    trainer = parser.add_argument_group("trainer")
    trainer.add_argument("--out", metavar="DIR", default=str(_TRAINER.out),
                         help=f"run folder: checkpoints/, official/, logs/, samples/ (default {_TRAINER.out})")
    trainer.add_argument("--max-steps", type=int, metavar="N", default=_TRAINER.max_steps,
                         help=f"optimiser steps in all (default {_TRAINER.max_steps})")
    trainer.add_argument("--every-n-steps", type=int, metavar="N", default=_TRAINER.every_n_steps,
                         help="steps between checkpoint, official export and validation "
                              f"(default {_TRAINER.every_n_steps})")
    trainer.add_argument("--log-every-n-steps", type=int, metavar="N", default=_TRAINER.log_every_n_steps,
                         help=f"steps between logged losses (default {_TRAINER.log_every_n_steps})")
    trainer.add_argument("--resume", metavar="auto|none|CKPT", default=_TRAINER.resume,
                         help="auto: OUT/checkpoints/last.ckpt when present; none; or a checkpoint file; a resume "
                              f"must keep the run's settings (default {_TRAINER.resume})")
    trainer.add_argument("--accelerator", default=_TRAINER.accelerator,
                         help=f"Lightning accelerator: auto, cpu or gpu (default {_TRAINER.accelerator})")
    trainer.add_argument("--devices", default=_TRAINER.devices,
                         help=f"Lightning devices: auto, a count (4) or a list (0,1) (default {_TRAINER.devices})")
    trainer.add_argument("--num-nodes", type=int, metavar="N", default=_TRAINER.num_nodes,
                         help=f"machines for DDP (default {_TRAINER.num_nodes})")
    trainer.add_argument("--strategy", default=_TRAINER.strategy,
                         help=f"Lightning strategy: auto or ddp (default {_TRAINER.strategy}: DDP when several "
                              "processes)")
    trainer.add_argument("--precision", default=_TRAINER.precision,
                         help="auto (bf16-mixed on GPU, 32-true on CPU), fp32, bf16, fp16 or a Lightning precision "
                              f"such as bf16-mixed (default {_TRAINER.precision})")
    validation = parser.add_argument_group("validation")
    validation.add_argument("--no-validation", dest="enabled", action="store_false",
                            help="skip the held-out loss per magnification (default: validate every n steps)")
    validation.add_argument("--no-val-samples", dest="samples", action="store_false",
                            help="skip the decoded validation sample PNGs (default: write them)")
    validation.add_argument("--val-sample-steps", dest="sample_steps", type=int, metavar="N",
                            default=_VAL.sample_steps,
                            help=f"DDIM steps of the validation samples (default {_VAL.sample_steps})")
    validation.add_argument("--val-samples-per-mag", dest="samples_per_mag", type=int, metavar="N",
                            default=_VAL.samples_per_mag,
                            help=f"validation samples per magnification (default {_VAL.samples_per_mag})")
    validation.add_argument("--val-guidance", dest="guidance", type=float, metavar="S", default=_VAL.guidance,
                            help="classifier-free guidance scale of the validation samples "
                                 f"(default {_VAL.guidance:g})")
    validation.add_argument("--val-max-batches", dest="max_batches", type=int, metavar="N", default=None,
                            help="validation batches at most (default: all)")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The validated :class:`TrainConfig` of parsed ``train`` arguments (one option per section key)."""
    values = {f"{name}.{f.name}": getattr(args, f.name)
              for name, section in SECTIONS.items() for f in dataclasses.fields(section)}
    return load_train_config(values)


def run(args: argparse.Namespace) -> int:
    from zoomfeat.train.run import train

    out = train(train_config(args))
    print(f"run folder: {out} (official weights: {out / 'official' / 'last.ckpt'})")
    return 0
