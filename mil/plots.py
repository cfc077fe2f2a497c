"""Report figures as PNG bytes (matplotlib, Agg backend, no display): ROC curves, confusion matrix, per-fold AUCs."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from zoomfeat.store import atomic_write  # noqa: E402

FPR_GRID = np.linspace(0.0, 1.0, 101)  # common false-positive-rate grid of the mean ROC


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_png(path, png: bytes):
    """Write PNG bytes to ``path`` atomically (zoomfeat.store.atomic_write); returns the path."""
    with atomic_write(path) as tmp:
        Path(tmp).write_bytes(png)
    return Path(path)


def mean_roc(folds: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict:
    """TPR of each fold interpolated on :data:`FPR_GRID`, then mean and std (ddof=1) over the folds.

    folds: fold -> (labels [n] 0/1, probs [n]); folds whose test set has one class are skipped.
    Returns fpr [G], tpr_mean [G], tpr_std [G] (zeros with one fold), curves (fold -> (fpr, tpr)), used folds.
    """
    curves, grid_tprs = {}, []
    for k, (labels, probs) in folds.items():
        if len(set(np.asarray(labels).tolist())) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, probs)
        curves[k] = (fpr, tpr)
        interp = np.interp(FPR_GRID, fpr, tpr)
        interp[0] = 0.0
        grid_tprs.append(interp)
    if not grid_tprs:
        return {"fpr": FPR_GRID.tolist(), "tpr_mean": None, "tpr_std": None, "folds": [], "curves": {}}
    stack = np.stack(grid_tprs)
    mean = stack.mean(axis=0)
    mean[-1] = 1.0
    std = stack.std(axis=0, ddof=1) if len(stack) > 1 else np.zeros_like(mean)
    return {"fpr": FPR_GRID.tolist(), "tpr_mean": mean.tolist(), "tpr_std": std.tolist(),
            "folds": sorted(curves), "curves": curves}


def roc_figure(folds: dict[int, tuple[np.ndarray, np.ndarray]]) -> tuple[bytes, dict]:
    """PNG of each fold's ROC and the mean ROC with a +-1 std band; also the mean-ROC numbers (JSON-ready)."""
    roc = mean_roc(folds)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, (fpr, tpr) in roc["curves"].items():
        ax.plot(fpr, tpr, lw=1, alpha=0.45, label=f"fold {k}")
    if roc["tpr_mean"] is not None:
        mean, std = np.array(roc["tpr_mean"]), np.array(roc["tpr_std"])
        ax.plot(FPR_GRID, mean, color="navy", lw=2.2, label=f"mean ROC ({len(roc['folds'])} folds)")
        ax.fill_between(FPR_GRID, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color="navy",
                        alpha=0.15, label="± 1 std")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title="ROC on the test set of each fold")
    ax.legend(loc="lower right", fontsize=8)
    data = {key: roc[key] for key in ("fpr", "tpr_mean", "tpr_std", "folds")}
    return _png(fig), data


def confusion_figure(matrix: list[list[int]], classes: list[str] | None = None) -> bytes:
    """PNG of a C x C confusion matrix (rows: true class, columns: predicted class), axes named by ``classes``."""
    counts = np.asarray(matrix)
    names = list(classes) if classes else [str(i) for i in range(len(counts))]
    side = 2.2 + 0.9 * len(names)
    fig, ax = plt.subplots(figsize=(side + 0.4, side))
    ax.imshow(counts, cmap="Blues")
    for (i, j), value in np.ndenumerate(counts):
        colour = "white" if value > counts.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=14)
    ticks = list(range(len(names)))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=names, yticklabels=names,
           xlabel="predicted class", ylabel="true class", title="pooled test predictions")
    return _png(fig)


def fold_auc_figure(series: dict[str, dict[int, float | None]], title: str) -> bytes:
    """PNG of per-fold AUCs: one line of points per feature set, x = fold; undefined AUCs leave a gap."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    folds = sorted({k for values in series.values() for k in values})
    for name, values in series.items():
        ys = [np.nan if values.get(k) is None else values[k] for k in folds]  # NaN: a gap, not a line
        ax.plot(folds, ys, marker="o", lw=1, label=name)
    ax.set(xticks=folds, xlabel="fold", ylabel="test AUC", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def fraction_figure(series: dict[str, dict[float, float]], title: str) -> bytes:
    """PNG of mean test AUC against the training fraction (log x), one line per feature set (and ``+syn``)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, values in series.items():
        xs = sorted(values)
        ax.plot([100 * x for x in xs], [values[x] for x in xs], marker="o", lw=1.2, label=name)
    ax.set_xscale("log")
    ax.set(xlabel="training data (% of each fold's patients)", ylabel="mean test AUC", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    return _png(fig)
