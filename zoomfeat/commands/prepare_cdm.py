"""``zoomfeat prepare-cdm``: the Summarizer contexts of a prepare-train set, the CDM's training data."""

from __future__ import annotations

import argparse

from zoomfeat.cdm.config import PrepareCDMConfig
from zoomfeat.mags import mag_names

HELP = "compute the ZoomLDM Summarizer contexts [65, D] of a prepare-train set (streamed, resumable HDF5)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="TRAINSET",
                      help="folder written by `zoomfeat prepare-train` (its index.h5 and shards)")
    data.add_argument("--labels", metavar="CSV", default=None,
                      help="optional slide_id,label table: each row's slide label becomes a one-hot external "
                           "condition of the CDM (Graikos et al.'s p(z | c)); default: none")
    model = parser.add_argument_group("model")
    model.add_argument("--zoomldm", required=True, metavar="CONFIG_OR_DIR",
                       help="ZoomLDM whose Summarizer makes the contexts: a release folder, its config.yaml, or tiny")
    model.add_argument("--weights", metavar="CKPT", default=None,
                       help="ZoomLDM checkpoint (default: the one beside the config)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, metavar="DIR", help="output folder (contexts.h5)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--batch-size", type=int, default=64, help="patches per Summarizer batch (default 64)")
    runtime.add_argument("--workers", type=int, default=2, help="DataLoader workers reading the set (default 2)")
    runtime.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                         help="where the Summarizer runs (default auto: cuda when visible)")
    runtime.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                         help="autocast of the Summarizer (default auto: bf16 on CUDA, fp32 on CPU); stored fp32")


def build_config(args: argparse.Namespace):
    from pathlib import Path

    return PrepareCDMConfig(data=Path(args.data), zoomldm=args.zoomldm, out=Path(args.out),
                            weights=Path(args.weights) if args.weights else None,
                            labels=Path(args.labels) if args.labels else None, batch_size=args.batch_size,
                            workers=args.workers,
                            device=args.device, precision=args.precision)


def run(args: argparse.Namespace) -> int:
    from zoomfeat.store.contexts import ContextSet
    from zoomfeat.cdm.prepare import prepare_contexts

    path = prepare_contexts(build_config(args))
    store = ContextSet(path)
    counts = [len(rows) for rows in store.by_mag()]
    print(f"contexts: {path} ({len(store)} rows of {list(store.context_shape)}; "
          + ", ".join(f"{m} {c}" for m, c in zip(mag_names(), counts) if c) + ")")
    return 0
