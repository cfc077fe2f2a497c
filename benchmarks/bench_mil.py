"""MIL training speed: train-mil's loop against a plain per-bag PyTorch loop, same head and bags (run by hand).

    python benchmarks/bench_mil.py --models abmil,clam_sb,dsmil --bags-per-step 1,4,8 --threads 2
    python benchmarks/bench_mil.py --device cuda --precision bf16      # the GPU figure

The cohort is a planted-signal one (tests/mil_data.py: 5% witness instances), written once as real HDF5
feature files and read through mil.bags. Both sides train the same head (default widths, the head train-mil
builds) with the same optimiser settings (the head's recipe under hipt: lr, betas, weight decay), threads,
device and precision, on the same folds (5 by default), one fold after another:

- ``plain``: the loop of CLAM's / DSMIL's scripts: bags held on the device as a list, one bag per step,
  ``model(x)``, cross-entropy (+ the head's auxiliary loss), ``torch.optim.Adam``, zero_grad / backward / step
  (with ``--compile``: the same loop with ``torch.compile(model, dynamic=True)``);
- ``train-mil B``: mil.train's FoldTrainer (the loop behind ``zoomfeat train-mil``) with ``--bags-per-step B``.

Per-epoch seconds are the best epoch of the best of ``--repeats`` interleaved runs (the machine may be shared),
summed over the folds; ratios are against the plain loop of the same run. AUC: mean test AUC over the folds
after ``--epochs`` epochs. Prints one JSON line per head.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mil.bags import BagStore, FeatureSpec  # noqa: E402
from mil.config import MILConfig, effective_model_kwargs, make_protocol, training_plan  # noqa: E402
from mil.losses import bag_loss  # noqa: E402
from mil.metrics import auroc  # noqa: E402
from mil.registry import build_model  # noqa: E402
from mil.train import FoldData, FoldTrainer, epoch_order, make_bags, retain_freed_memory  # noqa: E402
from mil_data import planted_cohort  # noqa: E402
from splits.io import read_splits_dir  # noqa: E402


def cohort(work: Path, slides: int, dim: int, sizes: tuple[int, int], n_folds: int = 5):
    root = work / f"planted_{slides}x{dim}_{sizes[0]}-{sizes[1]}" / ("" if n_folds == 5 else f"k{n_folds}")
    if not (root / "labels.csv").is_file():
        planted_cohort(root, n_slides=slides, dim=dim, sizes=sizes, folds=n_folds)
    import pandas as pd

    labels = pd.read_csv(root / "labels.csv")
    target = {r.slide_id: int(r.label == "ILC") for r in labels.itertuples()}
    folds = [(f.index, FoldData({p: list(f.part(p)) for p in ("train", "val", "test")}, target,
                                {s: s for s in target})) for f in read_splits_dir(root / "splits")]
    return root, target, folds


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device: str, precision: str):
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def plain_fold(cfg: MILConfig, dim: int, data: FoldData, feats: dict, epochs: int, device: str, compiled: bool):
    """The reference loop; returns (seconds per epoch list, test AUC)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, dim, 2, **effective_model_kwargs(cfg)).to(device)
    step_model = torch.compile(model, dynamic=True) if compiled else model
    opt = torch.optim.Adam(model.parameters(), lr=cfg.protocol.lr, betas=training_plan(cfg).recipe.betas,
                           weight_decay=cfg.protocol.weight_decay)
    order = torch.Generator().manual_seed(cfg.seed)
    train = data.parts["train"]
    labels = {s: torch.tensor([data.target[s]], device=device) for s in data.target}
    times = []
    for _ in range(epochs):
        model.train()
        _sync(device)
        start = time.perf_counter()
        for i in torch.randperm(len(train), generator=order).tolist():
            y = labels[train[i]]
            with _autocast(device, cfg.precision):
                out = step_model(feats[train[i]][None], None, y)
                loss = bag_loss(model, out, y[0])
            opt.zero_grad()
            loss.backward()
            opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        probs = torch.stack([torch.softmax(model(feats[s][None]).logits.float(), 1)[0].cpu()
                             for s in data.parts["test"]])
    return times, auroc(probs, [data.target[s] for s in data.parts["test"]], 2)


def train_mil_fold(cfg: MILConfig, fold, bags, order, dim: int, epochs: int, device: str):
    """mil.train's FoldTrainer on one fold; returns (seconds per epoch list, test AUC)."""
    trainer = FoldTrainer(cfg, *fold, bags, order, dim, 2, device, training_plan(cfg, device))
    times = []
    for epoch in range(epochs):
        _sync(device)
        start = time.perf_counter()
        trainer.train_epoch(epoch)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, trainer.result().metrics["test_auc"]


def bench_head(args, model: str, root: Path, target: dict, folds, store, feats, bags, order) -> dict:
    steps = [int(b) for b in args.bags_per_step.split(",")]
    spec = f"{root / 'feats'}@20x"
    base = dict(features=spec, labels=str(root / "labels.csv"), splits=str(root / "splits"), out="/tmp/unused",
                model=model, protocol=make_protocol("hipt", epochs=args.epochs), seed=args.seed,
                precision=args.precision)
    cfgs = {f"train-mil {b}": MILConfig(**base, bags_per_step=b) for b in steps}
    plain_cfg = MILConfig(**base)
    sides = ["plain", *(["plain compiled"] if args.compile else []), *cfgs]
    best = {k: [] for k in sides}
    aucs = {}
    for _ in range(args.repeats):
        for side in sides:
            if side.startswith("plain"):
                runs = [plain_fold(plain_cfg, args.dim, d, feats, args.epochs, args.device, side != "plain")
                        for _, d in folds]
            else:
                runs = [train_mil_fold(cfgs[side], f, bags, order, args.dim, args.epochs, args.device)
                        for f in folds]
            best[side].append(sum(min(t) for t, _ in runs))
            aucs[side] = float(np.mean([a for _, a in runs]))
    epoch = {k: min(v) for k, v in best.items()}
    return {"model": model, "device": args.device, "precision": args.precision, "threads": args.threads,
            "slides": args.slides, "dim": args.dim, "instances": args.instances, "epochs": args.epochs,
            "folds": len(folds), "epoch_s_summed_over_folds": {k: round(v, 3) for k, v in epoch.items()},
            "ratio_vs_plain": {k: round(v / epoch["plain"], 3) for k, v in epoch.items() if k != "plain"},
            "mean_test_auc": {k: round(v, 4) for k, v in aucs.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="abmil,clam_sb,dsmil")
    p.add_argument("--bags-per-step", default="1,4,8", help="train-mil's --bags-per-step values to measure")
    p.add_argument("--slides", type=int, default=60)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--instances", default="100,200", help="bag size range lo,hi")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold split (default 5)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="both sides (bf16: autocast)")
    p.add_argument("--compile", action="store_true",
                   help="also time the plain loop with torch.compile(model) (the case for a --compile option)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/bench_mil")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as train-mil does (mil.train.run_folds)
    sizes = tuple(int(v) for v in args.instances.split(","))
    root, target, folds = cohort(Path(args.work), args.slides, args.dim, sizes, args.folds)
    store = BagStore(FeatureSpec.parse(f"{root / 'feats'}@20x"), cache=False)
    feats = {s: store.get(s).features.float().to(args.device) for s in target}
    bags = make_bags(store, sorted(target), args.device, True)
    order = epoch_order([d.parts["train"] for _, d in folds], target, lambda s: True)
    for model in args.models.split(","):
        print(json.dumps(bench_head(args, model, root, target, folds, store, feats, bags, order)), flush=True)


if __name__ == "__main__":
    main()
