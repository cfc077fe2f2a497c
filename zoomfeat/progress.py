"""The one progress helper: a tqdm bar on a terminal, a plain line every few seconds elsewhere.

``progress(total, desc, unit)`` returns ``(tick, close)``: ``tick(n)`` adds n units done, ``close()`` ends the
bar. When stderr is a terminal it is a tqdm bar. When it is not (SLURM logs, nohup, a pipe), tqdm would print
nothing (``disable=None``) or a carriage-return soup, so a line ``desc: done/total unit (x%), rate unit/s,
ETA h:mm:ss`` is written instead, at most every ``every`` seconds (``$ZOOMFEAT_PROGRESS_SECONDS``, default
10) and once at the end. Standard library only at import.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

DEFAULT_EVERY_S = 10.0


def _every() -> float:
    try:
        return max(0.0, float(os.environ.get("ZOOMFEAT_PROGRESS_SECONDS", DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LineProgress:
    """Progress as plain lines on ``stream``, at most one per ``every`` seconds (plus a final one)."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float, stream=None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream, self.clock = stream, clock
        self.done = 0
        self.start = self.last = clock()
        self.closed = False

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta = _clock(left) if left != float("inf") else "?"
            return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({100.0 * self.done / self.total:.0f}%), "
                    f"{rate:.3g} {self.unit}/s, ETA {eta}")
        return f"{self.desc}: {self.done} {self.unit}, {rate:.3g} {self.unit}/s, elapsed {_clock(elapsed)}"

    def _write(self, now: float) -> None:
        stream = self.stream or sys.stderr
        stream.write(self.line(now) + "\n")
        stream.flush()
        self.last = now

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        now = self.clock()
        if now - self.last >= self.every:
            self._write(now)

    def close(self) -> None:
        if not self.closed and self.done:
            self._write(self.clock())
        self.closed = True


def progress(total: int | None, desc: str, unit: str = "it", *, enabled: bool = True):
    """``(tick, close)`` of a progress display (module doc); both are no-ops when ``enabled`` is False."""
    if not enabled:
        return (lambda n=1: None), (lambda: None)
    stream = sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, file=stream, leave=False)
        return bar.update, bar.close
    line = LineProgress(total, desc, unit, _every())
    return line.update, line.close
