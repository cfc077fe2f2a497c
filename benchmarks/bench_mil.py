"""MIL training speed: train-mil's loop against a plain per-bag PyTorch loop, same head and bags (run by hand).

    python benchmarks/bench_mil.py --models abmil,clam_sb,dsmil --bags-per-step 1,4,8 --threads 1 --epochs 20
    python benchmarks/bench_mil.py --device cuda --precision bf16 --threads 4     # the GPU figure

The cohort is a planted-signal one (tests/mil_data.py: 5% witness instances), written once as real HDF5
feature files and read through mil.bags. Every side trains the same head class at its default widths (the head
train-mil builds, :func:`mil.config.effective_model_kwargs`), from the same initial weights, with the same
threads, device and precision, on the same folds (5 by default):

- ``plain``: the loop of CLAM's / DSMIL's scripts, written here: bags held on the device as a list, one bag per
  step, ``model(x, None, y)``, the head's own loss written out (cross-entropy, mixed with CLAM's instance loss
  0.7 / 0.3 or DSMIL's max-instance loss 0.5 / 0.5 by the head's ``bag_weight``), ``torch.optim.Adam`` with the
  head's recipe under ``hipt`` (lr, betas, weight decay; DSMIL's CosineAnnealingLR stepped per epoch),
  zero_grad / backward / step, over the fold's training bags in a seeded shuffle (the same permutation and
  dropout seed as train-mil, so at one bag per step both sides should end at the same weights);
- ``train-mil B``: mil.train's FoldTrainer (the loop behind ``zoomfeat train-mil``) with ``--bags-per-step B``.

The sides run interleaved, epoch by epoch (each keeps its own torch RNG state, so interleaving changes no
side's numbers): on a shared machine a load change then hits every side alike. Time is CPU seconds of the
process (``time.process_time``) on a CPU, wall seconds after a synchronize on a GPU, summed over all epochs and
folds; ratios are against the plain loop of the same run. AUC: mean test AUC over the folds after ``--epochs``
epochs (plain: the trained model's softmax on each test bag; train-mil: its own evaluation). ``--end-to-end``
also times a whole ``train-mil`` run (mil.cv.run_cv: reading the HDF5 files, training, evaluating, writing
checkpoints, predictions and the summary) against the plain script end to end (h5py reads, the loop, test
predictions, a ``torch.save`` per fold), alternated ``--repeats`` times, at one bag per step.
Prints one JSON line per head.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mil.bags import BagStore, FeatureSpec  # noqa: E402
from mil.config import MILConfig, effective_model_kwargs, make_protocol, training_plan  # noqa: E402
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


def _clock(device: str) -> float:
    """CPU seconds of this process on a CPU; wall seconds (after a synchronize) on a GPU."""
    _sync(device)
    return time.perf_counter() if device.startswith("cuda") else time.process_time()


def _autocast(device: str, precision: str):
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def plain_loss(model, out, y: torch.Tensor) -> torch.Tensor:
    """One bag's training loss as CLAM's and DSMIL's scripts compute it: cross-entropy, and where the head returns
    an auxiliary loss (CLAM's instance clustering, DSMIL's max-instance BCE) ``w * CE + (1 - w) * aux`` with the
    head's bag weight (CLAM 0.7, DSMIL 0.5)."""
    ce = F.cross_entropy(out.logits.float(), y)
    if out.extra_loss is None or (out.extra_valid is not None and not bool(out.extra_valid[0])):
        return ce
    w = float(model.bag_weight)
    return w * ce + (1.0 - w) * out.extra_loss.float().reshape(())


