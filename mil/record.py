"""Typed MIL run records: ``RUN_DIR/config.json``, written by cross-validation, read by report, compare, heatmap.

The record says what a run was made from, so that its numbers can be traced and a resume never mixes inputs:

    format              "zoomfeat-mil-run";  schema_version  2 (1 = the untyped record of earlier versions)
    config              the validated MILConfig (JSON)
    task, label_map     the task and its class name -> index map (predictions use these indices)
    feature_spec        the feature set in canonical form (``DIR@20x+5x``); feature_dim: fused width
    split_source        the split folder; split_fingerprints: fold -> sha256 of its sorted train/val/test ids
    inputs              content fingerprints: labels_sha256 (the labels file's bytes) and feature_files
                        (slide id -> "size:mtime_ns" of its feature file, for every slide the run uses)
    extractor           root attributes ``extractor`` / ``extractor_config`` of the feature files
    left_out, labels_dropped   counts of slides left out, by reason
    zoomfeat_version    the package that wrote it

:func:`read_record` is the one reader (report, compare and heatmap use it, never the raw JSON);
:func:`resume_differences` says what differs between a run's record and the one a new invocation would write:
settings (not the paths: a moved project resumes), magnifications, classes, feature width, split contents, the
labels file's content and each feature file's stamp.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zoomfeat.errors import ConfigError, DataError
from zoomfeat.features import FeatureSpec

RECORD_NAME = "config.json"
RECORD_FORMAT = "zoomfeat-mil-run"
SCHEMA_VERSION = 2
# run settings that may change between invocations of one run: which folds to do now, where to run them, and
# where the inputs and the run folder lie (a moved project resumes: the inputs are compared by content)
RESUME_IGNORED: tuple[str, ...] = ("folds", "devices", "accelerator", "cache", "out", "labels", "splits",
                                   "features")


@dataclass(frozen=True)
class InputFingerprints:
    """Content fingerprints of a run's inputs: the labels file's sha256 and each feature file's size:mtime_ns."""

    labels_sha256: str
    feature_files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRecord:
    """What one ``train-mil`` run was made from (see the module docstring for each field)."""

    config: dict
    task: str
    label_map: dict[str, int]
    feature_spec: str
    feature_dim: int
    split_source: str
    split_fingerprints: dict[str, str]
    inputs: InputFingerprints | None
    extractor: str | None = None
    extractor_config: dict | None = None
    left_out: dict[str, int] = field(default_factory=dict)
    labels_dropped: dict[str, int] = field(default_factory=dict)
    zoomfeat_version: str = "unknown"
    schema_version: int = SCHEMA_VERSION

    @property
    def classes(self) -> list[str]:
        """Class names in index order."""
        return [name for name, _ in sorted(self.label_map.items(), key=lambda kv: kv[1])]

    @property
    def n_classes(self) -> int:
        return len(self.label_map)

    @property
    def model(self) -> str | None:
        return self.config.get("model")

    @property
    def model_kwargs(self) -> dict:
        return dict(self.config.get("model_kwargs") or {})

    @property
    def protocol(self) -> dict:
        """The training schedule (name, lr, weight_decay, epochs, selection, patience, min_epochs)."""
        return dict(self.config.get("protocol") or {})

    @property
    def labels(self) -> str | None:
        return self.config.get("labels")

    def to_json(self) -> dict:
        return {"format": RECORD_FORMAT, **asdict(self)}


