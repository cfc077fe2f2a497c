"""Training and evaluating folds: one fresh head per fold, a plain autograd loop, predictions on val and test.

No Lightning and no DataLoader: their per-step hooks and collation cost more than a small head's step. Bags come
from :class:`mil.cache.BagCache`, one contiguous tensor (a step's bag is a view). The bag order of an epoch is
one seeded permutation of every training slide of the split folder (the union of all folds' training parts); a
fold takes its own training bags in that order, so its numbers do not depend on which other folds are trained
(with ``balanced``, class-balanced sampling with replacement, each fold draws its own order). ``bags_per_step``
consecutive bags make one step: a padded batch with its mask through the head (:mod:`mil.registry`), the loss
the mean bag loss, ``loss.backward()`` and the recipe's optimiser, LR schedule and clipping (:mod:`mil.optim`),
bf16 autocast on a GPU or with ``--precision bf16``. ``instance_sample`` < 1 gives each training step a seeded
share of each bag's instances (:func:`instance_subset`); evaluation always sees whole bags. Every fold starts
from the weights of ``torch.manual_seed(seed)``, and its dropout draws from a generator seeded by (seed, fold).
After each epoch, when the protocol selects or stops on validation, the best weights are kept
(:class:`Selection`); a NaN/Inf training loss stops the run with a DataError naming the fold, epoch and step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch

from mil.bags import MILDataWarning
from mil.cache import BagCache, LazyBags, pad_bags
from mil.config import MILConfig, TrainingPlan, effective_model_kwargs, training_plan
from mil.metrics import auroc
from mil.optim import clip_groups, lr_at, make_optimizer
from mil.registry import build_model
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def retain_freed_memory() -> bool:
    """Let glibc keep freed heap memory for reuse instead of returning it to the OS (once per process).

    By default glibc serves blocks above a dynamic threshold with fresh mmaps and trims the heap whenever more
    than twice that threshold is free at its top. A training step allocates and frees several ~1 MB activations
    (a default ABMIL on a bag of a few thousand instances), so every step page-faulted its memory in again
    (benchmarks/RESULTS.md). With blocks up to 32 MB from the heap and 256 MB of free heap kept, the pages stay
    mapped. True when set; False off glibc (nothing is changed there)."""
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


def instance_subset(slide_id: str, n: int, share: float, seed: int, epoch: int) -> torch.Tensor:
    """Sorted indices of ``max(1, round(share * n))`` of a bag's ``n`` instances, drawn without replacement from
    a generator seeded by (run seed, epoch, slide id): the same draw whichever folds train together."""
    k = min(n, max(1, round(share * n)))
    key = zlib.crc32(slide_id.encode("utf-8"))
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + key) % (2**63 - 1))
    return torch.randperm(n, generator=generator)[:k].sort().values


def _chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


@dataclass
class Selection:
    """Model selection and CLAM's early stopping of one fold."""

    best_score: float | None = None  # the best validation loss
    best_auc: float | None = None  # the best SI-MIL score
    best_epoch: int | None = None
    best_state: dict | None = None
    counter: int = 0
    stopped: bool = False

    def update(self, epoch: int, loss: float, auc: float | None, p, accuracy: float | None,
               state: Callable[[], dict]) -> None:
        """Best weights (``state()``) and CLAM's early-stopping counter after 0-based ``epoch``. ``val_auc``
        selection is SI-MIL's (train.py): score = (validation AUC + accuracy) / 2, and a score equal to the best
        replaces it (the latest of tied epochs is kept; on a small validation set the AUC ties at 1.0 from early
        on, and keeping the first such epoch kept an under-trained model). Without an accuracy the score is the
        AUC."""
        improved = False
        if p.selection == "val_loss" or p.patience is not None:
            better = self.best_score is None or loss <= self.best_score  # CLAM: a loss equal to the best is better
            if p.patience is not None:
                self.counter = 0 if better else self.counter + 1
                self.stopped = self.counter >= p.patience and epoch > p.min_epochs
            if better:
                self.best_score = loss
                improved = p.selection == "val_loss"
        if p.selection == "val_auc" and auc is not None:
            score = auc if accuracy is None else (auc + accuracy) / 2
            if self.best_auc is None or score >= self.best_auc:
                self.best_auc = score
                improved = True
        if improved:
            self.best_epoch, self.best_state = epoch + 1, state()


