"""Per-slide claims: concurrent runs on one output folder share the work instead of each doing every slide.

Before working on a slide a process creates ``<out>/.claims/<slide_id>.lock`` with ``O_CREAT | O_EXCL``
(atomic, also on NFS v3+), holding JSON ``{"pid", "host", "time"}``; it removes the file when done. Another
process that finds the lock leaves the slide to its holder. A lock whose holder is dead cannot block a slide
forever: it is stale when its host is this host and its pid no longer runs, or when it has not been refreshed
for ``stale_after`` seconds (default 10 min, for holders on other hosts, whose pids cannot be checked; a holder
touches its lock every ``HEARTBEAT_S`` seconds from a daemon thread while it works, so a killed job's lock goes
stale within minutes on any host). Taking a stale lock over happens under a short second lock
(``<slide_id>.lock.takeover``, itself stale after 60 s), which re-reads the lock so that two processes can
never both take it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from zoomfeat.store.files import pid_alive, writing

CLAIMS_DIR = ".claims"
STALE_AFTER_S = 600.0
HEARTBEAT_S = 30.0
TAKEOVER_STALE_S = 60.0


def _host() -> str:
    return socket.gethostname()


def _create_exclusive(path: Path, content: str) -> bool:
    """Create ``path`` holding ``content`` if it does not exist; False when it does."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(content)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written (a holder killed between create and write) or garbage: judged by age


@dataclass
class Claim:
    """An exclusive claim on one slide of one output folder (see the module docstring)."""

    folder: Path
    slide_id: str
    stale_after: float = STALE_AFTER_S
    held: bool = False
    _stop: threading.Event | None = field(default=None, repr=False, compare=False)

    @property
    def path(self) -> Path:
        return Path(self.folder) / CLAIMS_DIR / f"{self.slide_id}.lock"

    def _content(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": _host(), "time": time.time()})

    def is_stale(self, record: dict | None) -> bool:
        """True when ``record`` (a lock's content) belongs to a dead holder or is older than ``stale_after``."""
        if record is None:
            return True
        try:
            age = time.time() - max(float(record.get("time", 0)), self.path.stat().st_mtime)
        except (OSError, TypeError, ValueError):
            age = float("inf")
        if record.get("host") == _host() and isinstance(record.get("pid"), int):
            return not pid_alive(record["pid"]) or age > self.stale_after
        return age > self.stale_after

    def acquire(self) -> bool:
        """Take the claim; False when a live process holds it (OutputError when the folder is not writable)."""
        with writing(self.path):
            return self._acquire()

    def _acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if _create_exclusive(self.path, self._content()):
            self.held = True
        else:
            record = _read(self.path)
            self.held = self.is_stale(record) and self._take_over(record)
        if self.held:
            self._start_heartbeat()
        return self.held

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()

        def beat(stop: threading.Event) -> None:
            while not stop.wait(HEARTBEAT_S):
                self.refresh()

        threading.Thread(target=beat, args=(self._stop,), daemon=True, name=f"claim-{self.slide_id}").start()

    def _take_over(self, seen: dict | None) -> bool:
        guard = self.path.with_name(self.path.name + ".takeover")
        if not _create_exclusive(guard, self._content()):
            try:
                if time.time() - guard.stat().st_mtime > TAKEOVER_STALE_S:
                    guard.unlink(missing_ok=True)  # a taker died mid-takeover; the next attempt proceeds
            except OSError:
                pass
            return False
        try:
            if _read(self.path) != seen:  # someone took it (or released it) since we looked
                return _create_exclusive(self.path, self._content())
            self.path.unlink(missing_ok=True)
            return _create_exclusive(self.path, self._content())
        finally:
            guard.unlink(missing_ok=True)

    def refresh(self) -> None:
        """Tell other hosts the holder is alive (touch the lock)."""
        if self.held:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        if self.held:
            if (_read(self.path) or {}).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> Claim:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
