"""Typed MIL run records: ``RUN_DIR/config.json``, written by cross-validation, read by report, compare, heatmap.

The record (:class:`RunRecord`, a comment per field) says what a run was made from, so that its numbers can be
traced and a resume never mixes inputs. :func:`read_record` is the one reader (report, compare and heatmap use
it, never the raw JSON); records of schema 1 (untyped) and 2 (one seed) are read as one-seed runs.
:func:`resume_differences` says what differs between a run's record and the one a new invocation would write:
settings (not the paths: a moved project resumes), magnifications, classes, feature width, split contents, the
labels file's content and each feature file's stamp.

The record owns the run's layout and completeness: :func:`fold_dir` is where a (seed, fold) lives (``fold_<k>/``
for a one-seed run, ``seed_<s>/fold_<k>/`` for several seeds), :func:`finished_pairs` what is done (its
``metrics.json``, written last), and :func:`check_complete` refuses a run with planned (seed, fold) pairs missing,
in one line naming the run, the missing folds and the fix, unless the reader allows a partial run.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from zoomfeat.errors import ConfigError, DataError
from zoomfeat.features import FeatureSpec
from zoomfeat.resolve import file_sha256
from zoomfeat.store import describe_diff, settings_diff, write_json_atomic

RECORD_NAME = "config.json"
RECORD_FORMAT = "zoomfeat-mil-run"
SCHEMA_VERSION = 3
# run settings that may change between invocations of one run: which folds to do now, where to run them, and
# where the inputs and the run folder lie (a moved project resumes: the inputs are compared by content)
RESUME_IGNORED: tuple[str, ...] = ("folds", "devices", "accelerator", "cache", "out", "labels", "splits",
                                   "features", "seed")  # ``seed`` is the first of ``seeds`` (compared)


@dataclass(frozen=True)
class InputFingerprints:
    """Content fingerprints of a run's inputs: the labels file's sha256 and each feature file's size:mtime_ns."""

    labels_sha256: str
    feature_files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRecord:
    """What one ``train-mil`` run was made from; saved with ``format`` "zoomfeat-mil-run"."""

    config: dict  # the validated MILConfig (JSON; ``features`` in its text form)
    task: str
    label_map: dict[str, int]  # class name -> index (predictions use these indices)
    feature_spec: FeatureSpec  # saved in its canonical text form ``DIR@20x+5x``
    feature_dim: int  # the fused width
    split_source: str  # the split folder
    split_fingerprints: dict[str, str]  # fold -> sha256 of its sorted train/val/test ids
    inputs: InputFingerprints | None  # None in records of schema 1
    seeds: tuple[int, ...] = (0,)  # the init seeds; the cross-validation runs once per seed (``--seeds``)
    folds: tuple[int, ...] = ()  # the planned folds (``--folds`` of any invocation); () = every fold of the splits
    plan: list = field(default_factory=list)  # [{setting, value, source}] (mil.config.plan_rows)
    extractor: str | None = None  # root attributes ``extractor`` / ``extractor_config`` of the feature files
    extractor_config: dict | None = None
    left_out: dict[str, int] = field(default_factory=dict)  # slides left out, by reason
    labels_dropped: dict[str, int] = field(default_factory=dict)
    zoomfeat_version: str = "unknown"  # the package that wrote it
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

    @property
    def planned_folds(self) -> list[int]:
        """The folds the run trains per seed (``--folds``, else every fold of its split folder)."""
        return sorted(self.folds) if self.folds else sorted(int(k) for k in self.split_fingerprints)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Every planned (seed, fold), seeds in their given order."""
        return [(s, k) for s in self.seeds for k in self.planned_folds]

    def to_json(self) -> dict:
        data = asdict(self)
        data["feature_spec"] = str(self.feature_spec)
        if isinstance(data["config"].get("features"), dict):
            data["config"]["features"] = str(self.feature_spec)
        return {"format": RECORD_FORMAT, **data}


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
    return InputFingerprints(labels_sha256=file_sha256(labels_path),
                             feature_files={s: file_stamp(p) for s, p in sorted(feature_paths.items())})


# ---------------------------------------------------------------------------------------------- write / read
def write_record(run_dir: str | Path, record: RunRecord) -> Path:
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


def _seeds_and_folds(data: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(seeds, planned folds) of a record; schema 1-2 records ran one seed, ``config.seed``."""
    config = data["config"]
    seeds = data.get("seeds") or config.get("seeds") or [config.get("seed", 0)]
    folds = data.get("folds") if data.get("folds") is not None else (config.get("folds") or ())
    return tuple(int(v) for v in seeds), tuple(int(v) for v in folds)


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
        values["feature_spec"] = FeatureSpec.parse(data["feature_spec"])
        values["seeds"], values["folds"] = _seeds_and_folds(data)
        return RunRecord(**values)
    except (TypeError, ValueError, AttributeError, ConfigError) as exc:
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
    strip = lambda r: {**{k: v for k, v in r.config.items() if k not in RESUME_IGNORED},  # noqa: E731
                       "seeds": ",".join(map(str, r.seeds))}
    out = []
    diff = settings_diff(strip(old), strip(new))
    if diff:
        out.append(f"settings {describe_diff(diff)}")
    old_mags, new_mags = (r.feature_spec.mags_text for r in (old, new))
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


def check_resume(run_dir: str | Path, new: RunRecord, done: list[tuple[int, int]]) -> RunRecord:
    """The record to write for resuming ``run_dir`` with ``new``: ConfigError naming the differences when the
    folder has finished (seed, fold) pairs made from other inputs/settings, or pairs the record does not plan
    (another layout, a seed or fold outside the run); the planned folds are those of every invocation."""
    stray = stray_pairs(run_dir, new)
    if stray:
        raise ConfigError(f"{run_dir} holds fold folders this run does not plan ({', '.join(stray)}): it was made "
                          f"with other --seeds or splits; use a new --out, or delete the folder to start over")
    if not done:
        return new  # nothing made yet binds the folder to the old record
    old = read_record(run_dir)
    differences = resume_differences(old, new)
    if differences:
        raise ConfigError(f"{run_dir} holds finished folds ({describe_pairs(done, new.seeds)}) made from other "
                          f"inputs or settings: {'; '.join(differences)}. Use a new --out, or delete the folder "
                          "to start over")
    if not new.folds:
        return new
    planned = set(new.folds) | set(old.planned_folds) | {k for _, k in done}
    return replace(new, folds=tuple(sorted(planned)))


# ---------------------------------------------------------------------------------------------- layout
_FOLD_RE = re.compile(r"^fold_(\d+)$")
_SEED_RE = re.compile(r"^seed_(\d+)$")


def fold_dir(run_dir: str | Path, seeds: tuple[int, ...] | list[int], seed: int, fold: int) -> Path:
    """Where (``seed``, ``fold``) of a run with ``seeds`` lives: ``fold_<k>`` for one seed, else
    ``seed_<s>/fold_<k>``."""
    run = Path(run_dir)
    return run / f"fold_{fold}" if len(seeds) == 1 else run / f"seed_{seed}" / f"fold_{fold}"


def _finished_dirs(run: Path) -> tuple[list[int], list[tuple[int, int]]]:
    """(k of every ``fold_<k>/metrics.json``, (s, k) of every ``seed_<s>/fold_<k>/metrics.json``) in ``run``."""
    flat, nested = [], []
    if not run.is_dir():
        return flat, nested
    for sub in run.iterdir():
        if _FOLD_RE.match(sub.name) and (sub / "metrics.json").is_file():
            flat.append(int(sub.name[5:]))
        elif _SEED_RE.match(sub.name) and sub.is_dir():
            nested += [(int(sub.name[5:]), int(f.name[5:])) for f in sub.iterdir()
                       if _FOLD_RE.match(f.name) and (f / "metrics.json").is_file()]
    return sorted(flat), sorted(nested)


def finished_pairs(run_dir: str | Path, record: RunRecord) -> list[tuple[int, int]]:
    """The (seed, fold) pairs of ``record``'s seeds and split folds whose ``metrics.json`` exists (seeds in the
    record's order, then folds); planned or not (``--folds`` of an earlier invocation)."""
    flat, nested = _finished_dirs(Path(run_dir))
    found = {(record.seeds[0], k) for k in flat} if len(record.seeds) == 1 else set(nested)
    folds = {int(k) for k in record.split_fingerprints}  # none recorded (an old record): every fold found
    rank = {s: i for i, s in enumerate(record.seeds)}
    return sorted((p for p in found if p[0] in rank and (not folds or p[1] in folds)),
                  key=lambda p: (rank[p[0]], p[1]))


def stray_pairs(run_dir: str | Path, record: RunRecord) -> list[str]:
    """Finished fold folders of ``run_dir`` that ``record`` cannot own (other layout, seed or fold): their paths."""
    flat, nested = _finished_dirs(Path(run_dir))
    folds = {int(k) for k in record.split_fingerprints}
    if len(record.seeds) == 1:
        bad = [f"fold_{k}" for k in flat if k not in folds] + [f"seed_{s}/fold_{k}" for s, k in nested]
    else:
        bad = [f"fold_{k}" for k in flat] + [f"seed_{s}/fold_{k}" for s, k in nested
                                             if s not in record.seeds or k not in folds]
    return bad


def describe_pairs(pairs: list[tuple[int, int]], seeds: tuple[int, ...] | list[int]) -> str:
    """``fold 3`` / ``folds 1, 3`` (one seed), ``seed 1: folds 2, 3; seed 2: fold 0`` (several)."""
    def folds_text(ks: list[int]) -> str:
        return f"fold{'s' if len(ks) > 1 else ''} {', '.join(map(str, ks))}"

    if len(seeds) == 1:
        return folds_text([k for _, k in pairs])
    by_seed: dict[int, list[int]] = {}
    for s, k in pairs:
        by_seed.setdefault(s, []).append(k)
    return "; ".join(f"seed {s}: {folds_text(ks)}" for s, ks in by_seed.items())


@dataclass(frozen=True)
class Completeness:
    """The planned (seed, fold) pairs of a run and those missing (not finished)."""

    record: RunRecord
    missing: tuple[tuple[int, int], ...]

    def note(self) -> str | None:
        """The sentence every table and page of a partial run carries (None for a complete run)."""
        if not self.missing:
            return None
        return (f"Partial run: {describe_pairs(list(self.missing), self.record.seeds)} of the "
                f"{len(self.record.pairs)} recorded (seed, fold) pairs missing; numbers are over the "
                f"{len(self.record.pairs) - len(self.missing)} present.")


def check_complete(run_dir: str | Path, record: RunRecord | None = None, allow_partial: bool = False) -> Completeness:
    """The run's completeness; DataError (one line: the run, the missing folds, the fix) for a partial run
    unless ``allow_partial``."""
    run = Path(run_dir)
    record = record if record is not None else read_record(run)
    done = set(finished_pairs(run, record))
    missing = tuple(p for p in record.pairs if p not in done)
    if missing and not allow_partial:
        raise DataError(f"{run} is a partial run: {describe_pairs(list(missing), record.seeds)} of its "
                        f"{len(record.pairs)} recorded (seed, fold) pairs missing; finish it by rerunning "
                        f"`zoomfeat train-mil --out {run}` with its arguments, or pass --allow-partial")
    return Completeness(record, missing)