class PlainLoop:
    """The reference loop on one fold (see the module docstring)."""

    def __init__(self, cfg: MILConfig, fold: int, data: FoldData, feats: dict, order: list[str], dim: int,
                 device: str):
        recipe = training_plan(cfg, device).recipe
        if recipe.optimizer != "adam" or recipe.schedule not in ("constant", "cosine"):
            raise SystemExit(f"{cfg.model}: the plain loop here is Adam with a constant or cosine LR")
        self.cfg, self.data, self.feats, self.order, self.device = cfg, data, feats, order, device
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, dim, 2, **effective_model_kwargs(cfg)).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.protocol.lr, betas=recipe.betas,
                                    weight_decay=cfg.protocol.weight_decay)
        self.schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt, T_max=recipe.reference["epochs"], eta_min=recipe.eta_min) if recipe.schedule == "cosine"
            else None)
        torch.manual_seed(cfg.seed * 1_000_003 + 7919 * (fold + 1))  # dropout: train-mil's seed of this fold
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        self.train = set(data.parts["train"])
        self.labels = {s: torch.tensor([data.target[s]], device=device) for s in data.target}

    def train_epoch(self, epoch: int) -> None:
        self.model.train()
        for i in torch.randperm(len(self.order), generator=self.shuffle).tolist():
            s = self.order[i]
            if s not in self.train:
                continue
            y = self.labels[s]
            with _autocast(self.device, self.cfg.precision):
                loss = plain_loss(self.model, self.model(self.feats[s][None], None, y), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        if self.schedule is not None:
            self.schedule.step()

    @torch.no_grad()
    def test_auc(self) -> float:
        self.model.eval()
        test = self.data.parts["test"]
        with _autocast(self.device, self.cfg.precision):
            p = [float(torch.softmax(self.model(self.feats[s][None]).logits.float(), 1)[0, 1]) for s in test]
        return float(roc_auc_score([self.data.target[s] for s in test], p))


class TrainMil:
    """mil.train's FoldTrainer on one fold."""

    def __init__(self, cfg: MILConfig, fold: int, data: FoldData, bags, order: dict, dim: int, device: str):
        self.trainer = FoldTrainer(cfg, fold, data, bags, order, dim, 2, device, training_plan(cfg, device))

    def train_epoch(self, epoch: int) -> None:
        self.trainer.train_epoch(epoch)

    def test_auc(self) -> float:
        return self.trainer.result().metrics["test_auc"]


def bench_head(args, model: str, root: Path, folds, feats, bags, order) -> dict:
    steps = [int(b) for b in args.bags_per_step.split(",")]
    base = dict(features=f"{root / 'feats'}@20x", labels=str(root / "labels.csv"), splits=str(root / "splits"),
                out="/tmp/unused", model=model, protocol=make_protocol("hipt", epochs=args.epochs), seed=args.seed,
                precision=args.precision)
    cfgs = {f"train-mil {b}": MILConfig(**base, bags_per_step=b) for b in steps}
    plain_cfg = MILConfig(**base)
    seconds = {k: 0.0 for k in ["plain", *cfgs]}
    aucs = {k: [] for k in seconds}
    for fold, data in folds:
        sides = {"plain": PlainLoop(plain_cfg, fold, data, feats, list(order), args.dim, args.device),
                 **{k: TrainMil(c, fold, data, bags, order, args.dim, args.device) for k, c in cfgs.items()}}
        rng = {k: torch.get_rng_state() for k in sides}  # each side draws its dropout from its own stream
        for epoch in range(args.epochs):
            for k, side in sides.items():
                torch.set_rng_state(rng[k])
                start = _clock(args.device)
                side.train_epoch(epoch)
                seconds[k] += _clock(args.device) - start
                rng[k] = torch.get_rng_state()
        for k, side in sides.items():
            aucs[k].append(side.test_auc())
    out = {"model": model, "device": args.device, "precision": args.precision, "threads": args.threads,
           "slides": args.slides, "dim": args.dim, "instances": args.instances, "epochs": args.epochs,
           "folds": len(folds), "clock": "wall" if args.device.startswith("cuda") else "cpu",
           "epoch_s_summed_over_folds": {k: round(v / args.epochs, 3) for k, v in seconds.items()},
           "ratio_vs_plain": {k: round(v / seconds["plain"], 3) for k, v in seconds.items() if k != "plain"},
           "mean_test_auc": {k: round(float(np.mean(v)), 4) for k, v in aucs.items()}}
    if args.end_to_end:
        out["end_to_end"] = end_to_end(args, model, root, folds, order, base)
    return out


def plain_script(args, model: str, root: Path, folds, order, cfg: MILConfig, out: Path) -> float:
    """The plain script end to end: read every bag with h5py, train and test each fold, save its weights."""
    import h5py

    feats = {}
    for path in sorted((root / "feats").glob("*.h5")):
        with h5py.File(path, "r") as f:
            feats[path.stem] = torch.from_numpy(f["20x/features"][()]).float().to(args.device)
    aucs = []
    for fold, data in folds:
        loop = PlainLoop(cfg, fold, data, feats, list(order), args.dim, args.device)
        for epoch in range(args.epochs):
            loop.train_epoch(epoch)
        aucs.append(loop.test_auc())
        torch.save(loop.model.state_dict(), out / f"fold_{fold}.pt")
    return float(np.mean(aucs))


def end_to_end(args, model: str, root: Path, folds, order, base: dict) -> dict:
    """CPU (GPU: wall) seconds per epoch of a whole train-mil run against the plain script, alternated."""
    from mil.cv import run_cv

    seconds, aucs = {"plain script": [], "train-mil run": []}, {}
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = _clock(args.device)
            aucs["plain script"] = plain_script(args, model, root, folds, order, MILConfig(**base), Path(tmp))
            seconds["plain script"].append(_clock(args.device) - start)
            cfg = MILConfig(**{**base, "out": str(Path(tmp) / "run"), "accelerator": args.device})
            start = _clock(args.device)
            summary = run_cv(cfg)
            seconds["train-mil run"].append(_clock(args.device) - start)
            aucs["train-mil run"] = float(summary[(summary.seed == "mean") & (summary.fold == "mean")].test_auc.iloc[0])
    total = {k: sum(v) for k, v in seconds.items()}
    return {"epoch_s_summed_over_folds": {k: round(v / (args.repeats * args.epochs), 3) for k, v in total.items()},
            "ratio_vs_plain": round(total["train-mil run"] / total["plain script"], 3),
            "mean_test_auc": {k: round(v, 4) for k, v in aucs.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="abmil,clam_sb,dsmil")
    p.add_argument("--bags-per-step", default="1,4,8", help="train-mil's --bags-per-step values to measure")
    p.add_argument("--slides", type=int, default=60)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--instances", default="100,200", help="bag size range lo,hi")
    p.add_argument("--epochs", type=int, default=20, help="the hipt preset's 20 by default")
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold split (default 5)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (every side)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="every side (bf16: autocast)")
    p.add_argument("--end-to-end", action="store_true",
                   help="also time a whole train-mil run (run_cv) against the plain script end to end")
    p.add_argument("--repeats", type=int, default=1, help="alternated end-to-end runs (--end-to-end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/bench_mil")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    import mil.cv  # noqa: F401  (imported before any clock starts: the end-to-end runs time no imports)

    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as train-mil does (mil.train.run_folds)
    sizes = tuple(int(v) for v in args.instances.split(","))
    root, target, folds = cohort(Path(args.work), args.slides, args.dim, sizes, args.folds)
    store = BagStore(FeatureSpec.parse(f"{root / 'feats'}@20x"), cache=False)
    feats = {s: store.get(s).features.float().to(args.device) for s in target}
    bags = make_bags(store, sorted(target), args.device, True)
    order = epoch_order([d.parts["train"] for _, d in folds], target, lambda s: True)
    for model in args.models.split(","):
        print(json.dumps(bench_head(args, model, root, folds, feats, bags, order)), flush=True)


if __name__ == "__main__":
    main()
