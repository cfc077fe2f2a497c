"""Training and evaluating folds: one fresh head per fold, a plain training loop, predictions on val and test.

The loop (no Lightning, no DataLoader: its per-step hooks and collation cost more than a small head's step):

- bags come from :class:`mil.cache.BagCache`, one contiguous tensor (a step's bag is a view);
- the bag order of an epoch is one seeded permutation of every training slide of the split folder (the union
  of all folds' training parts); a fold takes the steps whose bags are in its training part, in that order.
  With ``balanced`` (class-balanced sampling with replacement) each fold draws its own order instead;
- ``bags_per_step`` consecutive bags of the order make one optimiser step (padded, masked; the loss is the
  mean bag loss of the fold's bags among them); one bag per step is the default;
- ``instance_sample`` < 1: each training step sees a random share of each bag's instances, drawn per (seed,
  epoch, slide) (:func:`instance_subset`), so every fold of a stacked run sees the draw it would see alone; a
  bag memorised by its noise instances looks different every epoch. Evaluation always sees whole bags;
- several folds train at once (``all_folds``): every parameter is stacked over the folds ([F, ...]) and one
  call of the head computes all of them (:mod:`mil.layers`); each fold keeps its own optimiser state, dropout
  generator and early-stopping state. A fold trained alone runs the same code with F = 1 and gets bit-identical
  weights and predictions (tested);
- ABMIL's and CLAM's embedding + gated attention run as one autograd node with a hand-written backward
  (:class:`mil.layers.EmbedGatedAttention`), dropout masks from 64-bit random words (:func:`mil.layers.keep_mask`);
  a head with its whole step written out (``fused_step``: ABMIL, CLAM-SB/MB, DSMIL) runs that instead of autograd,
  ABMIL's optionally through ``torch.compile`` (``--compile``);
- AdamW-free fused Adam (or RAdam + Lookahead), the head's LR schedule, per-fold gradient clipping, bf16
  autocast on a GPU and with ``--precision bf16`` on a CPU (:func:`mil.config.training_plan`); Linear weights
  are held transposed so that their gradients arrive in the parameters' layout (no copy per step);
- after each epoch, when the protocol selects or stops on validation, each fold's model predicts its
  validation bags; the best weights are kept (``last``, ``val_loss``, ``val_auc``; CLAM's early stopping);
- a NaN/Inf training loss stops the run with a DataError naming the fold, epoch and step.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from mil.bags import MILDataWarning
from mil.cache import BagCache, LazyBags, pad_bags
from mil.config import MILConfig, TrainingPlan, effective_model_kwargs, training_plan
from mil.layers import Linear, fold_generators
from mil.metrics import auroc_or_none, balanced_accuracy, f1
from mil.models import build_model
from mil.optim import FoldOptimizer, clip_per_fold, lr_at
from zoomfeat.errors import ConfigError, DataError


@dataclass(frozen=True)
class FoldData:
    """Slide ids, targets and case ids of one fold's parts, after leaving out unusable slides."""

    parts: dict[str, list[str]]  # "train" | "val" | "test" -> slide ids
    target: dict[str, int]
    case: dict[str, str]


@dataclass
class FoldResult:
    metrics: dict
    predictions: pd.DataFrame
    checkpoint: dict


