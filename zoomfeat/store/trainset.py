"""The ZoomLDM training-set format written by ``prepare-train`` and read by ``train`` (a store module).

Layout under ``OUT`` (format ``zoomfeat-trainset`` version 1):

- ``shards/<slide_id>.h5``, one per slide, written to a temporary name and renamed when complete. Root attrs
  ``format`` = ``zoomfeat-trainshard``, ``format_version``, ``slide_id``, ``slide_path``, ``fingerprint``
  (JSON of :func:`zoomfeat.store.fingerprint`), ``settings`` (JSON of what the content depends on),
  ``base_magnification`` and ``complete`` = True last. One group per magnification (``"5x"``): ``coords``
  int64 [N, 2] level-0 patch corners, ``latents`` float16 [N, z, h, w] (pre-quantisation first-stage latents),
  ``grids`` float16 [N, C, g, g] raw conditioning grids of the patch's 20x tiles (not standardised;
  ``g = min(grid_width, grid_pool_to)``, wider grids average-pooled). Chunks are one sample.
- ``index.h5``: attrs (format, mags, latent_shape, grid_channels, grid_pool_to, grid_storage, conditioner,
  zoomldm_config, counts JSON, first_stage_digest), datasets ``shards`` / ``slide_ids`` (strings), ``counts``
  int64 [S, 8] (columns 20x ... 0.15625x), and per magnification a group with ``shard`` int32 [N], ``row``
  int64 [N], ``coords`` int64 [N, 2].
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoomfeat.errors import DataError
from zoomfeat.mags import MAGNIFICATIONS, Magnification, mag_name
from zoomfeat.store.files import (HDF5_OVERHEAD, atomic_write, check_free_space, commit_file, discard, fingerprint,
                                  same_file, temp_path, write_failure, writing)

SHARD_FORMAT = "zoomfeat-trainshard"
INDEX_FORMAT = "zoomfeat-trainset"
FORMAT_VERSION = 1
INDEX_NAME = "index.h5"
GRID_STORAGE = "raw (unstandardised) grids of 20x-tile embeddings; grids wider than grid_pool_to average-pooled to it"


def shard_path(out: str | Path, slide_id: str) -> Path:
    return Path(out) / "shards" / f"{slide_id}.h5"


def shard_is_current(path: Path, slide_path: Path, settings: str) -> bool:
    """True when ``path`` is a complete shard of this slide file made with these settings."""
    import h5py

    if not Path(path).is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            return bool(a.get("complete", False)) and same_file(a.get("fingerprint"), slide_path) \
                and a.get("settings") == settings
    except OSError:
        return False


class MagWriter:
    """Latents and grids of one magnification of a shard, written by rows."""

    def __init__(self, group, latents, grids):
        self.group, self._latents, self._grids = group, latents, grids

    def write(self, rows: np.ndarray, latents: np.ndarray, grids: np.ndarray) -> None:
        """Store float16 ``latents`` [B, z, h, w] and ``grids`` [B, C, g, g] at sorted ``rows``."""
        for name, values in (("latents", latents), ("grids", grids)):
            if not np.isfinite(np.asarray(values, np.float32)).all():
                raise DataError(f"{self.group.file.filename}: non-finite {name} at {self.group.name.strip('/')}: "
                                "the encoder diverged; check its weights or use fp32")
        with writing(self.group.file.filename):
            self._latents[rows] = latents
            self._grids[rows] = grids


class ShardWriter:
    """One slide's shard, written to a temporary file; ``commit()`` marks it complete and renames it."""

    def __init__(self, path: Path, slide_id: str, slide_path: Path, settings: str, base_magnification: float):
        import h5py

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.path.parent.glob(f".{self.path.name}.tmp*"):
            stale.unlink(missing_ok=True)  # left by a killed run (the caller holds the slide's claim)
        self.tmp = temp_path(self.path)
        try:
            self._file = h5py.File(self.tmp, "w")
            self._file.attrs.update({"format": SHARD_FORMAT, "format_version": FORMAT_VERSION,
                                     "slide_id": slide_id, "slide_path": str(slide_path),
                                     "fingerprint": json.dumps(fingerprint(slide_path)), "settings": settings,
                                     "base_magnification": float(base_magnification)})
        except OSError as exc:
            self.abort()
            raise write_failure(exc, self.path) from exc

    def add_mag(self, mag: Magnification, coords: np.ndarray, latent_shape: tuple, grid_shape: tuple) -> MagWriter:
        mag, n = Magnification(mag), len(coords)
        check_free_space(self.path, 2 * n * (16 + 2 * (int(np.prod(latent_shape)) + int(np.prod(grid_shape))))
                         + HDF5_OVERHEAD)
        group = self._file.create_group(mag.name)
        group.attrs.update({"magnification": float(mag), "grid_width": mag.grid_width,
                            "grid_stored": int(grid_shape[-1])})
        group.create_dataset("coords", data=np.asarray(coords, np.int64))
        lat = group.create_dataset("latents", shape=(n, *latent_shape), dtype=np.float16,
                                   chunks=(1, *latent_shape) if n else None)
        grd = group.create_dataset("grids", shape=(n, *grid_shape), dtype=np.float16,
                                   chunks=(1, *grid_shape) if n else None)
        return MagWriter(group, lat, grd)

    def commit(self) -> Path:
        with writing(self.path):
            self._file.flush()
            self._file.attrs["complete"] = True
            self._file.close()
        return commit_file(self.tmp, self.path)

    def abort(self) -> None:
        try:
            if getattr(self, "_file", None) is not None and self._file.id.valid:
                self._file.close()
        except (OSError, RuntimeError):
            pass
        discard(self.tmp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.tmp.exists():
            self.abort()


def _complete_shards(out: Path, settings: str | None) -> list[Path]:
    import h5py

    shards = []
    for p in sorted((out / "shards").glob("*.h5")):
        try:
            with h5py.File(p, "r") as f:
                ok = f.attrs.get("complete", False) and (settings is None or f.attrs.get("settings") == settings)
        except OSError:
            ok = False  # truncated or foreign: not part of the set
        if ok:
            shards.append(p)
    return shards


def _shard_entries(path: Path):
    """(slide_id, {mag: coords}, {(latent_shape, grid_channels)}) of one complete shard."""
    import h5py

    with h5py.File(path, "r") as f:
        coords = {name: f[name]["coords"][()] for name in f.keys()}
        shapes = {(f[n]["latents"].shape[1:], f[n]["grids"].shape[1]) for n in f.keys() if len(f[n]["coords"])}
        return str(f.attrs["slide_id"]), coords, shapes


def write_index(out: str | Path, *, settings: str | None = None, conditioner: str = "",
                zoomldm_config: str = "", grid_pool_to: int = 8, first_stage: str = "") -> tuple[dict[str, int], int]:
    """Rebuild ``OUT/index.h5`` from the complete shards (those made with ``settings`` when given)."""
    import h5py

    out = Path(out)
    shards = _complete_shards(out, settings)
    names = [mag_name(m) for m in MAGNIFICATIONS]
    counts = np.zeros((len(shards), len(names)), dtype=np.int64)
    per_mag: dict[str, list[tuple[int, np.ndarray]]] = {n: [] for n in names}
    shapes: set = set()
    slide_ids = []
    for s, path in enumerate(shards):
        slide_id, coords, shard_shapes = _shard_entries(path)
        slide_ids.append(slide_id)
        shapes |= shard_shapes
        for name, c in coords.items():
            counts[s, names.index(name)] = len(c)
            per_mag[name].append((s, c))
    if len(shapes) > 1:
        raise DataError(f"shards under {out / 'shards'} disagree on latent/grid shapes {sorted(shapes)}: "
                        "delete the shards made with other settings and rerun prepare-train")
    latent_shape, grid_channels = next(iter(shapes)) if shapes else ((), 0)
    totals = {n: int(counts[:, i].sum()) for i, n in enumerate(names)}
    with atomic_write(out / INDEX_NAME) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({"format": INDEX_FORMAT, "format_version": FORMAT_VERSION, "mags": json.dumps(names),
                        "latent_shape": json.dumps(list(latent_shape)), "grid_channels": int(grid_channels),
                        "grid_pool_to": int(grid_pool_to), "grid_storage": GRID_STORAGE,
                        "conditioner": conditioner, "zoomldm_config": zoomldm_config,
                        "counts": json.dumps(totals), "first_stage_digest": first_stage})
        f.create_dataset("shards", data=np.array([p.name for p in shards], dtype=object),
                         dtype=h5py.string_dtype())
        f.create_dataset("slide_ids", data=np.array(slide_ids, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("counts", data=counts)
        for name, entries in per_mag.items():
            g = f.create_group(name)
            g.create_dataset("shard", data=np.concatenate(
                [np.full(len(c), s, np.int32) for s, c in entries] + [np.zeros(0, np.int32)]))
            g.create_dataset("row", data=np.concatenate(
                [np.arange(len(c), dtype=np.int64) for _, c in entries] + [np.zeros(0, np.int64)]))
            g.create_dataset("coords", data=np.concatenate(
                [c.reshape(-1, 2) for _, c in entries] + [np.zeros((0, 2), np.int64)]).astype(np.int64))
    return totals, len(shards)


@dataclass(frozen=True)
class TrainIndex:
    """What ``index.h5`` says: shard file names, shapes, and the flat (shard, row, magnification) table."""

    shards: tuple[str, ...]
    latent_shape: tuple[int, ...]
    grid_channels: int
    first_stage_digest: str
    shard_of: np.ndarray
    row_of: np.ndarray
    mag_of: np.ndarray


def read_index(root: str | Path) -> TrainIndex:
    """Read ``<root>/index.h5``; DataError naming the fix when it is missing or not a training set."""
    import h5py

    index = Path(root) / INDEX_NAME
    if not index.is_file():
        raise DataError(f"{index} not found: pass --data a folder written by `zoomfeat prepare-train`")
    try:
        with h5py.File(index, "r") as f:
            if f.attrs.get("format") != INDEX_FORMAT or int(f.attrs.get("format_version", 0)) != FORMAT_VERSION:
                raise DataError(f"{index} is not a zoomfeat training set (format {INDEX_FORMAT} "
                                f"v{FORMAT_VERSION}): rerun prepare-train")
            names = [mag_name(m) for m in MAGNIFICATIONS]
            return TrainIndex(
                shards=tuple(s.decode() if isinstance(s, bytes) else str(s) for s in f["shards"][()]),
                latent_shape=tuple(json.loads(f.attrs["latent_shape"])),
                grid_channels=int(f.attrs["grid_channels"]),
                first_stage_digest=str(f.attrs.get("first_stage_digest", "")),
                shard_of=np.concatenate([f[n]["shard"][()] for n in names]).astype(np.int64),
                row_of=np.concatenate([f[n]["row"][()] for n in names]).astype(np.int64),
                mag_of=np.concatenate([np.full(len(f[n]["row"]), i, np.int64) for i, n in enumerate(names)]))
    except (OSError, KeyError) as exc:
        raise DataError(f"{index} is unreadable or truncated ({exc}): rerun prepare-train") from exc


class ShardReader:
    """Per-process open shard files of a training set (reopened after a fork), read one sample at a time."""

    def __init__(self, root: str | Path, shards: tuple[str, ...]):
        self.root, self.shards = Path(root), shards
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def sample(self, shard: int, mag: Magnification, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(latent float32 [z, h, w], grid float32 [C, g, g]) of one row of one shard."""
        import h5py

        if self._pid != os.getpid():  # a forked worker must not share the parent's handles
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = h5py.File(self.root / "shards" / self.shards[shard], "r")
        group = self._files[shard][Magnification(mag).name]
        return group["latents"][row].astype(np.float32), group["grids"][row].astype(np.float32)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}
