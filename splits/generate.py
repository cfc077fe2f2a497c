"""Patient-grouped, label-stratified split generation (``zoomfeat splits make`` and ``simil``).

The unit of assignment is a patient (``group`` column, ``case_id`` by default): all slides of a patient land
in the same part, so generated splits never leak across patients. A patient whose slides carry different
labels is stratified by its majority label (ties: the label that sorts first); the number of such patients
is reported in ``SplitPlan.mixed_patients``.

Assignment (:func:`assign_parts`): patients are shuffled with the seed, ordered largest first, and each goes to
the part whose deficit ``target - count`` for the patient's class is largest (ties: the part with the largest
deficit in slides overall, then a seeded random order). Targets are ``n_class_slides * fraction``. With one
slide per patient every part ends within one slide of its target for every class (a part can only overshoot
when every deficit is already spent, which cannot happen before the last slide); in general, within the
largest patient's slide count. The same seed and labels (in any row order) give the same splits.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from splits.io import SplitFold, make_fold
from zoomfeat.errors import ConfigError, DataError

MODES: tuple[str, ...] = ("kfold", "repeated")


@dataclass(frozen=True)
class Patients:
    """The cohort as assignment units: one entry per patient, sorted by patient id."""

    ids: tuple[str, ...]                     # patient ids
    strat_label: tuple[str, ...]             # majority slide label per patient
    slides: tuple[tuple[str, ...], ...]      # slide ids per patient, sorted
    mixed: tuple[str, ...]                   # patients with slides of more than one label

    def size(self, i: int) -> int:
        return len(self.slides[i])


def patients_from_labels(labels: pd.DataFrame, group: str = "case_id") -> Patients:
    """Group a label table (``slide_id``, ``label``, ``group``) into patients with a majority label."""
    if group not in labels.columns:
        raise ConfigError(f"--group {group!r} is not a column of the label table (columns: "
                          f"{', '.join(labels.columns)}); pass case_id or slide_id")
    by_patient: dict[str, list[tuple[str, str]]] = {}
    for patient, slide, label in zip(labels[group], labels["slide_id"], labels["label"]):
        by_patient.setdefault(str(patient), []).append((str(slide), str(label)))
    ids, strat, slides, mixed = [], [], [], []
    for patient in sorted(by_patient):
        counts = Counter(label for _, label in by_patient[patient])
        top = max(sorted(counts), key=lambda c: counts[c])      # majority; ties: the label that sorts first
        ids.append(patient)
        strat.append(top)
        slides.append(tuple(sorted(slide for slide, _ in by_patient[patient])))
        if len(counts) > 1:
            mixed.append(patient)
    return Patients(tuple(ids), tuple(strat), tuple(slides), tuple(mixed))


def check_class_counts(patients: Patients, folds: int, what: str = "--folds") -> None:
    """DataError when a class has fewer patients than folds (some fold would have none of it)."""
    for cls, n in sorted(Counter(patients.strat_label).items()):
        if n < folds:
            raise DataError(f"class {cls!r} has {n} patient(s), fewer than {what} {folds}: some fold would have "
                            f"no {cls} patient; lower {what} or gather more {cls} cases")


def assign_parts(patients: Patients, members: Sequence[int], fractions: Sequence[float],
                 rng: np.random.Generator) -> list[list[int]]:
    """Split the patients at positions ``members`` into ``len(fractions)`` parts (lists of positions).

    Targets per part and class are ``slides of that class among members * fraction`` (fractions sum to 1).
    """
    members = list(members)
    n_parts = len(fractions)
    frac = np.asarray(fractions, dtype=float)
    classes = sorted({patients.strat_label[i] for i in members})
    cls_of = {c: j for j, c in enumerate(classes)}
    class_slides = np.zeros(len(classes))
    for i in members:
        class_slides[cls_of[patients.strat_label[i]]] += patients.size(i)
    deficit = class_slides[:, None] * frac[None, :]           # [classes, parts] slides still wanted
    total_deficit = deficit.sum(axis=0)                       # [parts]
    order = [members[j] for j in rng.permutation(len(members))]
    order.sort(key=patients.size, reverse=True)               # stable: shuffled within equal sizes
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for i in order:
        c, size = cls_of[patients.strat_label[i]], patients.size(i)
        tiebreak = rng.permutation(n_parts)
        best = max(range(n_parts), key=lambda p: (deficit[c, p], total_deficit[p], -tiebreak[p]))
        parts[best].append(i)
        deficit[c, best] -= size
        total_deficit[best] -= size
    return parts


def _slides(patients: Patients, positions: Sequence[int]) -> list[str]:
    return [s for i in positions for s in patients.slides[i]]


def _fold(index: int, patients: Patients, train, val, test) -> SplitFold:
    return make_fold(index, _slides(patients, train), _slides(patients, val), _slides(patients, test),
                     where=f"generated fold {index}")


def _train_val(patients: Patients, rest: Sequence[int], val_share: float, rng) -> tuple[list[int], list[int]]:
    if val_share <= 0:
        return list(rest), []
    train, val = assign_parts(patients, rest, (1.0 - val_share, val_share), rng)
    return train, val


def kfold_splits(patients: Patients, folds: int, val_frac: float, seed: int) -> list[SplitFold]:
    """k folds whose test sets partition the patients; val (``val_frac`` of all slides) drawn from the rest."""
    check_class_counts(patients, folds)
    rng = np.random.default_rng([seed, 0])
    groups = assign_parts(patients, range(len(patients.ids)), [1.0 / folds] * folds, rng)
    out = []
    for k, test in enumerate(groups):
        rest = sorted(set(range(len(patients.ids))) - set(test))
        train, val = _train_val(patients, rest, val_frac / (1.0 - 1.0 / folds),
                                np.random.default_rng([seed, 1, k]))
        out.append(_fold(k, patients, train, val, test))
    return out


def repeated_splits(patients: Patients, folds: int, val_frac: float, test_frac: float,
                    seed: int) -> list[SplitFold]:
    """CLAM/HIPT style: each fold an independent stratified draw of test and val (test sets may overlap)."""
    check_class_counts(patients, folds)
    out = []
    everyone = range(len(patients.ids))
    for k in range(folds):
        rng = np.random.default_rng([seed, 2, k])
        train, val, test = assign_parts(patients, everyone, (1.0 - val_frac - test_frac, val_frac, test_frac), rng)
        out.append(_fold(k, patients, train, val, test))
    return out


def holdout_kfold_splits(patients: Patients, folds: int, test_frac: float, seed: int) -> list[SplitFold]:
    """SI-MIL style: one fixed test set (``test_frac``), then k folds of train/val over the rest."""
    check_class_counts(patients, folds)
    everyone = range(len(patients.ids))
    rest, test = assign_parts(patients, everyone, (1.0 - test_frac, test_frac), np.random.default_rng([seed, 3]))
    return cv_over(patients, rest, _slides(patients, test), folds, seed)


def cv_over(patients: Patients, rest: Sequence[int], test_slides: Sequence[str], folds: int,
            seed: int) -> list[SplitFold]:
    """k folds of train/val partitioning the patients at positions ``rest``; ``test_slides`` in every fold."""
    check_class_counts(_subset(patients, rest), folds)
    groups = assign_parts(patients, rest, [1.0 / folds] * folds, np.random.default_rng([seed, 4]))
    out = []
    for k, val in enumerate(groups):
        train = sorted(set(rest) - set(val))
        out.append(make_fold(k, _slides(patients, train), _slides(patients, val), test_slides,
                             where=f"generated fold {k}"))
    return out


def _subset(patients: Patients, positions: Sequence[int]) -> Patients:
    pos = list(positions)
    return Patients(tuple(patients.ids[i] for i in pos), tuple(patients.strat_label[i] for i in pos),
                    tuple(patients.slides[i] for i in pos), patients.mixed)


@dataclass(frozen=True)
class MakeConfig:
    """Settings of ``zoomfeat splits make`` (validated up front, saved in splits.json)."""

    folds: int = 10
    mode: str = "kfold"
    val_frac: float = 0.1
    test_frac: float | None = None           # repeated mode only (default 0.1); kfold tests are 1/folds
    group: str = "case_id"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.folds < 2:
            raise ConfigError(f"--folds {self.folds} must be at least 2")
        if not 0.0 <= self.val_frac < 1.0:
            raise ConfigError(f"--val-frac {self.val_frac} must be in [0, 1)")
        if self.mode == "kfold" and self.test_frac is not None:
            raise ConfigError("--test-frac is for --mode repeated; in kfold mode each test set is 1/--folds")
        test = 1.0 / self.folds if self.mode == "kfold" else self.effective_test_frac
        if not 0.0 < test < 1.0 or test + self.val_frac >= 1.0:
            raise ConfigError(f"--val-frac {self.val_frac} + test fraction {test:.3g} leave no training slides")

    @property
    def effective_test_frac(self) -> float:
        return 0.1 if self.test_frac is None else self.test_frac


def make_splits(labels: pd.DataFrame, config: MakeConfig) -> list[SplitFold]:
    """Generate folds for ``zoomfeat splits make`` from a label table."""
    patients = patients_from_labels(labels, config.group)
    if config.mode == "kfold":
        return kfold_splits(patients, config.folds, config.val_frac, config.seed)
    return repeated_splits(patients, config.folds, config.val_frac, config.effective_test_frac, config.seed)
