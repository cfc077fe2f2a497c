"""SI-MIL protocol (HRD): one fixed held-out test set, then k folds of train/val on the rest.

Two sources: a label table (the test set is drawn here, stratified and grouped by patient), or SI-MIL's own
JSON split file ``{"train_dict": {slide: label}, "test_dict": {slide: label}}`` (its test set is kept as is).
SI-MIL's JSON has no patient ids: they come from ``--labels`` when given, else from the TCGA barcode
(``TCGA-XX-XXXX``, the first 12 characters), else each slide is its own patient (and the result says so).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from splits.generate import Patients, cv_over, holdout_kfold_splits, patients_from_labels
from splits.io import SplitFold
from zoomfeat.labels import normalize_slide_id
from zoomfeat.errors import ConfigError, DataError

TCGA_PATIENT = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)


@dataclass(frozen=True)
class SimilConfig:
    """Settings of ``zoomfeat splits simil`` (validated up front, saved in splits.json)."""

    test_frac: float = 0.2
    folds: int = 5
    seed: int = 0
    group: str = "case_id"

    def __post_init__(self) -> None:
        if not 0.0 < self.test_frac < 1.0:
            raise ConfigError(f"--test-frac {self.test_frac} must be in (0, 1)")
        if self.folds < 2:
            raise ConfigError(f"--folds {self.folds} must be at least 2")


def tcga_patient(slide_id: str) -> str | None:
    """``TCGA-A1-A0SB-01Z-00-DX1.<uuid>`` -> ``TCGA-A1-A0SB``; None for ids that are not TCGA barcodes."""
    match = TCGA_PATIENT.match(slide_id)
    return match.group(1).upper() if match else None


def simil_splits(labels: pd.DataFrame, config: SimilConfig) -> list[SplitFold]:
    """Fixed stratified, patient-grouped test set, then ``config.folds`` train/val folds over the rest."""
    patients = patients_from_labels(labels, config.group)
    return holdout_kfold_splits(patients, config.folds, config.test_frac, config.seed)


def read_simil_json(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """SI-MIL's split JSON -> (train {slide_id: label}, test {slide_id: label}), ids normalised."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read SI-MIL split JSON ({exc})") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in ("train_dict", "test_dict")):
        raise DataError(f"{path}: expected {{\"train_dict\": {{slide: label}}, \"test_dict\": {{...}}}}")
    train = {normalize_slide_id(k): str(v) for k, v in data["train_dict"].items()}
    test = {normalize_slide_id(k): str(v) for k, v in data["test_dict"].items()}
    both = sorted(set(train) & set(test))
    if both:
        raise DataError(f"{path}: {len(both)} slide(s) in both train_dict and test_dict (e.g. {both[0]}); "
                        "keep each slide on one side")
    return train, test


def _case_ids(slides: list[str], labels: pd.DataFrame | None) -> tuple[list[str], str]:
    if labels is not None:
        cases = dict(zip(labels["slide_id"], labels["case_id"]))
        missing = [s for s in slides if s not in cases]
        if missing:
            raise DataError(f"{len(missing)} slide(s) of the SI-MIL JSON are not in --labels "
                            f"(e.g. {missing[0]}); fix the label table")
        return [cases[s] for s in slides], "label table"
    barcodes = [tcga_patient(s) for s in slides]
    if all(barcodes):
        return [str(b) for b in barcodes], "TCGA barcode"
    return list(slides), "none (each slide its own patient)"


def labels_from_simil_json(path: str | Path, labels: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[str], str]:
    """Label table (case_id, slide_id, label) of all slides in the JSON, the test slide ids, and the
    source of the patient ids. With ``labels``, JSON labels must agree with the table's."""
    train, test = read_simil_json(path)
    merged = {**train, **test}
    slides = sorted(merged)
    cases, source = _case_ids(slides, labels)
    table = pd.DataFrame({"case_id": cases, "slide_id": slides, "label": [merged[s] for s in slides]})
    if labels is not None:
        known = dict(zip(labels["slide_id"], labels["label"]))
        bad = [s for s in slides if known[s] != merged[s]]
        if bad:
            raise DataError(f"{path}: slide {bad[0]} has label {merged[bad[0]]!r} there but "
                            f"{known[bad[0]]!r} in --labels ({len(bad)} such slide(s)); make them agree")
    return table, sorted(test), source


def simil_from_json(path: str | Path, labels: pd.DataFrame | None, config: SimilConfig
                    ) -> tuple[pd.DataFrame, list[SplitFold], str]:
    """Keep SI-MIL's test set, draw ``config.folds`` patient-grouped train/val folds over its train set."""
    table, test, source = labels_from_simil_json(path, labels)
    train_table = table[~table["slide_id"].isin(set(test))]
    patients: Patients = patients_from_labels(train_table, config.group)
    folds = cv_over(patients, range(len(patients.ids)), test, config.folds, config.seed)
    return table, folds, source
