"""MIL training throughput: ABMIL on synthetic bags read from real HDF5 feature files (run by hand).

    python benchmarks/bench_mil.py --bags 200 --instances 8000 --dim 1152 --epochs 2

Reports seconds per epoch, bags/s, the share of each epoch spent reading bags (h5py read + float16 -> float32
upcast + 20x/5x-style fusion is not involved: one magnification), and the peak resident memory of the process.
Epoch 1 reads every bag from its file; with --cache, later epochs read from memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mil.bags import BagStore, FeatureSpec  # noqa: E402
from mil.models import build_model  # noqa: E402
from mil.module import MILModule  # noqa: E402
from mil.train import BagDataset, _loader, quiet_lightning  # noqa: E402
from tests.mil_data import write_feature_file  # noqa: E402


class TimedStore(BagStore):
    """A BagStore that adds up the seconds spent in ``get`` (file reads and cache hits)."""

    seconds = 0.0

    def get(self, slide_id):
        start = time.perf_counter()
        bag = super().get(slide_id)
        self.seconds += time.perf_counter() - start
        return bag


def write_bags(folder: Path, bags: int, instances: int, dim: int, dtype: str) -> None:
    rng = np.random.default_rng(0)
    for i in range(bags):
        if not (folder / f"B{i:04d}.h5").is_file():
            feats = rng.standard_normal((instances, dim), dtype=np.float32)
            write_feature_file(folder, f"B{i:04d}", feats, dtype=np.dtype(dtype))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bags", type=int, default=200)
    p.add_argument("--instances", type=int, default=8000)
    p.add_argument("--dim", type=int, default=1152)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", action="store_true")
    p.add_argument("--work", default="/tmp/bench_mil")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    folder = Path(args.work) / f"feats_{args.bags}x{args.instances}x{args.dim}_{args.dtype}"
    t0 = time.perf_counter()
    write_bags(folder, args.bags, args.instances, args.dim, args.dtype)
    write_s = time.perf_counter() - t0
    store = TimedStore(FeatureSpec.parse(f"{folder}@20x"), cache=args.cache)
    ids = [f"B{i:04d}" for i in range(args.bags)]
    data = BagDataset(store, ids, [i % 2 for i in range(args.bags)])
    epochs: list[dict] = []

    class EpochTimer(Callback):
        def on_train_epoch_start(self, trainer, module):
            self.start, self.load = time.perf_counter(), store.seconds

        def on_train_epoch_end(self, trainer, module):
            seconds = time.perf_counter() - self.start
            epochs.append({"epoch": len(epochs) + 1, "seconds": round(seconds, 2),
                           "bags_per_s": round(args.bags / seconds, 2),
                           "load_share": round((store.seconds - self.load) / seconds, 3)})
            print(json.dumps(epochs[-1]), flush=True)

    with quiet_lightning():
        L.seed_everything(0, verbose=False)
        module = MILModule(build_model("abmil", args.dim, 2), 2e-4, 1e-5, 2, "last")
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
                            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                            limit_val_batches=0, callbacks=[EpochTimer()])
        trainer.fit(module, _loader(data, True, False, 0))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"bags": args.bags, "instances": args.instances, "dim": args.dim, "dtype": args.dtype,
                      "threads": args.threads, "cache": args.cache, "write_s": round(write_s, 1),
                      "peak_rss_gib": round(peak_gib, 2), "epochs": epochs}))


if __name__ == "__main__":
    main()
