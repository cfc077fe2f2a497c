"""The one metric code path of MIL training, reports and comparisons (scikit-learn).

Every metric takes ``probs`` (class probabilities, [n, C], rows summing to 1) and ``labels`` (class indices,
[n]), numpy arrays or torch tensors (the training loop's); predicted class = P(class 1) >= 0.5 for two classes,
else argmax. Non-finite probabilities are refused with a DataError (a NaN score must never become an AUC).
:func:`classification_metrics` gives the one set that summary.csv, the report and compare show (:data:`METRICS`:
AUC, one-vs-rest macro for more than two classes; balanced accuracy; plain accuracy; macro F1, the unweighted
mean of every class's F1, two classes too), each labelled by :func:`metric_label`; :func:`mean_std` their spread.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

from zoomfeat.errors import DataError

THRESHOLD = 0.5  # P(class 1) at or above which a binary prediction is class 1


def _as_numpy(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    """(labels [n] int64, probs [n, C] float64) as numpy arrays; DataError for non-finite probabilities."""
    to_np = lambda v: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)  # noqa: E731
    y = to_np(labels).astype(np.int64).reshape(-1)
    p = to_np(probs).astype(np.float64)
    p = p.reshape(len(y), -1) if p.size else np.zeros((len(y), 0))
    check_finite(p)
    return y, p


def check_finite(probs, what: str = "predictions") -> None:
    """DataError when ``probs`` holds NaN or Inf (``what`` names them: ``fold 3 test predictions``)."""
    p = probs.detach().cpu().numpy() if hasattr(probs, "detach") else np.asarray(probs, dtype=float)
    bad = int(np.size(p) - np.isfinite(p).sum())
    if bad:
        raise DataError(f"{what}: {bad} non-finite (NaN/Inf) probabilities; the model diverged or its inputs are "
                        "not finite (check the features and --lr/--weight-decay)")


def predicted_class(probs: np.ndarray) -> np.ndarray:
    """Class of each row ([n, C] -> [n]): P(class 1) >= 0.5 for two classes (ties go to class 1), else argmax."""
    if len(probs) == 0:
        return np.zeros(0, dtype=np.int64)
    if probs.shape[1] == 2:
        return (probs[:, 1] >= THRESHOLD).astype(np.int64)
    return probs.argmax(axis=1)


def auroc(probs, labels, n_classes: int | None = None) -> float | None:
    """ROC AUC; None when the set is empty or lacks one of the ``n_classes`` classes (undefined)."""
    y, p = _as_numpy(probs, labels)
    n_classes = n_classes or p.shape[1]
    if len(y) == 0 or len(np.unique(y)) < n_classes:
        return None
    if n_classes == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(n_classes))))


def balanced_accuracy(probs, labels, n_classes: int | None = None) -> float | None:
    """Mean recall over the classes present in ``labels``; None for an empty set."""
    y, p = _as_numpy(probs, labels)
    if len(y) == 0:
        return None
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": recall over present classes
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, predicted_class(p)))


def accuracy(probs, labels, n_classes: int | None = None) -> float | None:
    """Share of rows whose predicted class is the label; None for an empty set."""
    y, p = _as_numpy(probs, labels)
    if len(y) == 0:
        return None
    return float(accuracy_score(y, predicted_class(p)))


def macro_f1(probs, labels, n_classes: int | None = None) -> float | None:
    """Unweighted mean of the F1 of every class (0 for a class never predicted right); None when empty."""
    y, p = _as_numpy(probs, labels)
    if len(y) == 0:
        return None
    n_classes = n_classes or p.shape[1]
    return float(f1_score(y, predicted_class(p), average="macro", labels=list(range(n_classes)), zero_division=0))


METRICS: tuple[str, ...] = ("auc", "balanced_accuracy", "accuracy", "macro_f1")


def mean_std(values: list[float | None]) -> dict:
    """Mean and standard deviation (ddof=1) of the defined values (None and NaN left out); std is None with
    fewer than two."""
    defined = [v for v in values if v is not None and not np.isnan(v)]
    mean = float(np.mean(defined)) if defined else None
    std = float(np.std(defined, ddof=1)) if len(defined) >= 2 else None
    return {"mean": mean, "std": std, "n": len(defined), "n_excluded": len(values) - len(defined)}


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for tables, ``n/a`` for undefined."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_mean_std(stats: dict, digits: int = 3) -> str:
    """``mean ± std`` of a :func:`mean_std` dict; ``mean (one fold)`` (its ``over``) without a std."""
    if stats["mean"] is None:
        return "n/a"
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f} (one {stats.get('over', 'fold')})"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def classification_metrics(probs, labels, n_classes: int | None = None) -> dict[str, float | None]:
    """Every metric of :data:`METRICS` of one set of predictions (None where undefined)."""
    return {"auc": auroc(probs, labels, n_classes), "balanced_accuracy": balanced_accuracy(probs, labels, n_classes),
            "accuracy": accuracy(probs, labels, n_classes), "macro_f1": macro_f1(probs, labels, n_classes)}


def metric_label(name: str, n_classes: int = 2) -> str:
    """The unambiguous label of a metric of :data:`METRICS` in tables: ``AUC`` (``AUC (one-vs-rest macro)``
    for more than two classes), ``balanced accuracy``, ``accuracy``, ``macro F1``."""
    if name == "auc":
        return "AUC" if n_classes <= 2 else "AUC (one-vs-rest macro)"
    return {"balanced_accuracy": "balanced accuracy", "accuracy": "accuracy", "macro_f1": "macro F1"}[name]


def confusion(probs, labels, n_classes: int | None = None) -> list[list[int]]:
    """C x C counts (rows: true class, columns: predicted class)."""
    y, p = _as_numpy(probs, labels)
    n_classes = n_classes or p.shape[1]
    return confusion_matrix(y, predicted_class(p), labels=list(range(n_classes))).astype(int).tolist()


def auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Binary ROC AUC of each row: [B, n] (or [n]) labels 0/1 and scores -> [B] (or 0-d); NaN for a single class.

    The Mann-Whitney U statistic with average ranks for ties, which is what ``roc_auc_score`` computes; used
    where thousands of resamples are scored at once (the bootstrap), tested against sklearn.
    """
    labels = np.atleast_2d(np.asarray(labels, dtype=bool))
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    check_finite(scores, "scores")
    ranks = rankdata(scores, axis=1)
    n_pos = labels.sum(axis=1).astype(float)
    n_neg = labels.shape[1] - n_pos
    u = (ranks * labels).sum(axis=1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc

