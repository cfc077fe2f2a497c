"""Resumable batches over slides: one outcome per slide, one-line errors, errors.csv, a final summary.

A slide that fails (``ZoomfeatError``, ``openslide.OpenSlideError``, ``OSError``, ``ValueError`` from the slide
layer) is reported as ``error: <slide>: <reason>`` and listed in ``<out_dir>/errors.csv`` (slide,error); the
batch goes on and its exit code is 1. ``KeyboardInterrupt`` and other exceptions (bugs) propagate.
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zoomfeat.errors import ConfigError, ZoomfeatError

ERRORS_CSV = "errors.csv"


@dataclass
class BatchReport:
    """Outcome of a batch: slide -> "done" | "skipped" | "failed", the errors, and the wall time in seconds."""

    outcomes: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def count(self, outcome: str) -> int:
        return sum(1 for v in self.outcomes.values() if v == outcome)

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0

    def summary(self) -> str:
        return (f"done {self.count('done')}, skipped {self.count('skipped')}, failed {self.count('failed')} "
                f"in {self.seconds:.1f} s")


def shard_slides(slides: Sequence[Path], shard: str | None) -> list[Path]:
    """Slides of shard ``"i/n"`` (0 <= i < n): every n-th slide of the sorted list starting at i."""
    ordered = sorted(Path(s) for s in slides)
    if shard is None:
        return ordered
    index, count = parse_shard(shard)
    return ordered[index::count]


def parse_shard(shard: str) -> tuple[int, int]:
    """``"1/4" -> (1, 4)``; :class:`ConfigError` unless 0 <= i < n."""
    try:
        index_text, count_text = shard.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError as exc:
        raise ConfigError(f"--shard {shard!r} must look like i/n, e.g. 0/4") from exc
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {shard!r} needs 0 <= i < n, e.g. 0/4 ... 3/4")
    return index, count


def _slide_errors() -> tuple[type[BaseException], ...]:
    import openslide

    return (ZoomfeatError, openslide.OpenSlideError, OSError, ValueError)


def _one_line(exc: BaseException, slide: Path) -> str:
    """The error on one line, without a leading "<slide>: " (the report line names the slide already)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    prefix = f"{slide}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def run_batch(slides: Sequence[Path], out_dir: str | Path, process: Callable[[Path], str], desc: str,
              progress: bool = True) -> BatchReport:
    """Call ``process(slide)`` (returns "done" or "skipped") for each slide; see the module docstring."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = BatchReport()
    caught = _slide_errors()
    start = time.perf_counter()
    for slide in tqdm(list(slides), desc=desc, unit="slide", disable=not progress, file=sys.stderr):
        slide = Path(slide)
        try:
            report.outcomes[str(slide)] = process(slide)
        except caught as exc:
            report.outcomes[str(slide)] = "failed"
            report.errors[str(slide)] = _one_line(exc, slide)
            tqdm.write(f"error: {slide}: {report.errors[str(slide)]}", file=sys.stderr)
    report.seconds = time.perf_counter() - start
    write_errors_csv(out / ERRORS_CSV, report.errors)
    print(f"{desc}: {report.summary()}", file=sys.stderr)
    return report


def write_errors_csv(path: Path, errors: dict[str, str]) -> None:
    """``slide,error`` rows (header only when nothing failed, so a stale list never survives a clean run)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "error"])
        writer.writerows(sorted(errors.items()))
