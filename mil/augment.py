"""Synthetic augmentation of a fold's training set and label-efficiency subsets (Graikos et al. 2024, §5).

Two pure functions decide which bags a fold trains on; :mod:`mil.cv` applies them per fold and records the
outcome in the run record:

* :func:`training_fraction` subsamples a fold's training slides **by patient**, stratified by class, seeded,
  and **nested**: one seeded permutation of each class's patients per fold, of which a fraction takes a prefix,
  so the 10% set contains the 1% set and curves over fractions are paired. Validation and test are untouched.
* :func:`synthetic_for_fold` picks the synthetic copies (``<slide_id>~syn<k>``, written by
  ``zoomfeat feature-copies``) of the fold's training slides, and only those: never a copy of a validation or test
  slide, never a copy of any slide of a patient who has a slide held out in that fold.

The copies (either unit, ``--unit patch`` or ``--unit slide``) must have been made from the feature set the run
trains on (:func:`usable_copies`, through :func:`check_made_from`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoomfeat.errors import ConfigError, DataError
from zoomfeat.features import source_of
from zoomfeat.resolve import file_sha256
from zoomfeat.store import FeatureFile, h5_path


@dataclass(frozen=True)
class FoldAugmentation:
    """What one fold trains on beyond its (possibly subsampled) real training slides."""

    train_real: tuple[str, ...]
    synthetic: tuple[str, ...]
    fraction: float
    dropped_patients: int

    def record(self) -> dict:
        return {"train_real": len(self.train_real), "synthetic_added": len(self.synthetic),
                "fraction": self.fraction, "patients_dropped_by_fraction": self.dropped_patients}


def _patient_label(slides: Sequence[str], label_of: Mapping[str, object]) -> object:
    labels = sorted({str(label_of[s]) for s in slides})
    return labels[0] if len(labels) == 1 else "|".join(labels)  # mixed-label patients form their own stratum


def training_fraction(train: Sequence[str], case_of: Mapping[str, str], label_of: Mapping[str, object],
                      fraction: float, seed: int, fold: int) -> tuple[list[str], int]:
    """(slides kept, patients dropped): a stratified, seeded, nested patient subset of ``train``.

    Each class keeps ``max(1, round(fraction * n_patients))`` of its patients, taken as a prefix of one
    permutation drawn from ``(seed, fold)`` alone, so for the same fold a smaller fraction's set is contained in
    a larger one's. ``fraction`` must be in (0, 1].
    """
    if not (isinstance(fraction, (int, float)) and 0.0 < float(fraction) <= 1.0 and math.isfinite(fraction)):
        raise ConfigError(f"--train-fraction {fraction!r}: use a fraction in (0, 1], e.g. 0.1")
    if float(fraction) == 1.0:
        return list(train), 0
    patients: dict[str, list[str]] = {}
    for slide in train:
        patients.setdefault(str(case_of[slide]), []).append(slide)
    strata: dict[str, list[str]] = {}
    for patient in sorted(patients):
        strata.setdefault(str(_patient_label(patients[patient], label_of)), []).append(patient)
    rng = np.random.default_rng([int(seed), int(fold), 20240101])
    keep: set[str] = set()
    for label in sorted(strata):
        members = strata[label]
        order = rng.permutation(len(members))  # drawn for every stratum, whatever the fraction: nested prefixes
        count = max(1, int(round(float(fraction) * len(members))))
        keep.update(members[i] for i in order[:count])
    kept = [s for s in train if str(case_of[s]) in keep]
    return kept, len(patients) - len(keep)


def synthetic_for_fold(train: Iterable[str], held_out: Iterable[str], case_of: Mapping[str, str],
                       available: Iterable[str]) -> list[str]:
    """The synthetic ids among ``available`` whose source is a training slide of this fold and whose patient has
    no slide in ``held_out`` (validation + test); sorted."""
    train_set = set(train)
    held_patients = {str(case_of[s]) for s in held_out if s in case_of}
    chosen = []
    for syn in available:
        source = source_of(syn)
        if source is None or source not in train_set:
            continue
        if str(case_of[source]) in held_patients:
            continue
        chosen.append(syn)
    return sorted(chosen)


def plan_fold(train: Sequence[str], held_out: Sequence[str], case_of: Mapping[str, str],
              label_of: Mapping[str, object], *, fraction: float = 1.0, seed: int = 0, fold: int = 0,
              available: Iterable[str] = ()) -> FoldAugmentation:
    """Fraction first (on real slides), then the synthetic copies of the slides that remain."""
    kept, dropped = training_fraction(train, case_of, label_of, fraction, seed, fold)
    synthetic = synthetic_for_fold(kept, held_out, case_of, available)
    return FoldAugmentation(tuple(kept), tuple(synthetic), float(fraction), dropped)


# ----------------------------------------------------------------------------------------------------------
# a run's augmentation: every fold of the split folder planned once, applied by mil.cv


@dataclass(frozen=True)
class CohortAugmentation:
    """The plans of every fold of a split folder (``plans[k]``), the synthetic bags' spec and their sources."""

    plans: dict[int, FoldAugmentation]
    spec: object | None  # FeatureSpec of the synthetic folder (the run's magnifications), None without --augment
    available: tuple[str, ...]

    def fold_data(self, k: int, data):
        """``data`` (a mil.train.FoldData) with the fold's training part replaced by the plan's slides."""
        plan = self.plans[k]
        target, case = dict(data.target), dict(data.case)
        for syn in plan.synthetic:
            source = source_of(syn)
            target[syn], case[syn] = data.target[source], data.case[source]
        parts = {**data.parts, "train": [*plan.train_real, *plan.synthetic]}
        return type(data)(parts, target, case)

    def train_parts(self) -> list[list[str]]:
        """Every fold's training slides (real and synthetic), for the run's epoch order."""
        return [[*p.train_real, *p.synthetic] for p in self.plans.values()]

    def targets(self, targets: Mapping[str, int]) -> dict[str, int]:
        return {**targets, **{s: targets[source_of(s)] for s in self.available if source_of(s) in targets}}

    def record(self) -> dict[str, dict]:
        return {str(k): plan.record() for k, plan in sorted(self.plans.items())}


