"""Training and evaluating one fold: one fresh head, one Lightning run, predictions on val and test.

Bags are fed one at a time (batch size 1 bag, the MIL standard) from a :class:`~mil.bags.BagStore`; the
train order is a seeded permutation, or with ``balanced`` a seeded class-balanced sampler with replacement.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from mil.bags import BagStore, MILDataWarning
from mil.checks import FiniteLossCheck
from mil.config import MILConfig, effective_model_kwargs
from mil.metrics import auroc_or_none, balanced_accuracy, f1
from mil.models import build_model
from mil.module import MILModule
from zoomfeat.fitting import fit


class BagDataset(Dataset):
    """(features float32 [N, D], target long scalar) per slide, read lazily through the store."""

    def __init__(self, store: BagStore, slide_ids: list[str], targets: list[int]):
        self.store, self.slide_ids, self.targets = store, list(slide_ids), list(targets)

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.get(self.slide_ids[i]).features, torch.tensor(self.targets[i], dtype=torch.long)


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


def _loader(data: BagDataset, shuffle: bool, balanced: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if shuffle and balanced:
        counts = np.bincount(data.targets)
        weights = torch.tensor([1.0 / counts[t] for t in data.targets], dtype=torch.double)
        sampler = WeightedRandomSampler(weights, len(data), replacement=True, generator=generator)
    elif shuffle:
        sampler = RandomSampler(data, generator=generator)
    return DataLoader(data, batch_size=None, sampler=sampler, num_workers=0)


@contextlib.contextmanager
def quiet_lightning():
    """Silence Lightning's info lines (GPU available, seed set, model summary) and its loader hints."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for pattern in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                        ".*GPU available but not used.*", ".*LeafSpec.*", ".*no `val_dataloader`.*"):
            warnings.filterwarnings("ignore", message=pattern)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _trainer(cfg: MILConfig, has_val: bool, progress: bool) -> L.Trainer:
    p = cfg.protocol
    callbacks = []
    if p.patience is not None and has_val:
        callbacks.append(EarlyStopping("val_loss", patience=p.patience, mode="min"))
    devices = int(cfg.devices) if str(cfg.devices).isdigit() else cfg.devices
    return L.Trainer(
        accelerator=cfg.accelerator, devices=devices, max_epochs=p.epochs, min_epochs=p.min_epochs,
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=progress, num_sanity_val_steps=0, deterministic=True,
        limit_val_batches=1.0 if (has_val and p.selection != "last") or callbacks else 0,
    )


@torch.no_grad()
def predict(model: nn.Module, data: BagDataset, n_classes: int) -> tuple[torch.Tensor, float | None]:
    """Class probabilities [n, C] of each bag (eval mode) and the mean bag cross-entropy."""
    model.eval()
    probs, losses = [], []
    for x, y in (data[i] for i in range(len(data))):
        logits = model(x).logits
        probs.append(torch.softmax(logits, 1)[0])
        losses.append(float(F.cross_entropy(logits, y.view(1))))
    stacked = torch.stack(probs) if probs else torch.zeros(0, n_classes)
    return stacked, (float(np.mean(losses)) if losses else None)


def _evaluate(model: nn.Module, store: BagStore, data: FoldData, n_classes: int, fold: int):
    rows, metrics = [], {}
    for split in ("val", "test"):
        ids = data.parts[split]
        ds = BagDataset(store, ids, [data.target[s] for s in ids])
        probs, loss = predict(model, ds, n_classes)
        target = torch.tensor(ds.targets, dtype=torch.long)
        auc = auroc_or_none(probs, target, n_classes)
        if auc is None and split == "test":
            warnings.warn(f"fold {fold}: the test set has {len(ids)} slide(s) of fewer than {n_classes} classes; "
                          "test AUC is undefined (null)", MILDataWarning, stacklevel=2)
        metrics[f"{split}_auc"] = auc
        metrics[f"{split}_loss"] = loss
        metrics[f"{split}_balanced_accuracy"] = balanced_accuracy(probs, target, n_classes)
        metrics[f"{split}_f1"] = f1(probs, target, n_classes)
        rows += [(s, data.case[s], data.target[s], float(p[1]) if p.numel() > 1 else float("nan"), split,
                  *map(float, p)) for s, p in zip(ids, probs)]
    columns = ["slide_id", "case_id", "label", "prob", "split", *(f"prob_{c}" for c in range(n_classes))]
    frame = pd.DataFrame(rows, columns=columns)  # prob_<c>: every class probability (mil.cv names the classes)
    return metrics, frame


def train_fold(cfg: MILConfig, fold: int, data: FoldData, store: BagStore, in_dim: int, n_classes: int,
               progress: bool = False) -> FoldResult:
    """Train one head on ``data.parts["train"]`` and evaluate it on val and test."""
    with quiet_lightning():
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        model = build_model(cfg.model, in_dim, n_classes, **effective_model_kwargs(cfg))
        module = MILModule(model, cfg.protocol.lr, cfg.protocol.weight_decay, n_classes, cfg.protocol.selection)
        train = BagDataset(store, data.parts["train"], [data.target[s] for s in data.parts["train"]])
        val = BagDataset(store, data.parts["val"], [data.target[s] for s in data.parts["val"]])
        trainer = _trainer(cfg, len(val) > 0, progress)
        trainer.callbacks.append(FiniteLossCheck(fold))  # a NaN/Inf loss stops the fold with a DataError
        fit(trainer, module, _loader(train, True, cfg.balanced, cfg.seed),
            _loader(val, False, False, cfg.seed) if len(val) else None)  # Ctrl-C -> KeyboardInterrupt
        module.restore_best()
    epochs = int(trainer.current_epoch)
    best = module.best_epoch if module.best_state is not None else epochs
    metrics, frame = _evaluate(model, store, data, n_classes, fold)
    metrics = {"fold": fold, "test_auc": metrics["test_auc"],
               "test_balanced_accuracy": metrics["test_balanced_accuracy"], "test_f1": metrics["test_f1"],
               "val_auc": metrics["val_auc"], "val_loss": metrics["val_loss"], "test_loss": metrics["test_loss"],
               "n_train": len(train), "n_val": len(val), "n_test": len(data.parts["test"]),
               "epochs_trained": epochs, "best_epoch": best}
    checkpoint = {"state_dict": model.state_dict(), "best_epoch": best}
    return FoldResult(metrics, frame, checkpoint)
