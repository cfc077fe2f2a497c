"""Split files: reading CLAM/HIPT ``splits_k.csv`` / ``splits_k_bool.csv`` and writing normalised ones.

A fold is a :class:`SplitFold`: sorted, normalised slide ids for train, val and test. The normalised layout
that :func:`write_splits_dir` writes (and every reader here accepts):

    <dir>/splits_<k>.csv    columns train,val,test; one slide id per cell, shorter columns blank at the end
    <dir>/splits.json       provenance: format, source, seed, command, number of folds, per-fold sizes
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from zoomfeat.labels import normalize_slide_id
from zoomfeat.errors import DataError
from zoomfeat.store import write_json_atomic

PARTS: tuple[str, str, str] = ("train", "val", "test")
SPLITS_FORMAT = "zoomfeat-splits"
SPLITS_FORMAT_VERSION = 1
_SPLIT_NAME = re.compile(r"^splits_(\d+)(_bool)?\.csv$")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no", ""}


@dataclass(frozen=True)
class SplitFold:
    """One fold: ``index`` k and the slide ids (normalised, sorted) of each part."""

    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def part(self, name: str) -> tuple[str, ...]:
        return getattr(self, name)

    def all_slides(self) -> tuple[str, ...]:
        return self.train + self.val + self.test

    def sizes(self) -> tuple[int, int, int]:
        return len(self.train), len(self.val), len(self.test)


def make_fold(index: int, train: Iterable[str], val: Iterable[str], test: Iterable[str],
              where: str = "split") -> SplitFold:
    """Build a fold from raw ids: normalise, sort, reject duplicates and slides in two parts."""
    parts = {name: [normalize_slide_id(s) for s in ids] for name, ids in zip(PARTS, (train, val, test))}
    seen: dict[str, str] = {}
    for name, ids in parts.items():
        for slide in ids:
            if slide in seen:
                where_first = seen[slide]
                fix = "remove the repeat" if where_first == name else "keep it in one part"
                raise DataError(f"{where}: slide {slide} is listed in {where_first} and in {name}; {fix}")
            seen[slide] = name
    return SplitFold(index, *(tuple(sorted(parts[name])) for name in PARTS))


def fold_index(path: str | Path) -> int:
    """k of ``splits_k.csv`` / ``splits_k_bool.csv`` (the last number in the name; 0 when there is none)."""
    numbers = re.findall(r"\d+", Path(path).stem)
    return int(numbers[-1]) if numbers else 0


def _read_split_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot parse split file as CSV ({exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [p for p in PARTS if p not in df.columns]
    if missing:
        raise DataError(f"{path}: split file lacks column(s) {', '.join(missing)} (columns present: "
                        f"{', '.join(df.columns)}); expected train,val,test")
    return df


def _is_bool_table(df: pd.DataFrame) -> bool:
    values = {v.strip().lower() for p in PARTS for v in df[p]}
    return bool(values) and values <= (_TRUE | _FALSE) and df.columns[0] not in PARTS


def _bool_fold(df: pd.DataFrame, path: Path) -> SplitFold:
    ids = df[df.columns[0]]
    parts = {}
    for p in PARTS:
        flags = df[p].str.strip().str.lower()
        parts[p] = list(ids[flags.isin(_TRUE)])
    return make_fold(fold_index(path), parts["train"], parts["val"], parts["test"], str(path))


def read_split_file(path: str | Path) -> SplitFold:
    """Read one split file: CLAM/HIPT ``splits_k.csv`` (an optional unnamed index column, columns
    train/val/test, blank-padded) or ``splits_k_bool.csv`` (slide id index, True/False per part)."""
    path = Path(path)
    df = _read_split_table(path)
    if _is_bool_table(df):
        return _bool_fold(df, path)
    columns = {p: [v for v in df[p] if v.strip()] for p in PARTS}
    return make_fold(fold_index(path), columns["train"], columns["val"], columns["test"], str(path))


def _split_files(directory: Path) -> dict[int, dict[bool, Path]]:
    found: dict[int, dict[bool, Path]] = {}
    for path in sorted(directory.iterdir()):
        match = _SPLIT_NAME.match(path.name)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2) is not None] = path
    return found


def read_splits_dir(directory: str | Path) -> list[SplitFold]:
    """All folds of a split folder, sorted by k; ``splits_k.csv`` is preferred over ``splits_k_bool.csv``
    (when both exist they must agree), ``*_descriptor.csv`` and other files are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: split folder not found")
    found = _split_files(directory)
    if not found:
        raise DataError(f"{directory}: no split files (splits_<k>.csv or splits_<k>_bool.csv) in this folder")
    folds = []
    for k in sorted(found):
        files = found[k]
        fold = read_split_file(files.get(False) or files[True])
        if False in files and True in files and read_split_file(files[True]) != fold:
            raise DataError(f"{files[False]} and {files[True].name} disagree; delete the stale one")
        folds.append(fold)
    return folds


