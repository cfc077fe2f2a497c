"""The CDM's context store: the HDF5 file of Summarizer contexts written by ``zoomfeat prepare-cdm`` and read by
``zoomfeat train-cdm`` (a store module: the CDM package itself never imports h5py). Layout of
``OUT/contexts.h5`` (format ``zoomfeat-cdm-contexts`` version 1)::

    /            attrs format, format_version, settings (JSON of what the content depends on), n, context_shape
                 (JSON [65, D]), cond_dim, cond_labels (JSON list, one-hot columns; [] without labels),
                 counts (JSON {mag name: n}), rows_done (rows written so far), complete=True (written last)
    /contexts    float32 [N, 65, D]   Summarizer outputs (no classifier-free dropout), one chunk per row
    /mags        int64 [N]            ZoomLDM magnification index of each row (20x=0 ... 0.15625x=7)
    /source_shard int32 [N], /source_row int64 [N]   where the row's patch lives in the prepare-train set
    /cond        float32 [N, E]       optional external conditioning vectors (E = cond_dim > 0)

The file is written, streamed in row order, under the hidden name ``.contexts.h5.partial`` whose
``rows_done`` attribute records progress; a run with the same settings resumes from there, another one is
refused. When every row is written the partial file is committed (fsync + rename) to ``contexts.h5``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from zoomfeat.errors import DataError
from zoomfeat.mags import MAGNIFICATIONS, mag_name
from zoomfeat.store.files import commit_file

FORMAT = "zoomfeat-cdm-contexts"
FORMAT_VERSION = 1
FILE_NAME = "contexts.h5"


def store_path(out: str | Path) -> Path:
    return Path(out) / FILE_NAME


def partial_path(out: str | Path) -> Path:
    return Path(out) / f".{FILE_NAME}.partial"


def _counts(mags: np.ndarray) -> dict[str, int]:
    n = np.bincount(mags.astype(np.int64), minlength=len(MAGNIFICATIONS))
    return {mag_name(m): int(c) for m, c in zip(MAGNIFICATIONS, n)}


def complete_settings(out: str | Path) -> str | None:
    """``settings`` of the complete store under ``out``, or None when there is none."""
    path = store_path(out)
    if not path.is_file():
        return None
    with h5py.File(path, "r") as f:
        return str(f.attrs.get("settings")) if f.attrs.get("complete", False) else None


class ContextWriter:
    """Streams rows into the partial store; ``start`` tells where a resumed run goes on.

    ``mags``, ``source_shard`` and ``source_row`` (all [N]) are written up front, contexts (and ``cond``) in
    batches with :meth:`write`; :meth:`commit` marks the file complete and renames it.
    """

    def __init__(self, out: str | Path, *, settings: str, mags: np.ndarray, source_shard: np.ndarray,
                 source_row: np.ndarray, context_shape: tuple[int, int], cond: np.ndarray | None = None,
                 cond_labels: list[str] | None = None):
        self.out = Path(out)
        self.final = store_path(out)
        self.path = partial_path(out)
        self.settings = settings
        self.n = len(mags)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            self._reopen()
        else:
            self._create(mags, source_shard, source_row, tuple(context_shape), cond, cond_labels or [])

    def _create(self, mags, source_shard, source_row, context_shape, cond, cond_labels) -> None:
        self.f = h5py.File(self.path, "w")
        try:
            self.f.attrs.update({
                "format": FORMAT, "format_version": FORMAT_VERSION, "settings": self.settings, "n": self.n,
                "context_shape": json.dumps(list(context_shape)), "cond_dim": 0 if cond is None else cond.shape[1],
                "cond_labels": json.dumps(cond_labels), "counts": json.dumps(_counts(np.asarray(mags))),
                "rows_done": 0})
            self.f.create_dataset("contexts", shape=(self.n, *context_shape), dtype=np.float32,
                                  chunks=(1, *context_shape) if self.n else None)
            self.f.create_dataset("mags", data=np.asarray(mags, dtype=np.int64))
            self.f.create_dataset("source_shard", data=np.asarray(source_shard, dtype=np.int32))
            self.f.create_dataset("source_row", data=np.asarray(source_row, dtype=np.int64))
            if cond is not None:
                self.f.create_dataset("cond", data=np.asarray(cond, dtype=np.float32))
            self.f.flush()
        except BaseException:
            self.abort()
            raise

    def _reopen(self) -> None:
        self.f = h5py.File(self.path, "r+")
        a = self.f.attrs
        if a.get("format") != FORMAT or a.get("settings") != self.settings or int(a.get("n", -1)) != self.n:
            self.f.close()
            raise DataError(f"{self.path} is an unfinished store made with other settings (another set, "
                            "checkpoint or precision): delete it, or use another --out")

    @property
    def start(self) -> int:
        """Rows already written (0 for a new file)."""
        return int(self.f.attrs["rows_done"])

    def write(self, start: int, contexts: np.ndarray) -> None:
        """Rows ``start .. start+len`` (must continue where the file stands), then record the progress."""
        if start != self.start:
            raise DataError(f"{self.path}: rows must be written in order (at {self.start}, got {start})")
        contexts = np.asarray(contexts, dtype=np.float32)
        if not np.isfinite(contexts).all():
            raise DataError(f"non-finite Summarizer outputs at rows {start}..{start + len(contexts) - 1}: "
                            "check the ZoomLDM checkpoint, or rerun with --precision fp32")
        self.f["contexts"][start:start + len(contexts)] = contexts
        self.f.attrs["rows_done"] = start + len(contexts)
        self.f.flush()

    def commit(self) -> Path:
        if self.start != self.n:
            raise DataError(f"{self.path}: {self.start} of {self.n} rows written; cannot commit")
        self.f.attrs["complete"] = True
        self.f.close()
        return commit_file(self.path, self.final)

    def abort(self) -> None:
        """Close and delete the partial file (used when it cannot be completed)."""
        self.f.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close, keeping the partial file for a later resume."""
        if self.f.id.valid:
            self.f.close()


