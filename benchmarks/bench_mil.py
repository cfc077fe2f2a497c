"""MIL training speed: a plain per-bag PyTorch loop against train-mil's loop, on the same bags (run by hand).

    python benchmarks/bench_mil.py --model abmil --slides 60 --dim 256 --instances 100,200 --epochs 3 --threads 2

The cohort is a planted-signal one (tests/mil_data.py: 5% witness instances), written once as real HDF5
feature files and read through mil.bags. Both sides train the same head (default sizes) with the same
optimiser settings (the head's recipe under hipt: lr, betas, weight decay; constant LR) on the same folds
(5 by default, ``--folds``):

- ``plain``: the reference loop of CLAM's / DSMIL's scripts: bags held in memory as a list, one bag per step,
  ``model(x)``, cross-entropy (+ the head's auxiliary loss), ``torch.optim.Adam`` (its default CPU code path),
  zero_grad / backward / step, folds one after another;
- ``train-mil``: mil.train's Engine (the loop behind ``zoomfeat train-mil``), one fold at a time (the default)
  and with ``--all-folds`` (the folds stacked), optionally ``--bags-per-step``.

Per-epoch seconds are the best of ``--repeats`` interleaved runs (the machine may be shared), summed over the
folds (all-folds: one stacked epoch covers every fold). AUC: mean test AUC over the folds after ``--epochs``
epochs. Prints one JSON line per measurement and a summary line.
"""

from __future__ import annotations

import argparse
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
from mil.metrics import auroc  # noqa: E402
from mil.models import build_model  # noqa: E402
from mil.losses import bag_loss  # noqa: E402
from mil.train import Engine, FoldData, epoch_order, make_bags, retain_freed_memory  # noqa: E402
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


def plain_fold(cfg: MILConfig, dim: int, data: FoldData, feats: dict, epochs: int, seed: int):
    """The reference loop (Adam with the run's lr, betas and weight decay; constant LR); returns (seconds per
    epoch list, test AUC)."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, dim, 2, **effective_model_kwargs(cfg))  # the head train-mil builds
    opt = torch.optim.Adam(model.parameters(), lr=cfg.protocol.lr, betas=training_plan(cfg).recipe.betas,
                           weight_decay=cfg.protocol.weight_decay)
    order = torch.Generator().manual_seed(seed)
    train = data.parts["train"]
    times = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for i in torch.randperm(len(train), generator=order).tolist():
            y = torch.tensor(data.target[train[i]])
            out = model(feats[train[i]], y)
            loss = bag_loss(model, out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        probs = torch.stack([torch.softmax(model(feats[s]).logits, 1)[0] for s in data.parts["test"]])
    return times, auroc(probs, [data.target[s] for s in data.parts["test"]], 2)


def engine_run(cfg: MILConfig, folds, bags, order, dim: int, epochs: int):
    """mil.train's Engine on ``folds`` (stacked); returns (seconds per epoch list, test AUCs)."""
    engine = Engine(cfg, folds, bags, order, dim, 2, "cpu", training_plan(cfg))
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        engine.train_epoch(epoch)
        times.append(time.perf_counter() - start)
    return times, [engine.result(r).metrics["test_auc"] for r in range(len(folds))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="abmil")
    p.add_argument("--slides", type=int, default=60)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--instances", default="100,200", help="bag size range lo,hi")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--folds", type=int, default=5,
                   help="k of the k-fold split (default 5; HIPT's TCGA protocols use 10)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bags-per-step", type=int, default=None)
    p.add_argument("--instance-sample", type=float, default=1.0,
                   help="train-mil's --instance-sample (the plain loop always sees whole bags)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="train-mil's precision (bf16: autocast; the plain loop stays fp32, as its scripts run)")
    p.add_argument("--compile", action="store_true", help="train-mil's --compile (the plain loop stays eager)")
    p.add_argument("--model-kwargs", default="{}", help="head arguments, JSON (default: the head's defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/bench_mil")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as train-mil does (mil.train.run_folds); the plain loop's time does not move with it
    sizes = tuple(int(v) for v in args.instances.split(","))
    root, target, folds = cohort(Path(args.work), args.slides, args.dim, sizes, args.folds)
    spec = f"{root / 'feats'}@20x"
    store = BagStore(FeatureSpec.parse(spec), cache=False)
    feats = {s: store.get(s).features for s in target}
    cfg = MILConfig(features=spec, labels=str(root / "labels.csv"), splits=str(root / "splits"), out="/tmp/unused",
                    model=args.model, model_kwargs=json.loads(args.model_kwargs),
                    protocol=make_protocol("hipt", epochs=args.epochs), seed=args.seed,
                    bags_per_step=args.bags_per_step, instance_sample=args.instance_sample,
                    precision=args.precision, compile=args.compile)
    bags = make_bags(store, sorted(target), "cpu", True)
    order = epoch_order([d.parts["train"] for _, d in folds], target, lambda s: True)
    best = {"plain": [], "sequential": [], "all_folds": []}
    aucs = {}
    for _ in range(args.repeats):
        runs = [plain_fold(cfg, args.dim, d, feats, args.epochs, args.seed) for _, d in folds]
        best["plain"].append(sum(min(t) for t, _ in runs))
        aucs["plain"] = float(np.mean([a for _, a in runs]))
        runs = [engine_run(cfg, [fold], bags, order, args.dim, args.epochs) for fold in folds]
        best["sequential"].append(sum(min(t) for t, _ in runs))
        aucs["sequential"] = float(np.mean([a for _, a in runs for a in a]))
        times, stacked = engine_run(cfg, folds, bags, order, args.dim, args.epochs)
        best["all_folds"].append(min(times))
        aucs["all_folds"] = float(np.mean(stacked))
    epoch = {k: min(v) for k, v in best.items()}
    print(json.dumps({
        "model": args.model, "model_kwargs": cfg.model_kwargs, "slides": args.slides, "dim": args.dim,
        "instances": sizes, "epochs": args.epochs, "folds": len(folds), "threads": args.threads,
        "bags_per_step": training_plan(cfg).bags_per_step,
        "instance_sample": args.instance_sample, "precision": args.precision, "compile": args.compile,
        "epoch_s_all_folds_summed": {k: round(v, 3) for k, v in epoch.items()},
        "ratio_sequential_vs_plain": round(epoch["sequential"] / epoch["plain"], 3),
        "ratio_all_folds_vs_plain": round(epoch["all_folds"] / epoch["plain"], 3),
        "all_folds_speedup_vs_sequential": round(epoch["sequential"] / epoch["all_folds"], 2),
        "mean_test_auc": {k: round(v, 4) for k, v in aucs.items()}}))


if __name__ == "__main__":
    main()
