"""Fold metrics (torchmetrics): AUROC (None when undefined), balanced accuracy, F1."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    binary_auroc, binary_f1_score, multiclass_auroc, multiclass_f1_score, multiclass_recall)


def auroc_or_none(probs: torch.Tensor, target: torch.Tensor, n_classes: int) -> float | None:
    """AUROC of ``probs`` [n, C] against ``target`` [n]; None when the set lacks a class (undefined)."""
    if target.numel() == 0 or len(torch.unique(target)) < n_classes:
        return None
    if n_classes == 2:
        return float(binary_auroc(probs[:, 1], target))
    return float(multiclass_auroc(probs, target, num_classes=n_classes, average="macro"))


def balanced_accuracy(probs: torch.Tensor, target: torch.Tensor, n_classes: int) -> float | None:
    """Mean recall over the classes present in ``target`` (sklearn's balanced accuracy)."""
    if target.numel() == 0:
        return None
    recall = multiclass_recall(probs.argmax(1), target, num_classes=n_classes, average=None)
    present = torch.bincount(target, minlength=n_classes) > 0
    return float(recall[present].mean())


def f1(probs: torch.Tensor, target: torch.Tensor, n_classes: int) -> float | None:
    """Binary F1 of class 1 (macro F1 for more classes)."""
    if target.numel() == 0:
        return None
    if n_classes == 2:
        return float(binary_f1_score(probs[:, 1], target))
    return float(multiclass_f1_score(probs.argmax(1), target, num_classes=n_classes, average="macro"))
