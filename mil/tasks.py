"""Task presets: which label column to read and how its values map to class indices.

- ``subtyping``: breast-cancer subtypes IDC -> 0, ILC -> 1 (HIPT / ZoomLDM); other codes (MDLC, IMMC, ...)
  are dropped with a count. Column ``label``, or HIPT's ``oncotree_code`` when ``label`` is absent.
- ``hrd``: a binary column (0/1, false/true, HRP/HRD, negative/positive), or with ``hrd_threshold`` a numeric
  score column where score >= threshold is HRD (1) (the usual GIS cut-off is 42).
- ``custom``: any column; classes are ``classes`` in that order, or the sorted distinct values.
Labels outside the known classes raise DataError (except subtyping's documented drop).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pandas as pd

from mil.bags import MILDataWarning
from zoomfeat.errors import ConfigError, DataError

TASKS: tuple[str, ...] = ("subtyping", "hrd", "custom")
SUBTYPES: dict[str, int] = {"IDC": 0, "ILC": 1}
_BINARY: dict[str, int] = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1, "hrp": 0, "hrd": 1,
                           "negative": 0, "positive": 1, "neg": 0, "pos": 1}


@dataclass(frozen=True)
class LabelledCohort:
    """Slides with a class index: ``table`` has ``case_id, slide_id, label`` (string) and ``target`` (int);
    ``label_map`` maps each class name to its index; ``dropped`` counts rows left out, by reason."""

    table: pd.DataFrame
    label_map: dict[str, int]
    dropped: dict[str, int]


def default_label_col(task: str, columns: list[str] | None = None) -> str:
    """``label``, except for subtyping on a table with ``oncotree_code`` and no ``label`` (HIPT's CSV)."""
    if task == "subtyping" and columns is not None and "label" not in columns and "oncotree_code" in columns:
        return "oncotree_code"
    return "label"


def _unknown(values: pd.Series, known: list[str], source: str, col: str) -> DataError:
    bad = sorted(set(values) - set(known))
    return DataError(f"{source}: column {col!r} has unknown class(es) {', '.join(map(repr, bad[:5]))}; "
                     f"expected one of {', '.join(known)} (fix the labels or use --task custom)")


def _subtyping(df: pd.DataFrame) -> tuple[pd.Series, dict[str, int], dict[str, int]]:
    codes = df["label"].str.upper()
    keep = codes.isin(list(SUBTYPES))
    dropped = {}
    if (~keep).any():
        dropped["not IDC/ILC"] = int((~keep).sum())
        counts = codes[~keep].value_counts().to_dict()
        warnings.warn(f"subtyping: dropped {int((~keep).sum())} slide(s) whose label is not IDC/ILC "
                      f"({', '.join(f'{k}: {v}' for k, v in counts.items())})", MILDataWarning, stacklevel=3)
    return codes.where(keep).map(SUBTYPES), dict(SUBTYPES), dropped


def _hrd(df: pd.DataFrame, threshold: float | None, source: str, col: str):
    if threshold is None:
        values = df["label"].str.lower()
        if not values.isin(list(_BINARY)).all():
            raise _unknown(values[~values.isin(list(_BINARY))], ["0", "1"], source, col)
        return values.map(_BINARY), {"HRP": 0, "HRD": 1}, {}
    scores = pd.to_numeric(df["label"], errors="coerce")
    if scores.isna().any():
        bad = df["label"][scores.isna()].iloc[0]
        raise DataError(f"{source}: column {col!r} has a non-numeric HRD score {bad!r}; "
                        "fix it or drop --hrd-threshold for a binary column")
    return (scores >= threshold).astype(int), {"HRP": 0, "HRD": 1}, {}


def _custom(df: pd.DataFrame, classes: tuple[str, ...] | None, source: str, col: str):
    known = list(classes) if classes else sorted(df["label"].unique())
    if not df["label"].isin(known).all():
        raise _unknown(df["label"], known, source, col)
    if len(known) < 2:
        raise DataError(f"{source}: column {col!r} has a single class {known}; MIL needs at least two")
    label_map = {name: i for i, name in enumerate(known)}
    return df["label"].map(label_map), label_map, {}


def apply_task(labels: pd.DataFrame, task: str, label_col: str = "label", hrd_threshold: float | None = None,
               classes: tuple[str, ...] | None = None) -> LabelledCohort:
    """Map the ``label`` column of a :func:`zoomfeat.labels.read_labels` table to class indices."""
    source = labels.attrs.get("source", "labels")
    if task == "subtyping":
        target, label_map, dropped = _subtyping(labels)
    elif task == "hrd":
        target, label_map, dropped = _hrd(labels, hrd_threshold, source, label_col)
    elif task == "custom":
        target, label_map, dropped = _custom(labels, classes, source, label_col)
    else:
        raise ConfigError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    table = labels.assign(target=target).dropna(subset=["target"]).copy()
    table["target"] = table["target"].astype(int)
    if table.empty:
        raise DataError(f"{source}: no slide left with a {task} label in column {label_col!r}; "
                        "check --task and --label-col")
    return LabelledCohort(table.reset_index(drop=True), label_map, {**labels.attrs.get("dropped", {}), **dropped})
