"""Auditing split folders against a label table (and optionally a feature folder): ``zoomfeat splits audit``.

Per fold: part sizes, class counts, patients with slides on two sides (train/val, train/test, val/test),
slides without a label, slides without ``<slide_id>.h5`` features. Across folds: whether the test sets
partition the slides or overlap (independent draws, as in CLAM/HIPT). Folds that cannot be trained (an empty
training or test part, a single-class training part) are listed first. Problems are warnings; the caller
decides whether they are fatal (``--strict``).
Patient of a slide: its ``case_id`` in the label table, else its TCGA barcode, else the slide id itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Collection, Mapping, Sequence

import pandas as pd

from splits.io import PARTS, SplitFold
from zoomfeat.labels import normalize_slide_id
from splits.simil import tcga_patient

PAIRS: tuple[tuple[str, str], ...] = (("train", "val"), ("train", "test"), ("val", "test"))


@dataclass(frozen=True)
class FoldAudit:
    """Findings for one fold."""

    index: int
    sizes: dict[str, int]                          # part -> slides
    class_counts: dict[str, dict[str, int]]        # part -> label -> slides
    shared_patients: dict[str, tuple[str, ...]]    # "train/test" -> patients with slides on both sides
    unlabelled: tuple[str, ...]                    # slides without a label
    missing_features: tuple[str, ...]              # slides without <features>/<slide_id>.h5


@dataclass(frozen=True)
class SplitAudit:
    """Findings for a split folder."""

    folds: tuple[FoldAudit, ...]
    total_test_slides: int
    distinct_test_slides: int
    test_overlaps: dict[str, int]                  # "i/j" -> test slides shared by folds i and j (non-zero)
    warnings: tuple[str, ...]

    @property
    def test_sets_partition(self) -> bool:
        return not self.test_overlaps


def _patient_map(labels: pd.DataFrame) -> dict[str, str]:
    return dict(zip(labels["slide_id"], labels["case_id"]))


def patient_of(slide: str, cases: dict[str, str]) -> str:
    return cases.get(slide) or tcga_patient(slide) or slide


def _shared(fold: SplitFold, cases: dict[str, str]) -> dict[str, tuple[str, ...]]:
    patients = {p: {patient_of(s, cases) for s in fold.part(p)} for p in PARTS}
    return {f"{a}/{b}": tuple(sorted(patients[a] & patients[b])) for a, b in PAIRS}


def _feature_ids(features_dir: Path | None) -> set[str] | None:
    if features_dir is None:
        return None
    return {normalize_slide_id(p.name) for p in Path(features_dir).glob("*.h5")}


def audit_fold(fold: SplitFold, labels: pd.DataFrame, features: set[str] | None) -> FoldAudit:
    label_of = dict(zip(labels["slide_id"], labels["label"]))
    counts = {p: dict(sorted(Counter(label_of[s] for s in fold.part(p) if s in label_of).items())) for p in PARTS}
    slides = fold.all_slides()
    missing = tuple(sorted(s for s in slides if s not in features)) if features is not None else ()
    return FoldAudit(fold.index, dict(zip(PARTS, fold.sizes())), counts, _shared(fold, _patient_map(labels)),
                     tuple(sorted(s for s in slides if s not in label_of)), missing)


def trainability_problems(index: int, sizes: Mapping[str, int], train_classes: Collection) -> list[str]:
    """Why a fold cannot be trained and evaluated: an empty training or test part, or a training part whose
    slides all have one class (a head learns nothing; its test AUC would be noise). ``train-mil`` refuses
    such folds before training; ``splits audit`` lists them (``--strict`` fails on them)."""
    out = [f"fold {index}: the {part} part has no (labelled) slide" for part in ("train", "test") if not sizes[part]]
    if sizes["train"] and len(set(train_classes)) < 2:
        only = ", ".join(map(str, sorted(set(train_classes)))) or "none"
        out.append(f"fold {index}: every training slide has the same class ({only}); a head cannot learn from one "
                   "class: fix the split")
    return out


def _fold_warnings(fa: FoldAudit, classes: Sequence[str]) -> list[str]:
    labelled = {p: sum(fa.class_counts[p].values()) for p in PARTS}
    out = trainability_problems(fa.index, labelled, fa.class_counts["train"])
    for pair, patients in fa.shared_patients.items():
        if patients:
            out.append(f"fold {fa.index}: {len(patients)} patient(s) have slides in both {pair.replace('/', ' and ')} "
                       f"(e.g. {patients[0]})")
    if fa.unlabelled:
        out.append(f"fold {fa.index}: {len(fa.unlabelled)} slide(s) without a label (e.g. {fa.unlabelled[0]})")
    if fa.missing_features:
        out.append(f"fold {fa.index}: {len(fa.missing_features)} slide(s) without features "
                   f"(e.g. {fa.missing_features[0]}.h5)")
    for part in ("val", "test"):
        absent = [c for c in classes if fa.sizes[part] and not fa.class_counts[part].get(c)]
        if absent:
            out.append(f"fold {fa.index}: no {', '.join(absent)} slide in {part}")
    return out


def audit_splits(folds: Sequence[SplitFold], labels: pd.DataFrame,
                 features_dir: str | Path | None = None) -> SplitAudit:
    """Audit ``folds`` against a label table (``read_labels`` output) and an optional feature folder."""
    features = _feature_ids(Path(features_dir) if features_dir is not None else None)
    audits = tuple(audit_fold(f, labels, features) for f in folds)
    classes = sorted(set(labels["label"]))
    warnings = [w for fa in audits for w in _fold_warnings(fa, classes)]
    tests = [set(f.test) for f in folds]
    overlaps = {f"{folds[i].index}/{folds[j].index}": len(tests[i] & tests[j])
                for i, j in combinations(range(len(folds)), 2) if tests[i] & tests[j]}
    return SplitAudit(audits, sum(len(t) for t in tests), len(set().union(*tests)) if tests else 0,
                      overlaps, tuple(warnings))


def format_audit(audit: SplitAudit) -> str:
    """A plain-text report: one line per fold, then the cross-fold summary and the warnings."""
    lines = []
    for fa in audit.folds:
        sizes = "/".join(str(fa.sizes[p]) for p in PARTS)
        classes = "; ".join(f"{p} " + ",".join(f"{c}={n}" for c, n in fa.class_counts[p].items()) for p in PARTS)
        shared = ", ".join(f"{pair} {len(v)}" for pair, v in fa.shared_patients.items())
        lines.append(f"fold {fa.index}: train/val/test {sizes} | {classes} | shared patients: {shared}")
    leaky = [fa for fa in audit.folds if fa.shared_patients["train/test"]]
    counts = [len(fa.shared_patients["train/test"]) for fa in audit.folds]
    if leaky:
        lines.append(f"patients shared between train and test: {len(leaky)} of {len(audit.folds)} folds, "
                     f"{min(counts)}-{max(counts)} per fold, {sum(counts)} in all")
    else:
        lines.append("no patient has slides in both train and test in any fold")
    kind = "partition the slides" if audit.test_sets_partition else (
        f"overlap: {audit.distinct_test_slides} distinct of {audit.total_test_slides} test slides, "
        f"{len(audit.test_overlaps)} fold pairs share test slides")
    lines.append(f"test sets {kind}")
    lines += [f"warning: {w}" for w in audit.warnings]
    lines.append(f"{len(audit.warnings)} warning(s)")
    return "\n".join(lines)