class ContextSet:
    """Reads a complete store: ``len``, ``item(k) -> (context float32 [65, D], mag, cond | None)``.

    The file is opened lazily per process (safe with DataLoader workers).
    """

    def __init__(self, root: str | Path):
        path = Path(root)
        self.path = store_path(path) if path.is_dir() else path
        if not self.path.is_file():
            raise DataError(f"{self.path} not found: pass --data a folder written by `zoomfeat prepare-cdm`")
        with h5py.File(self.path, "r") as f:
            a = f.attrs
            if a.get("format") != FORMAT or int(a.get("format_version", 0)) != FORMAT_VERSION:
                raise DataError(f"{self.path} is not a zoomfeat CDM context store ({FORMAT} v{FORMAT_VERSION})")
            if not a.get("complete", False):
                raise DataError(f"{self.path} is incomplete: rerun prepare-cdm to finish it")
            self.settings = str(a["settings"])
            self.context_shape = tuple(json.loads(a["context_shape"]))
            self.cond_dim = int(a["cond_dim"])
            self.cond_labels = list(json.loads(a["cond_labels"]))
            self.mags = f["mags"][()].astype(np.int64)
        if len(self.mags) == 0:
            raise DataError(f"{self.path} holds no context: check the prepare-train set")
        self._file = None
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.mags)

    def by_mag(self) -> list[np.ndarray]:
        """Row indices of each magnification index 0..7."""
        return [np.flatnonzero(self.mags == m) for m in range(len(MAGNIFICATIONS))]

    def _open(self):
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def item(self, k: int) -> tuple[np.ndarray, int, np.ndarray | None]:
        f = self._open()
        cond = f["cond"][k].astype(np.float32) if self.cond_dim else None
        return f["contexts"][k].astype(np.float32), int(self.mags[k]), cond

    def contexts(self, rows: np.ndarray | None = None) -> np.ndarray:
        """All contexts (or the given sorted rows) float32 [n, 65, D], read at once (for small sets)."""
        data = self._open()["contexts"]
        return data[()] if rows is None else data[np.asarray(rows)]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"] = None
        return state
