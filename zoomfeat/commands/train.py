"""``zoomfeat train``: train or fine-tune ZoomLDM on a ``prepare-train`` set with Lightning."""

from __future__ import annotations

import argparse

HELP = "train or fine-tune ZoomLDM (Lightning: checkpoints, resume, DDP, official-format export)"

# flag -> dotted config key (flags win over --config; only flags given on the command line are applied)
FLAGS: dict[str, str] = {
    "data": "data.path", "batch_size": "data.batch_size", "workers": "data.workers", "seed": "data.seed",
    "mag_sampling": "data.mag_sampling",
    "zoomldm": "model.zoomldm", "init_from": "model.init_from",
    "lr": "optim.lr", "warmup_steps": "optim.warmup_steps",
    "out": "trainer.out", "accelerator": "trainer.accelerator", "devices": "trainer.devices",
    "num_nodes": "trainer.num_nodes", "strategy": "trainer.strategy", "precision": "trainer.precision",
    "max_steps": "trainer.max_steps", "every_n_steps": "trainer.every_n_steps", "resume": "trainer.resume",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="train.yaml with sections data/model/optim/trainer/validation "
                             "(example: zoomfeat/train/example_train.yaml)")
    parser.add_argument("--data", help="training set folder written by prepare-train")
    parser.add_argument("--zoomldm", help="official config.yaml or folder of the architecture (or: tiny)")
    parser.add_argument("--init-from", help="official weights.ckpt to fine-tune (default: from scratch)")
    parser.add_argument("--out", help="run folder (checkpoints/, official/, logs/, samples/)")
    parser.add_argument("--accelerator", help="auto | cpu | gpu")
    parser.add_argument("--devices", help="auto | a count (4) | a list (0,1)")
    parser.add_argument("--num-nodes", type=int)
    parser.add_argument("--strategy", help="auto | ddp | ...")
    parser.add_argument("--precision", help="auto (bf16-mixed on GPU, 32-true on CPU) | 32-true | bf16-mixed ...")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int, help="per device")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--every-n-steps", type=int, help="checkpoint, official export and validation interval")
    parser.add_argument("--workers", type=int, help="DataLoader workers per device")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--mag-sampling", choices=("uniform", "proportional"))
    parser.add_argument("--resume", help="auto (OUT/checkpoints/last.ckpt when present) | none | PATH")
    parser.add_argument("--no-val-samples", action="store_true", help="skip the decoded validation sample PNGs")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="any other config value, e.g. --set optim.p_uncond=0.2 (repeatable)")


def overrides(args: argparse.Namespace) -> dict:
    from zoomfeat.train.config import parse_set_options

    values = parse_set_options(args.set)
    values.update({key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None})
    if args.no_val_samples:
        values["validation.samples"] = False
    return values


def run(args: argparse.Namespace) -> int:
    from zoomfeat.train.config import load_train_config
    from zoomfeat.train.run import train

    config = load_train_config(args.config, overrides(args))
    out = train(config)
    print(f"run folder: {out} (official weights: {out / 'official' / 'last.ckpt'})")
    return 0