class FoldTrainer:
    """Trains one fold's head on its training bags, in the shared epoch order of ``order``."""

    def __init__(self, cfg: MILConfig, fold: int, data: FoldData, bags, order: dict[str, int], in_dim: int,
                 n_classes: int, device: str, plan: TrainingPlan):
        self.cfg, self.plan, self.device, self.n_classes = cfg, plan, device, n_classes
        self.fold, self.data = fold, data
        self.bags, self.order_ids = bags, list(order)
        self.index = {s: i for i, s in enumerate(bags.ids)}
        torch.manual_seed(cfg.seed)  # every fold starts from the same weights
        self.model = build_model(cfg.model, in_dim, n_classes, **effective_model_kwargs(cfg)).to(device)
        self.opt = make_optimizer(self.model, plan.recipe, cfg.protocol.lr, cfg.protocol.weight_decay)
        torch.manual_seed(cfg.seed * 1_000_003 + 7919 * (fold + 1))  # the fold's dropout and random splits
        train = set(data.parts["train"])
        self.member = [i for i, s in enumerate(self.order_ids) if s in train]
        self.targets = torch.tensor([order[s] for s in self.order_ids], dtype=torch.long)
        self.order_gen = torch.Generator().manual_seed(cfg.seed)
        self.balanced_gen = torch.Generator().manual_seed(cfg.seed + 104_729 * (fold + 1))
        self.autocast = _autocast(device, plan.precision)
        self.selection = Selection()
        self.epochs = 0

    def _epoch_steps(self) -> list[list[int]]:
        """Chunks of order indices for one epoch: the fold's bags in the shared order, or its balanced draw."""
        size = self.plan.bags_per_step
        if not self.cfg.balanced:
            own = set(self.member)
            perm = torch.randperm(len(self.order_ids), generator=self.order_gen).tolist()
            return _chunks([i for i in perm if i in own], size)
        train = torch.tensor(self.member, dtype=torch.long)
        counts = torch.bincount(self.targets[train], minlength=self.n_classes).double()
        draw = torch.multinomial(1.0 / counts[self.targets[train]], len(train), replacement=True,
                                 generator=self.balanced_gen)
        return _chunks(train[draw].tolist(), size)

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

    def step(self, x: torch.Tensor, mask: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a padded batch: the mean bag loss, backward, clipping, the optimiser."""
        with self.autocast():
            loss = self.model.bag_losses(self.model(x, mask, y), y).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.plan.clip_groups:
            clip_groups(self.model, self.plan.clip_groups)
        self.opt.step()
        return loss.detach()

    def train_epoch(self, epoch: int) -> None:
        self.model.train()
        lr = lr_at(self.plan.recipe, self.cfg.protocol.lr, epoch, self.plan.recipe.reference.get("epochs", 200))
        for group in self.opt.param_groups:
            group["lr"] = lr
        losses = []
        for chunk in self._epoch_steps():
            x, mask = self._step_bags(chunk, epoch)
            losses.append(self.step(x, mask, self.targets[chunk].to(self.device)))
        if losses:  # checked once per epoch: a check per step would wait for the GPU at every step
            bad = (~torch.isfinite(torch.stack(losses))).nonzero().flatten().tolist()
            if bad:
                raise DataError(f"fold {self.fold}: training loss is {losses[bad[0]].item()} at epoch {epoch + 1}, "
                                f"step {bad[0] + 1}: the optimiser diverged (lower --lr, check --weight-decay) or "
                                "the features are not finite")
        self.epochs = epoch + 1

    def state_dict(self) -> dict:
        return {n: t.detach().clone() for n, t in self.model.state_dict().items()}

    @torch.no_grad()
    def predict(self, state: dict | None, slides: list[str]) -> tuple[torch.Tensor, float | None]:
        """Class probabilities [n, C] of each slide's bag (eval mode, weights ``state`` or the current ones)
        and the mean bag cross-entropy."""
        model = self.model
        if state is not None:
            model = copy.deepcopy(self.model)
            model.load_state_dict(state)
        model.eval()
        probs, losses = [], []
        for s in slides:
            with self.autocast():
                logits = model(self.bags.bag(self.index[s]).unsqueeze(0)).logits.float()
            logp = torch.log_softmax(logits, 1)[0]
            probs.append(logp.exp().cpu())
            losses.append(-float(logp[self.data.target[s]]))
        stacked = torch.stack(probs) if probs else torch.zeros(0, self.n_classes)
        return stacked, (float(np.mean(losses)) if losses else None)

    def validate(self, epoch: int) -> None:
        """Validation loss/AUC, best weights, CLAM's early-stopping counter."""
        val = self.data.parts["val"]
        if not val:
            return
        probs, loss = self.predict(None, val)
        target = torch.tensor([self.data.target[s] for s in val])
        accuracy = float((probs.argmax(1) == target).double().mean())
        self.selection.update(epoch, loss, auroc(probs, target, self.n_classes), self.cfg.protocol,
                              accuracy, self.state_dict)

    def fit(self) -> None:
        p = self.cfg.protocol
        validated = p.selection != "last" or p.patience is not None  # the protocol selects or stops on it
        for epoch in range(p.epochs):
            if self.selection.stopped:
                break
            self.train_epoch(epoch)
            if validated:
                self.validate(epoch)

    # ------------------------------------------------------------------ results
    def result(self) -> FoldResult:
        sel = self.selection
        state = sel.best_state if sel.best_state is not None else self.state_dict()
        best = sel.best_epoch if sel.best_state is not None else self.epochs
        metrics, frame = self._evaluate(state)
        parts = self.data.parts
        metrics = {"fold": self.fold, **metrics, "n_train": len(parts["train"]), "n_val": len(parts["val"]),
                   "n_test": len(parts["test"]), "epochs_trained": self.epochs, "best_epoch": best}
        return FoldResult(metrics, frame, {"state_dict": state, "best_epoch": best})

    def _evaluate(self, state: dict):
        rows, metrics = [], {}
        for split in ("val", "test"):
            ids = self.data.parts[split]
            probs, loss = self.predict(state, ids)
            target = torch.tensor([self.data.target[s] for s in ids], dtype=torch.long)
            auc = auroc(probs, target, self.n_classes)
            if auc is None and split == "test":
                warnings.warn(f"fold {self.fold}: the test set has {len(ids)} slide(s) of fewer than "
                              f"{self.n_classes} classes; test AUC is undefined (null)", MILDataWarning, stacklevel=2)
            metrics.update({f"{split}_auc": auc, f"{split}_loss": loss})  # every other metric: mil.cv, from the rows
            rows += [(s, self.data.case[s], self.data.target[s], float(p[1]) if p.numel() > 1 else float("nan"),
                      split, *map(float, p)) for s, p in zip(ids, probs)]
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


def run_folds(cfg: MILConfig, folds: dict[int, FoldData], order: dict[str, int], store, in_dim: int,
              n_classes: int, write) -> None:
    """Train ``folds`` one by one for the init seed ``cfg.seed`` and ``write(fold, result)`` each as it comes back
    (mil.cv prints the run's plan once, and a line per fold). DataErrors of one fold name it."""
    if not folds:
        return
    device = resolve_device(cfg.accelerator)
    plan = training_plan(cfg, device)
    retain_freed_memory()
    needed = sorted({s for data in folds.values() for part in data.parts.values() for s in part})
    bags = make_bags(store, needed, device, cfg.cache)
    for k, data in folds.items():
        try:
            trainer = FoldTrainer(cfg, k, data, bags, order, in_dim, n_classes, device, plan)
            trainer.fit()
            result = trainer.result()
        except DataError as exc:
            if str(exc).startswith(f"fold {k}"):
                raise
            raise DataError(f"fold {k}: {exc}") from exc
        write(k, result)