# ---------------------------------------------------------------------------------------------- fingerprints
def split_fingerprint(parts: dict[str, Any]) -> str:
    """sha256 of a fold's sorted train/val/test slide ids (``parts``: part name -> ids)."""
    text = json.dumps({p: sorted(ids) for p, ids in parts.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def file_stamp(path: str | Path) -> str:
    """``"size:mtime_ns"`` of a file: a rewrite in place (re-extraction) changes it."""
    stat = Path(path).stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def input_fingerprints(labels_path: str | Path, feature_paths: dict[str, Path]) -> InputFingerprints:
    """Fingerprints of the labels file (content sha256) and of each used slide's feature file."""
    from zoomfeat.resolve import file_sha256

    return InputFingerprints(labels_sha256=file_sha256(labels_path),
                             feature_files={s: file_stamp(p) for s, p in sorted(feature_paths.items())})


# ---------------------------------------------------------------------------------------------- write / read
def write_record(run_dir: str | Path, record: RunRecord) -> Path:
    from zoomfeat.store import write_json_atomic

    return write_json_atomic(Path(run_dir) / RECORD_NAME, record.to_json())


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path.parent} is not a train-mil run folder: {path} is missing (run train-mil first)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not a readable JSON run record ({exc}); rerun train-mil into a new --out") \
            from exc
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a JSON object: it is not a train-mil run record")
    return data


def _upgrade_v1(data: dict) -> dict:
    """A record of schema 1 (config + provenance beside it, no format key) in schema-2 form (no inputs)."""
    config = data["config"]
    return {**{k: v for k, v in data.items() if k in _FIELDS}, "task": config.get("task"),
            "feature_spec": config.get("features"), "inputs": None, "schema_version": 1}


_FIELDS = {f for f in RunRecord.__dataclass_fields__}
_REQUIRED = ("config", "task", "label_map", "feature_spec", "feature_dim", "split_source", "split_fingerprints")


def record_from_json(data: dict, path: Path) -> RunRecord:
    """RunRecord of a parsed ``config.json``; DataError naming the file for anything it cannot be."""
    version = data.get("schema_version")
    if data.get("format") is None and isinstance(data.get("config"), dict) and "label_map" in data:
        data = _upgrade_v1(data)
    elif data.get("format") != RECORD_FORMAT:
        raise DataError(f"{path}: not a train-mil run record (format {data.get('format')!r})")
    elif not isinstance(version, int) or version > SCHEMA_VERSION:
        raise DataError(f"{path}: run record schema {version!r} is newer than this zoomfeat reads "
                        f"({SCHEMA_VERSION}): upgrade zoomfeat")
    missing = [k for k in _REQUIRED if data.get(k) is None]
    if missing:
        raise DataError(f"{path}: run record lacks {', '.join(missing)}; rerun train-mil into a new --out")
    inputs = data.get("inputs")
    values = {k: v for k, v in data.items() if k in _FIELDS}
    try:
        values["inputs"] = InputFingerprints(**inputs) if isinstance(inputs, dict) else None
        values["label_map"] = {str(k): int(v) for k, v in data["label_map"].items()}
        values["feature_dim"] = int(data["feature_dim"])
        return RunRecord(**values)
    except (TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: malformed run record ({exc}); rerun train-mil into a new --out") from exc


def read_record(run_dir: str | Path) -> RunRecord:
    """The typed record of a run folder (the one reader of ``config.json``)."""
    path = Path(run_dir) / RECORD_NAME
    return record_from_json(_load_json(path), path)


# ---------------------------------------------------------------------------------------------- resume
def _stamp_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    changed = sorted(s for s in set(old) & set(new) if old[s] != new[s])
    gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    out = []
    for what, ids in (("changed since the run began", changed), ("no longer usable", gone),
                      ("newly usable", added)):
        if ids:
            out.append(f"{len(ids)} feature file(s) {what} (e.g. {ids[0]})")
    return out


def resume_differences(old: RunRecord, new: RunRecord) -> list[str]:
    """What differs between a run's record and a new invocation's, in words (empty: the run may resume)."""
    from zoomfeat.store import describe_diff, settings_diff

    strip = lambda c: {k: v for k, v in c.items() if k not in RESUME_IGNORED}  # noqa: E731
    out = []
    diff = settings_diff(strip(old.config), strip(new.config))
    if diff:
        out.append(f"settings {describe_diff(diff)}")
    old_mags, new_mags = (FeatureSpec.parse(r.feature_spec).mags_text for r in (old, new))
    if old_mags != new_mags:
        out.append(f"feature magnifications {old_mags} -> {new_mags}")
    for name in ("label_map", "feature_dim"):
        if getattr(old, name) != getattr(new, name):
            out.append(f"{name} {getattr(old, name)} -> {getattr(new, name)}")
    folds = sorted({k for k in set(old.split_fingerprints) | set(new.split_fingerprints)
                    if old.split_fingerprints.get(k) != new.split_fingerprints.get(k)}, key=int)
    if folds:
        out.append(f"split files (folds {', '.join(folds)})")
    if old.inputs is None:
        out.append("the run's record has no input fingerprints (written by an older zoomfeat)")
    elif new.inputs is not None:
        if old.inputs.labels_sha256 != new.inputs.labels_sha256:
            out.append(f"labels file content ({new.config.get('labels')})")
        out += _stamp_changes(old.inputs.feature_files, new.inputs.feature_files)
    return out


def check_resume(run_dir: str | Path, new: RunRecord, done_folds: list[int]) -> None:
    """ConfigError naming the differences when ``run_dir`` has finished folds made from other inputs/settings."""
    if not done_folds:
        return  # nothing made yet binds the folder to the old record
    old = read_record(run_dir)
    differences = resume_differences(old, new)
    if differences:
        raise ConfigError(f"{run_dir} holds finished folds ({', '.join(map(str, done_folds))}) made from other "
                          f"inputs or settings: {'; '.join(differences)}. Use a new --out, or delete the folder "
                          "to start over")