def check_folds_against_labels(folds: Sequence[SplitFold], slide_ids: Iterable[str], where: str) -> None:
    """Raise DataError when a fold names slides that the label table lacks (``where`` names the split)."""
    known = set(slide_ids)
    for fold in folds:
        unknown = sorted(set(fold.all_slides()) - known)
        if unknown:
            examples = ", ".join(unknown[:3])
            raise DataError(f"{where}: fold {fold.index} names {len(unknown)} slide(s) not in the label table "
                            f"(e.g. {examples}); fix the split or the labels, or import it with "
                            "`zoomfeat splits hipt`, which drops them")


def check_same_splits(directory: Path, folds: Sequence[SplitFold]) -> None:
    """ConfigError when ``directory`` holds split files other than ``folds`` (unreadable ones count as other)."""
    from zoomfeat.errors import ConfigError

    if not directory.is_dir() or not _split_files(directory):
        return
    try:
        old = read_splits_dir(directory)
    except DataError:
        old = None
    if old != list(folds):
        differ = "unreadable" if old is None else ", ".join(
            str(k) for k in sorted({f.index for f in old} ^ {f.index for f in folds} |
                                   {a.index for a in old for b in folds if a.index == b.index and a != b}))
        raise ConfigError(f"{directory} already holds other splits (folds {differ} differ): pass another --out, "
                          "or delete that folder to replace them")


def _fold_frame(fold: SplitFold) -> pd.DataFrame:
    n = max(fold.sizes()) if fold.all_slides() else 0
    return pd.DataFrame({p: list(fold.part(p)) + [""] * (n - len(fold.part(p))) for p in PARTS})


def write_splits_dir(folds: Sequence[SplitFold], directory: str | Path, *, source: str = "",
                     seed: int | None = None, command: str | None = None,
                     extra: dict[str, Any] | None = None) -> Path:
    """Write ``splits_<k>.csv`` (train,val,test) per fold and ``splits.json`` (provenance) into ``directory``.

    A folder that already holds other splits is refused (ConfigError naming it), never overwritten: runs made on
    the old files would silently stop matching them. Writing the same folds again is fine."""
    from zoomfeat.store import atomic_write

    directory = Path(directory)
    check_same_splits(directory, folds)
    for fold in folds:
        with atomic_write(directory / f"splits_{fold.index}.csv") as tmp:
            _fold_frame(fold).to_csv(tmp, index=False)
    provenance = {
        "format": SPLITS_FORMAT, "format_version": SPLITS_FORMAT_VERSION, "source": source, "seed": seed,
        "command": command if command is not None else " ".join(["zoomfeat", *sys.argv[1:]]),
        "folds": len(folds),
        "sizes": {str(f.index): dict(zip(PARTS, f.sizes())) for f in folds},
        **(extra or {}),
    }
    write_json_atomic(directory / "splits.json", provenance)
    return directory