@dataclass
class _Fold:
    """Training state of one fold: its row in the stacked parameters, selection and early stopping."""

    fold: int
    data: FoldData
    member: torch.Tensor  # [n order slides] float: 1 for the fold's training bags
    generator: torch.Generator
    best_score: float | None = None
    best_epoch: int | None = None
    best_state: dict | None = None
    counter: int = 0
    stopped: bool = False
    epochs: int = 0
    order: torch.Generator | None = None  # balanced sampling: the fold's own order
    extra: dict = field(default_factory=dict)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def retain_freed_memory() -> bool:
    """Let glibc keep freed heap memory for reuse instead of returning it to the OS (once per process).

    By default glibc serves blocks above a dynamic threshold with fresh mmaps and trims the heap whenever more
    than twice that threshold is free at its top. A training step allocates and frees several ~1 MB activations
    (3 stacked folds of a default ABMIL), so every step page-faulted its memory in again: 1.4 s of system time
    in a 20 s benchmark and a 20% slower --all-folds epoch (benchmarks/RESULTS.md). With blocks up to 32 MB
    from the heap and 256 MB of free heap kept, the pages stay mapped. True when set; False off glibc (nothing
    is changed there)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 256 << 20))


def resolve_device(accelerator: str) -> str:
    """``cpu``; ``gpu``/``cuda``: the first GPU; ``auto``: a GPU when there is one; ``mps``."""
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--accelerator {accelerator} but no CUDA GPU is visible: use --accelerator cpu")
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return accelerator


def _autocast(device: str, precision: str):
    if precision != "bf16":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def _fold_generator(seed: int, fold: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + 7919 * (fold + 1))


def instance_subset(slide_id: str, n: int, share: float, seed: int, epoch: int) -> torch.Tensor:
    """Sorted indices of ``max(1, round(share * n))`` of a bag's ``n`` instances, drawn without replacement from
    a generator seeded by (run seed, epoch, slide id): the same draw whichever folds train together."""
    k = min(n, max(1, round(share * n)))
    key = zlib.crc32(slide_id.encode("utf-8"))
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + key) % (2**63 - 1))
    return torch.randperm(n, generator=generator)[:k].sort().values


def _chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


class Engine:
    """Trains the folds given (stacked) on the bags of ``bags`` in the order of ``order_ids``."""

    def __init__(self, cfg: MILConfig, folds: list[tuple[int, FoldData]], bags, order: dict[str, int],
                 in_dim: int, n_classes: int, device: str, plan: TrainingPlan):
        self.cfg, self.plan, self.device, self.n_classes = cfg, plan, device, n_classes
        self.bags, self.order_ids = bags, list(order)
        self.index = {s: i for i, s in enumerate(bags.ids)}
        torch.manual_seed(cfg.seed)  # every fold starts from the same weights, as one fold alone does
        self.head = build_model(cfg.model, in_dim, n_classes, **effective_model_kwargs(cfg)).to(device)
        init = {n: p.detach() for n, p in self.head.named_parameters()}
        self.names = list(init)
        self.slots = [(self.head.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in self.names]
        # Linear weights are held transposed ([F, in, out]) and bound as a view [F, out, in]: the batched matmul
        # then yields their gradient in the held layout, with no copy (the fused Adam kernel needs a gradient
        # laid out like its parameter)
        self.transposed = {n for (mod, attr), n in zip(self.slots, self.names)
                           if isinstance(mod, Linear) and attr == "weight"}
        self.params = {n: (p.t() if n in self.transposed else p).unsqueeze(0).repeat(
            len(folds), *([1] * p.dim())).contiguous() for n, p in init.items()}
        self.opt = FoldOptimizer(self.params, plan.recipe, cfg.protocol.lr, cfg.protocol.weight_decay)
        self.folds = [self._fold_state(k, data) for k, data in folds]
        self.order_gen = torch.Generator().manual_seed(cfg.seed)
        self.targets = torch.tensor([order[s] for s in self.order_ids], dtype=torch.long)
        self.autocast = _autocast(device, plan.precision)
        # a head with its training step written out (ABMIL, CLAM, DSMIL) runs it instead of autograd; in bf16 only
        # where the written-out step has bf16 products (else autocast keeps the precision the plan names)
        self.fused = getattr(self.head, "fused_step", None)
        if plan.precision == "bf16" and not getattr(self.head, "fused_bf16", True):
            self.fused = None
        self._compiled = False
        self.eval_head = build_model(cfg.model, in_dim, n_classes, **effective_model_kwargs(cfg)).to(device)

    def _fold_state(self, k: int, data: FoldData) -> _Fold:
        train = set(data.parts["train"])
        member = torch.tensor([1.0 if s in train else 0.0 for s in self.order_ids])
        order = torch.Generator().manual_seed(self.cfg.seed + 104_729 * (k + 1)) if self.cfg.balanced else None
        return _Fold(k, data, member, _fold_generator(self.cfg.seed, k, self.device), order=order)

    # ------------------------------------------------------------------ schedule
    def _epoch_steps(self) -> list[list[int]]:
        """Chunks of order indices for one epoch (shared order, or each fold's balanced draw)."""
        size = self.plan.bags_per_step
        if not self.cfg.balanced:
            return _chunks(torch.randperm(len(self.order_ids), generator=self.order_gen).tolist(), size)
        (fold,) = self.folds  # balanced: one fold per engine (checked by the config)
        train = torch.nonzero(fold.member).flatten()
        counts = torch.bincount(self.targets[train], minlength=self.n_classes).double()
        weights = 1.0 / counts[self.targets[train]]
        draw = torch.multinomial(weights, len(train), replacement=True, generator=fold.order)
        return _chunks(train[draw].tolist(), size)

    # ------------------------------------------------------------------ one step
    def _step_bags(self, chunk: list[int], epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's bags, padded; with ``instance_sample`` < 1 each is its seeded random share of instances."""
        ids = [self.index[self.order_ids[i]] for i in chunk]
        share = self.plan.instance_sample
        if share >= 1:
            return self.bags.batch(ids)
        bags = []
        for i, k in zip(ids, chunk):
            bag = self.bags.bag(i)
            keep = instance_subset(self.order_ids[k], len(bag), share, self.cfg.seed, epoch)
            bags.append(bag[keep.to(bag.device)])
        return pad_bags(bags)

    def _step(self, chunk: list[int], rows: list[int], weights: torch.Tensor, lr: float,
              epoch: int) -> torch.Tensor:
        x, mask = self._step_bags(chunk, epoch)
        y = self.targets[chunk].to(self.device)
        every = rows == list(range(len(self.folds)))
        xs = x.unsqueeze(0).expand(len(rows), *x.shape)
        w = weights.to(self.device)
        if self.fused is not None:
            per_fold, grads = self._fused_step(xs, mask, y, w, rows, every)
        else:
            leaf = {n: (p if every else p[rows]).detach().requires_grad_(True) for n, p in self.params.items()}
            with fold_generators([self.folds[r].generator for r in rows]), self.autocast(), self._bound(leaf):
                out = self.head.forward_bags(xs, mask, y)
                losses = self.head.bag_losses(out, y).float()  # [F, B]
            per_fold = (losses * w).sum(-1) / w.sum(-1)
            # autograd.grad hands the gradients over as computed (.backward() would copy each into .grad)
            grads = dict(zip(leaf, torch.autograd.grad(per_fold.sum(), list(leaf.values()),
                                                       materialize_grads=True)))
        if self.plan.clip_groups:
            clip_per_fold(grads, self.plan.clip_groups)
        self.opt.step(grads, rows, lr)
        return per_fold.detach()

    def _fused_step(self, xs, mask, y, w, rows: list[int], every: bool):
        """The head's written-out step (no autograd graph): per-fold losses and gradients in the held layouts."""
        params = {n: (p if every else p[rows]) for n, p in self.params.items()}
        low = torch.bfloat16 if self.plan.precision == "bf16" else None
        with fold_generators([self.folds[r].generator for r in rows]), self._bound(params):
            if not self.plan.compile or self._compiled:
                per_fold, grads = self.fused(xs, mask, y, w, low, self.plan.compile)
            else:  # the first compiled call compiles: a missing compiler is a setup error, said once
                try:
                    per_fold, grads = self.fused(xs, mask, y, w, low, True)
                except Exception as exc:  # torch.compile raises backend-specific types
                    reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                    raise ConfigError(f"--compile: torch.compile failed ({reason}); it needs a C++ compiler on the "
                                      "CPU (gcc or clang) or Triton on a GPU: install one or drop --compile") from exc
                self._compiled = True
        return per_fold, {n: g.transpose(-1, -2) if n in self.transposed else g for n, g in grads.items()}

    @contextlib.contextmanager
    def _bound(self, tensors: dict[str, torch.Tensor]):
        """The head's parameters replaced by ``tensors`` (stacked) for one call, like
        ``torch.func.functional_call`` without its per-call walk over the modules."""
        saved = [(mod, attr, mod._parameters[attr]) for mod, attr in self.slots]
        try:
            for (mod, attr), name in zip(self.slots, self.names):
                t = tensors[name]
                mod._parameters[attr] = t.transpose(-1, -2) if name in self.transposed else t
            yield
        finally:
            for mod, attr, original in saved:
                mod._parameters[attr] = original

    def _check_finite(self, losses: torch.Tensor, rows: list[int], epoch: int, step: int) -> None:
        if bool(torch.isfinite(losses).all()):
            return
        bad = next(r for r, v in zip(rows, losses.tolist()) if not math.isfinite(v))
        raise DataError(f"fold {self.folds[bad].fold}: training loss is {losses[rows.index(bad)].item()} at epoch "
                        f"{epoch + 1}, step {step}: the optimiser diverged (lower --lr, check --weight-decay) or "
                        "the features are not finite")

    def train_epoch(self, epoch: int) -> None:
        self.head.train()
        lr = lr_at(self.plan.recipe, self.cfg.protocol.lr, epoch, self.plan.recipe.reference.get("epochs", 200))
        live = [r for r, f in enumerate(self.folds) if not f.stopped]
        members = torch.stack([f.member for f in self.folds])  # [F, n]
        for step, chunk in enumerate(self._epoch_steps(), start=1):
            w = members[live][:, chunk] if not self.cfg.balanced else torch.ones(1, len(chunk))
            keep = [i for i in range(len(live)) if bool(w[i].any())]
            if not keep:
                continue
            rows = [live[i] for i in keep]
            losses = self._step(chunk, rows, w[keep], lr, epoch)
            self._check_finite(losses, rows, epoch, step)
        for r in live:
            self.folds[r].epochs = epoch + 1

    # ------------------------------------------------------------------ evaluation
    def fold_state_dict(self, row: int) -> dict:
        return {n: (p[row].t() if n in self.transposed else p[row]).detach().contiguous().clone()
                for n, p in self.params.items()}

    @torch.no_grad()
    def predict(self, state: dict, slides: list[str]) -> tuple[torch.Tensor, float | None]:
        """Class probabilities [n, C] of each slide's bag (eval mode) and the mean bag cross-entropy."""
        self.eval_head.load_state_dict(state)
        self.eval_head.eval()
        probs, losses = [], []
        for s in slides:
            with self.autocast():
                logits = self.eval_head(self.bags.bag(self.index[s])).logits.float()
            logp = torch.log_softmax(logits, 1)[0]
            probs.append(logp.exp().cpu())
            losses.append(-float(logp[self._fold_target(s)]))
        stacked = torch.stack(probs) if probs else torch.zeros(0, self.n_classes)
        return stacked, (float(np.mean(losses)) if losses else None)

    def _fold_target(self, slide: str) -> int:
        for f in self.folds:
            if slide in f.data.target:
                return f.data.target[slide]
        raise KeyError(slide)

    def validate(self, epoch: int) -> None:
        """Per live fold: validation loss/AUC, best weights, CLAM's early-stopping counter."""
        p = self.cfg.protocol
        for row, f in enumerate(self.folds):
            if f.stopped or not f.data.parts["val"]:
                continue
            probs, loss = self.predict(self.fold_state_dict(row), f.data.parts["val"])
            target = torch.tensor([f.data.target[s] for s in f.data.parts["val"]])
            accuracy = float((probs.argmax(1) == target).double().mean())
            self._track(f, row, epoch, loss, auroc_or_none(probs, target, self.n_classes), p, accuracy)

    def _track(self, f: _Fold, row: int, epoch: int, loss: float, auc: float | None, p,
               accuracy: float | None = None) -> None:
        """Best weights and CLAM's early-stopping counter after 0-based ``epoch``. ``val_auc`` selection is
        SI-MIL's (train.py): score = (validation AUC + accuracy) / 2, and a score equal to the best replaces it
        (the latest of tied epochs is kept; on a small validation set the AUC ties at 1.0 from early on, and
        keeping the first such epoch kept an under-trained model). Without an accuracy the score is the AUC."""
        improved = False
        if p.selection == "val_loss" or p.patience is not None:
            better = f.best_score is None or loss <= f.best_score  # CLAM: a loss equal to the best is better
            if p.patience is not None:
                f.counter = 0 if better else f.counter + 1
                f.stopped = f.counter >= p.patience and epoch > p.min_epochs
            if better:
                f.best_score = loss
                improved = p.selection == "val_loss"
        if p.selection == "val_auc" and auc is not None:
            score = auc if accuracy is None else (auc + accuracy) / 2
            if f.extra.get("best_auc") is None or score >= f.extra["best_auc"]:
                f.extra["best_auc"] = score
                improved = True
        if improved:
            f.best_epoch, f.best_state = epoch + 1, self.fold_state_dict(row)

    def needs_validation(self) -> bool:
        return self.cfg.protocol.selection != "last" or self.cfg.protocol.patience is not None

    def fit(self, progress: bool = False) -> None:
        for epoch in range(self.cfg.protocol.epochs):
            if all(f.stopped for f in self.folds):
                break
            self.train_epoch(epoch)
            if self.needs_validation():
                self.validate(epoch)

    # ------------------------------------------------------------------ results
    def result(self, row: int) -> FoldResult:
        f = self.folds[row]
        state = f.best_state if f.best_state is not None else self.fold_state_dict(row)
        best = f.best_epoch if f.best_state is not None else f.epochs
        metrics, frame = self._evaluate(state, f)
        metrics = {"fold": f.fold, "test_auc": metrics["test_auc"],
                   "test_balanced_accuracy": metrics["test_balanced_accuracy"], "test_f1": metrics["test_f1"],
                   "val_auc": metrics["val_auc"], "val_loss": metrics["val_loss"], "test_loss": metrics["test_loss"],
                   "n_train": len(f.data.parts["train"]), "n_val": len(f.data.parts["val"]),
                   "n_test": len(f.data.parts["test"]), "epochs_trained": f.epochs, "best_epoch": best}
        return FoldResult(metrics, frame, {"state_dict": state, "best_epoch": best})

    def _evaluate(self, state: dict, f: _Fold):
        rows, metrics = [], {}
        for split in ("val", "test"):
            ids = f.data.parts[split]
            probs, loss = self.predict(state, ids)
            target = torch.tensor([f.data.target[s] for s in ids], dtype=torch.long)
            auc = auroc_or_none(probs, target, self.n_classes)
            if auc is None and split == "test":
                warnings.warn(f"fold {f.fold}: the test set has {len(ids)} slide(s) of fewer than "
                              f"{self.n_classes} classes; test AUC is undefined (null)", MILDataWarning, stacklevel=2)
            metrics[f"{split}_auc"] = auc
            metrics[f"{split}_loss"] = loss
            metrics[f"{split}_balanced_accuracy"] = balanced_accuracy(probs, target, self.n_classes)
            metrics[f"{split}_f1"] = f1(probs, target, self.n_classes)
            rows += [(s, f.data.case[s], f.data.target[s], float(p[1]) if p.numel() > 1 else float("nan"), split,
                      *map(float, p)) for s, p in zip(ids, probs)]
        columns = ["slide_id", "case_id", "label", "prob", "split", *(f"prob_{c}" for c in range(self.n_classes))]
        return metrics, pd.DataFrame(rows, columns=columns)  # prob_<c>: every class (mil.cv names them)


def epoch_order(train_parts: list[list[str]], targets: dict[str, int], usable) -> dict[str, int]:
    """The slides every epoch's order runs over, sorted, with their targets: the training slides of every fold
    of the split folder (not only the folds trained now, so a fold's numbers do not depend on ``--folds``)
    that have a label and a usable bag (``usable(slide)``)."""
    return {s: targets[s] for s in sorted({s for part in train_parts for s in part}) if s in targets and usable(s)}


def make_bags(store, slide_ids: list[str], device: str, cache: bool):
    """The run's bags: one contiguous cached tensor, or read per access with ``cache`` False."""
    return BagCache(store, slide_ids, device) if cache else LazyBags(store, slide_ids, device)


def train_folds(cfg: MILConfig, folds: list[tuple[int, FoldData]], bags, order: dict[str, int], in_dim: int,
                n_classes: int, progress: bool = False) -> list[FoldResult]:
    """Train ``folds`` together (stacked) and evaluate each on its val and test parts."""
    device = resolve_device(cfg.accelerator)
    engine = Engine(cfg, folds, bags, order, in_dim, n_classes, device, training_plan(cfg, device))
    engine.fit(progress)
    return [engine.result(row) for row in range(len(folds))]


def _needed(cfg: MILConfig, folds: dict[int, FoldData], order: dict[str, int]) -> list[str]:
    """Bags a run reads: every part of the folds trained, and the whole order when steps pad several bags
    (a step's padded batch holds bags of other folds too)."""
    ids = {s for data in folds.values() for part in data.parts.values() for s in part}
    if training_plan(cfg).bags_per_step > 1:
        ids |= set(order)
    return sorted(ids)


def run_folds(cfg: MILConfig, folds: dict[int, FoldData], order: dict[str, int], store, in_dim: int,
              n_classes: int, write, progress: bool = False) -> None:
    """Train ``folds`` (all at once with ``cfg.all_folds``, else one by one) for the init seed ``cfg.seed`` and
    ``write(fold, result)`` each as it comes back (mil.cv prints the run's plan once, and a line per fold).
    DataErrors of one fold name it."""
    if not folds:
        return
    device = resolve_device(cfg.accelerator)
    retain_freed_memory()
    bags = make_bags(store, _needed(cfg, folds, order), device, cfg.cache)
    groups = [list(folds)] if cfg.all_folds else [[k] for k in folds]
    for group in groups:
        try:
            results = train_folds(cfg, [(k, folds[k]) for k in group], bags, order, in_dim, n_classes, progress)
        except DataError as exc:
            if len(group) > 1 or str(exc).startswith(f"fold {group[0]}"):
                raise
            raise DataError(f"fold {group[0]}: {exc}") from exc
        for k, result in zip(group, results):
            write(k, result)


def train_fold(cfg: MILConfig, fold: int, data: FoldData, store, in_dim: int, n_classes: int,
               progress: bool = False) -> FoldResult:
    """Train one head on ``data.parts["train"]`` alone (its own training slides make the epoch order) and
    evaluate it on val and test."""
    order = epoch_order([data.parts["train"]], data.target, lambda s: True)
    bags = make_bags(store, _needed(cfg, {fold: data}, order), resolve_device(cfg.accelerator), cfg.cache)
    return train_folds(cfg, [(fold, data)], bags, order, in_dim, n_classes, progress)[0]