class AugmentedStore:
    """A bag store that serves synthetic ids (``<id>~syn<k>``) from the synthetic folder, the rest from ``real``."""

    def __init__(self, real, synthetic):
        self.real, self.synthetic = real, synthetic

    def get(self, slide_id: str):
        return (self.synthetic if source_of(slide_id) is not None else self.real).get(slide_id)


def synthetic_ids(folder: str | Path) -> list[str]:
    """The synthetic copies in a ``zoomfeat feature-copies`` folder (file stems ``<id>~syn<k>``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--augment {folder} is not a folder: give the --out of `zoomfeat feature-copies`")
    ids = sorted(p.stem for p in folder.glob("*.h5") if not p.name.startswith(".") and source_of(p.stem))
    if not ids:
        raise ConfigError(f"--augment {folder} holds no synthetic copies (<slide_id>~syn<k>.h5): run "
                          "`zoomfeat feature-copies` first")
    return ids


def plan_cohort(folds_data: Mapping[int, object], case_of: Mapping[str, str], label_of: Mapping[str, object], *,
                fraction: float, seed: int, augment_spec=None, available: Sequence[str] = ()) -> CohortAugmentation:
    """Plans for every fold (``folds_data[k]`` a FoldData with parts train/val/test of usable slides)."""
    plans = {}
    for k, data in folds_data.items():
        held = [*data.parts.get("val", []), *data.parts.get("test", [])]
        plans[k] = plan_fold(data.parts["train"], held, case_of, label_of, fraction=fraction, seed=seed, fold=k,
                             available=available)
    return CohortAugmentation(plans, augment_spec, tuple(available))


def usable_copies(folder: str | Path, spec, usable: Iterable[str]) -> list[str]:
    """The copies in ``folder`` of the slides in ``usable``, after checking that they were made from the feature
    set ``spec`` the run trains on (DataError naming both otherwise, or when there is none)."""
    usable = set(usable)
    candidates = [s for s in synthetic_ids(folder) if source_of(s) in usable]
    if not candidates:
        raise DataError(f"--augment {folder}: no synthetic copy of a slide of this run")
    check_made_from(Path(folder), spec, candidates)
    return candidates


_SHA256: dict[tuple[str, int, int], str] = {}


def _sha256_cached(path: Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in a process (train-mil checks each seed)."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = file_sha256(path)
    return _SHA256[key]


def check_made_from(folder: Path, spec, ids) -> None:
    """DataError (one line naming both) unless every copy in ``ids`` (of ``folder``) was made from the real
    feature file its source slide has in ``spec`` (a :class:`zoomfeat.features.FeatureSpec`): the sha256 the copy
    records against that file's."""
    for syn in ids:
        source = source_of(syn)
        with FeatureFile(h5_path(folder, syn)) as f:
            made = ((f.extractor_config or {}).get("synthetic") or {}).get("made_from") or {}
        if not made.get("features_sha256"):
            raise DataError(f"--augment {folder}: {syn} records no feature file it was made from (copies of an "
                            "older zoomfeat): delete the folder and run `zoomfeat feature-copies` again")
        files = [p for p in spec.files(source) if p.is_file()]
        hashes = {_sha256_cached(p): p for p in files}
        if made["features_sha256"] not in hashes:
            real = files[0] if files else spec.path(source)
            ours = next(iter(hashes), "missing")
            raise DataError(f"--augment {folder}: {syn} was made from {made.get('features_file')} (sha256 "
                            f"{made['features_sha256'][:12]}), not from {real} (sha256 {ours[:12]}) of the feature "
                            f"set {spec} this run trains on: make the copies from {spec} with "
                            "`zoomfeat feature-copies`")
