"""Error records of slide batches: one per shard (and rank), merged into ``<out>/errors.csv``.

A batch over slides (``tile``, ``extract``, ``prepare-train``) writes the failures of its own part in
``<out>/.errors/<tag>.csv`` (``tag`` = ``all``, ``shard-1-of-4``, ``shard-1-of-4.rank-0-of-2``), columns
``slide,error,traceback`` (traceback empty for user errors, the Python traceback for bugs). Then, under a short
folder lock, it drops the slides it finished from every other record (a slide done now has its file, so an old
failure no longer holds) and rewrites ``<out>/errors.csv``, the union of all records. Job-array shards and
concurrent runs into one folder therefore never erase each other's failures; ``zoomfeat verify`` reads them.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from zoomfeat.store.claims import Claim
from zoomfeat.store.files import write_text

ERRORS_CSV = "errors.csv"
RECORDS_DIR = ".errors"
COLUMNS = ("slide", "error", "traceback")
_LOCK_NAME = "_errors_csv"


def record_tag(shard: tuple[int, int] | None = None, rank: int = 0, world: int = 1) -> str:
    """Name of one batch's record: ``all``, ``shard-i-of-n``, with ``.rank-r-of-w`` in a multi-process run."""
    tag = "all" if shard is None else f"shard-{shard[0]}-of-{shard[1]}"
    return tag if world == 1 else f"{tag}.rank-{rank}-of-{world}"


def read_errors(path: str | Path) -> dict[str, dict[str, str]]:
    """``{slide: {"error", "traceback"}}`` of one errors CSV (empty when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {row["slide"]: {"error": row.get("error") or "", "traceback": row.get("traceback") or ""}
                for row in csv.DictReader(fh) if row.get("slide")}


def _csv_text(errors: Mapping[str, Mapping[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for slide in sorted(errors):
        writer.writerow([slide, errors[slide].get("error", ""), errors[slide].get("traceback", "")])
    return buffer.getvalue()


def write_errors(path: str | Path, errors: Mapping[str, Mapping[str, str]]) -> Path:
    """One errors CSV (header only when nothing failed), written atomically."""
    return write_text(path, _csv_text(errors))


def all_records(out_dir: str | Path) -> dict[str, dict[str, dict[str, str]]]:
    """Every batch record of a folder: ``{tag: {slide: {"error", "traceback"}}}``."""
    folder = Path(out_dir) / RECORDS_DIR
    return {p.stem: read_errors(p) for p in sorted(folder.glob("*.csv"))}


def merged_errors(out_dir: str | Path) -> dict[str, dict[str, str]]:
    """The union of a folder's records (and of a legacy ``errors.csv`` when no record exists)."""
    records = all_records(out_dir)
    if not records:
        return read_errors(Path(out_dir) / ERRORS_CSV)
    merged: dict[str, dict[str, str]] = {}
    for errors in records.values():
        merged.update(errors)
    return merged


def update_records(out_dir: str | Path, tag: str, errors: Mapping[str, Mapping[str, str]],
                   finished: Iterable[str], wait_s: float = 60.0) -> dict[str, dict[str, str]]:
    """Update this batch's record, clear ``finished`` slides from the others, rewrite ``errors.csv``.

    The record keeps the rows of slides this batch did not try (left to a concurrent run with the same tag,
    or outside this run's slide list) and replaces those it tried: its ``errors``, minus ``finished``.
    Returns the merged errors. The folder lock is waited for up to ``wait_s`` seconds.
    """
    out = Path(out_dir)
    finished = set(finished) - set(errors)
    lock = Claim(out, _LOCK_NAME)
    deadline = time.monotonic() + wait_s
    while not lock.acquire():
        if time.monotonic() > deadline:
            break  # a wedged lock must not lose this batch's record: write without it
        time.sleep(0.05)
    try:
        mine = out / RECORDS_DIR / f"{tag}.csv"
        kept = {s: r for s, r in read_errors(mine).items() if s not in finished and s not in errors}
        write_errors(mine, {**kept, **errors})
        for other, rows in all_records(out).items():
            if other != tag and finished & set(rows):
                write_errors(out / RECORDS_DIR / f"{other}.csv",
                             {s: r for s, r in rows.items() if s not in finished})
        merged = merged_errors(out)
        write_errors(out / ERRORS_CSV, merged)
        return merged
    finally:
        lock.release()
