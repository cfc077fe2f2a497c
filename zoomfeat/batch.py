"""Resumable batches over slides: one outcome per slide, one-line errors, per-shard error records, a summary.

Per slide, :func:`run_batch` first takes the slide's claim in the output folder
(:class:`zoomfeat.store.Claim`), so concurrent runs on one folder (job arrays on shared storage) share the work:
a slide another live process holds is left to it (outcome ``claimed``). Then ``process(slide)`` returns
"done" or "skipped".

* A user error (:class:`zoomfeat.errors.ZoomfeatError`: the slide, data and checkpoint layers wrap OpenSlide,
  HDF5 and OS errors into those where they arise) fails that slide: ``error: <slide>: <reason>`` on one line;
  the batch goes on and exits 1.
* Any other exception is a bug: the slide fails with ``internal error (<type>: <message>)`` and the full
  traceback goes into the error record; with ``--debug`` (the ``zoomfeat`` logger at DEBUG) it propagates.
* An :class:`zoomfeat.store.OutputError` (full disk, read-only folder) stops the batch: every later slide
  would fail the same way. ``KeyboardInterrupt`` propagates (the CLI prints "interrupted", exit 130).

Failures go to the batch's own record (one per shard, see :mod:`zoomfeat.store.records`), merged into
``<out_dir>/errors.csv``.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zoomfeat.errors import ConfigError, ZoomfeatError, one_line

ERRORS_CSV = "errors.csv"
OUTCOMES = ("done", "skipped", "claimed", "failed")


@dataclass
class BatchReport:
    """Outcome of a batch: slide -> "done" | "skipped" | "claimed" | "failed", the errors (one line each),
    the tracebacks of bugs, and the wall time in seconds."""

    outcomes: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    tracebacks: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def count(self, outcome: str) -> int:
        return sum(1 for v in self.outcomes.values() if v == outcome)

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0

    def summary(self) -> str:
        claimed = f", claimed by another run {self.count('claimed')}" if self.count("claimed") else ""
        return (f"done {self.count('done')}, skipped {self.count('skipped')}, failed {self.count('failed')}"
                f"{claimed} in {self.seconds:.1f} s")


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


def _one_line(exc: BaseException, slide: Path) -> str:
    """The error on one line, without a leading "<slide>: " (the report line names the slide already)."""
    text = one_line(exc, None)
    prefix = f"{slide}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def debugging() -> bool:
    """True under ``zoomfeat --debug`` (the CLI sets the ``zoomfeat`` logger to DEBUG): bugs propagate."""
    return logging.getLogger("zoomfeat").isEnabledFor(logging.DEBUG)


def _run_one(slide: Path, process: Callable[[Path], str], out: Path, claim: bool, report: BatchReport) -> None:
    from zoomfeat.slides import slide_id_of
    from zoomfeat.store import Claim, OutputError

    lock = Claim(out, slide_id_of(slide)) if claim else None
    if lock is not None and not lock.acquire():
        report.outcomes[str(slide)] = "claimed"
        return
    try:
        report.outcomes[str(slide)] = process(slide)
    except OutputError:
        raise
    except ZoomfeatError as exc:
        report.outcomes[str(slide)] = "failed"
        report.errors[str(slide)] = _one_line(exc, slide)
    except Exception as exc:  # a bug: keep its traceback in the record, show it with --debug
        if debugging():
            raise
        report.outcomes[str(slide)] = "failed"
        report.errors[str(slide)] = (f"internal error ({type(exc).__name__}: {_one_line(exc, slide)}): please report "
                                     "it with the traceback from errors.csv (or rerun with --debug)")
        report.tracebacks[str(slide)] = traceback.format_exc()
    finally:
        if lock is not None:
            lock.release()


def run_batch(slides: Sequence[Path], out_dir: str | Path, process: Callable[[Path], str], desc: str,
              progress: bool = True, *, shard: str | None = None, rank: int = 0, world: int = 1,
              claim: bool = True) -> BatchReport:
    """Call ``process(slide)`` (returns "done" or "skipped") for each slide; see the module docstring.

    ``shard`` ("i/n") and ``rank``/``world`` name this batch's error record; ``claim=False`` skips the
    per-slide claims (a caller that already owns the folder exclusively).
    """
    from tqdm import tqdm

    from zoomfeat.store import make_folder, record_tag, update_records

    out = make_folder(out_dir)
    report = BatchReport()
    start = time.perf_counter()
    stopped = True
    try:
        for slide in tqdm(list(slides), desc=desc, unit="slide", disable=not progress, file=sys.stderr):
            slide = Path(slide)
            _run_one(slide, process, out, claim, report)
            if str(slide) in report.errors:
                tqdm.write(f"error: {slide}: {report.errors[str(slide)]}", file=sys.stderr)
        stopped = False
    finally:
        report.seconds = time.perf_counter() - start
        finished = {s for s, o in report.outcomes.items() if o in ("done", "skipped")}
        errors = {s: {"error": e, "traceback": report.tracebacks.get(s, "")} for s, e in report.errors.items()}
        tag = record_tag(parse_shard(shard) if shard else None, rank, world)
        try:
            update_records(out, tag, errors, finished)
        except ZoomfeatError:
            if not stopped:  # an interrupted or fatal batch reports its own cause, not this one
                raise
    print(f"{desc}: {report.summary()}", file=sys.stderr)
    return report
