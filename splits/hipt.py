"""Importing HIPT's (CLAM-style) BRCA subtyping splits: ``zoomfeat splits hipt``.

HIPT's split files list 1,041 TCGA-BRCA slides, but its dataset CSV labels only IDC and ILC (by
``oncotree_code``, map {IDC: 0, ILC: 1}); HIPT silently drops every other slide when it builds a fold. This
module does the same, explicitly: it keeps slides with a kept class, counts what it dropped and why, and
returns normalised folds plus a ``case_id, slide_id, label`` table. Requested classes that the table lacks (a
typo such as ``IDC,XYZ``) are refused before anything is written; folds left without a trainable part are
listed by :meth:`HiptImport.problems` (the command warns about them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from splits.io import PARTS, SplitFold, make_fold, read_splits_dir, write_splits_dir
from zoomfeat.labels import read_labels, write_labels
from zoomfeat.errors import ConfigError

HIPT_CLASSES: tuple[str, ...] = ("IDC", "ILC")
HIPT_LABEL_COLUMN = "oncotree_code"
NOT_IN_TABLE = "not in the label table"


@dataclass(frozen=True)
class HiptImport:
    """Result of an import: kept folds and labels, and counts of what was dropped, by reason."""

    folds: tuple[SplitFold, ...]
    labels: pd.DataFrame = field(repr=False)       # case_id, slide_id, label: the kept slides
    dropped_slides: dict[str, int]                 # distinct split-file slides dropped, by reason
    dropped_per_fold: tuple[dict[str, int], ...]   # fold -> part -> slides dropped
    dropped_label_rows: dict[str, int]             # label-table rows fixed or dropped by the reader
    labelled_not_in_splits: int                    # kept-class slides that no split file names

    def summary(self) -> list[str]:
        """Human-readable lines: what was kept and what was dropped, and why."""
        labels = self.labels
        counts = ", ".join(f"{n} {c}" for c, n in sorted(Counter(labels["label"]).items()))
        lines = [f"kept {len(labels)} labelled slides of {labels['case_id'].nunique()} patients ({counts})"]
        for reason, n in sorted(self.dropped_slides.items()):
            lines.append(f"dropped {n} slide(s) named in the split files: {reason}")
        for reason, n in sorted(self.dropped_label_rows.items()):
            lines.append(f"label table: dropped {n} row(s): {reason}")
        if self.labelled_not_in_splits:
            lines.append(f"{self.labelled_not_in_splits} labelled slide(s) are in no split file")
        for fold, dropped in zip(self.folds, self.dropped_per_fold):
            sizes = "/".join(str(n) for n in fold.sizes())
            gone = "/".join(str(dropped[p]) for p in PARTS)
            lines.append(f"fold {fold.index}: train/val/test {sizes} (dropped {gone})")
        return lines

    def problems(self) -> list[str]:
        """Folds that cannot be trained (empty train/test part, one-class training part): see splits.audit."""
        from splits.audit import trainability_problems

        label_of = dict(zip(self.labels["slide_id"], self.labels["label"]))
        return [p for f in self.folds for p in trainability_problems(
            f.index, dict(zip(PARTS, f.sizes())), {label_of[s] for s in f.train})]


def _check_classes(table: pd.DataFrame, classes: Sequence[str], label_col: str, source: str) -> None:
    """ConfigError for a requested class absent from the table, or fewer than two classes (one-class folds)."""
    present = set(table["label"])
    absent = [c for c in classes if c not in present]
    if absent:
        seen = ", ".join(sorted(map(str, present))[:8])
        raise ConfigError(f"--classes {','.join(classes)}: {', '.join(absent)} not in column {label_col!r} of "
                          f"{source} (values there: {seen}); every fold would lack it")
    if len(set(classes)) < 2:
        raise ConfigError(f"--classes {','.join(classes)}: give at least two classes (one class makes folds "
                          "a MIL head cannot learn from)")


def _drop_reason(slide: str, all_labels: dict[str, str], classes: Sequence[str], label_col: str) -> str:
    if slide not in all_labels:
        return NOT_IN_TABLE
    return f"{label_col} {all_labels[slide]!r} is not one of {', '.join(classes)}"


def import_hipt(splits_dir: str | Path, labels_path: str | Path, *, classes: Sequence[str] = HIPT_CLASSES,
                label_col: str = HIPT_LABEL_COLUMN) -> HiptImport:
    """Read HIPT split files and label table (CSV or HIPT's zip); keep slides whose label is in ``classes``."""
    table = read_labels(labels_path, label_col=label_col)
    _check_classes(table, classes, label_col, str(labels_path))
    all_labels = dict(zip(table["slide_id"], table["label"]))
    kept = table[table["label"].isin(classes)][["case_id", "slide_id", "label"]].reset_index(drop=True)
    keep = set(kept["slide_id"])
    reasons: dict[str, str] = {}
    folds, per_fold = [], []
    for fold in read_splits_dir(splits_dir):
        parts = {p: [s for s in fold.part(p) if s in keep] for p in PARTS}
        per_fold.append({p: len(fold.part(p)) - len(parts[p]) for p in PARTS})
        for slide in set(fold.all_slides()) - keep:
            reasons[slide] = _drop_reason(slide, all_labels, classes, label_col)
        folds.append(make_fold(fold.index, parts["train"], parts["val"], parts["test"], str(splits_dir)))
    named = {s for f in folds for s in f.all_slides()}
    return HiptImport(tuple(folds), kept, dict(Counter(reasons.values())), tuple(per_fold),
                      dict(table.attrs.get("dropped", {})), len(keep - named))


def write_hipt(result: HiptImport, out: str | Path, *, source: str, command: str | None = None) -> Path:
    """Write the normalised folds (``splits_k.csv``, ``splits.json``) and ``labels.csv`` into ``out``."""
    out = Path(out)
    extra = {"dropped_slides": result.dropped_slides, "labels": "labels.csv",
             "dropped_per_fold": {str(f.index): d for f, d in zip(result.folds, result.dropped_per_fold)}}
    write_splits_dir(result.folds, out, source=source, seed=None, command=command, extra=extra)
    write_labels(result.labels, out / "labels.csv")
    return out
