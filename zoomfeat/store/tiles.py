"""HDF5 tile and feature files, one per slide (format: DESIGN.md "Tile store and feature files").

Layout of ``<DIR>/<slide_id>.h5``::

    /                attrs format="zoomfeat", format_version=1, slide_id, slide_path, base_mpp (NaN if unknown),
                     base_magnification, fingerprint (JSON {"path", "size", "mtime_ns"} of the slide file),
                     [extractor, extractor_config (JSON)], complete=True (written last)
    /<mag>/coords    int64 [N, 2] level-0 (x, y) top-left; attrs magnification, patch_size, patch_size_level0
    /<mag>/parent_<coarser>   int64 [N] row into /<coarser>/coords
    /<mag>/features  float32 [N, D] (feature files only)

Writes go to a hidden temporary file in the same folder, fsync'ed and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from zoomfeat.errors import DataError
from zoomfeat.mags import PATCH_SIZE, mag_name, parse_mag
from zoomfeat.slides import SlideInfo
from zoomfeat.tiling import TileGrid

FORMAT = "zoomfeat"
FORMAT_VERSION = 1
REQUIRED_ATTRS = ("format", "format_version", "slide_id", "slide_path", "base_mpp", "base_magnification")


def h5_path(out_dir: str | Path, slide_id: str) -> Path:
    """``<out_dir>/<slide_id>.h5``."""
    return Path(out_dir) / f"{slide_id}.h5"


def temp_path(path: str | Path) -> Path:
    """Hidden temporary name, in the same folder, under which ``path`` is written before the rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def commit_file(tmp: str | Path, path: str | Path) -> Path:
    """Make a finished temporary file the real ``path``: fsync it, rename it over ``path``, fsync the folder.

    The one rename of the package: every writer (feature files, JSON/YAML records, CSV tables, checkpoints,
    images) ends here, directly or through :func:`atomic_write`.
    """
    tmp, path = Path(tmp), Path(path)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """``with atomic_write(out) as tmp: <write the file tmp>``: ``out`` appears complete or not at all.

    The parent folder is created; the temporary file (hidden, same folder) is removed when the block raises,
    including on KeyboardInterrupt.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fingerprint(slide_path: str | Path) -> dict:
    """Identity of a slide file for skipping: absolute path, size in bytes, mtime in ns."""
    path = Path(slide_path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


def _decode(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(path: str | Path) -> dict:
    """Root attributes as plain Python values (str, int, float, bool)."""
    import h5py

    with h5py.File(path, "r") as f:
        return {k: _decode(v) for k, v in f.attrs.items()}


def is_complete(path: str | Path, slide_path: str | Path | None = None) -> bool:
    """True when ``path`` is a finished zoomfeat file (and, with ``slide_path``, made from that exact file)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        attrs = read_attrs(path)
    except OSError:  # h5py raises OSError for truncated or foreign files
        return False
    if attrs.get("format") != FORMAT or attrs.get("format_version") != FORMAT_VERSION or not attrs.get("complete"):
        return False
    if slide_path is None:
        return True
    try:
        return json.loads(attrs.get("fingerprint", "{}")) == fingerprint(slide_path)
    except (OSError, ValueError):
        return False


class TileStoreWriter:
    """Writes one slide's file: grid at construction, features streamed, ``commit()`` renames it into place.

    Used as a context manager: leaving the block without ``commit()`` (or on an exception) deletes the
    temporary file, so an interrupted slide is redone on the next run.
    """

    def __init__(self, path: str | Path, info: SlideInfo, grid: TileGrid, *, extractor: str | None = None,
                 extractor_config: dict | None = None, feature_dim: int | None = None):
        import h5py

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.path.parent.glob(f".{self.path.name}.tmp*"):
            stale.unlink(missing_ok=True)  # left by a killed run
        self.tmp = temp_path(self.path)
        self.grid = grid
        self.feature_dim = feature_dim
        self._written: dict[str, np.ndarray] = {}
        self._file = h5py.File(self.tmp, "w")
        try:
            self._write_header(info, extractor, extractor_config)
            self._write_grid()
        except BaseException:
            self.abort()
            raise

    def _write_header(self, info: SlideInfo, extractor: str | None, extractor_config: dict | None) -> None:
        attrs = self._file.attrs
        attrs["format"] = FORMAT
        attrs["format_version"] = FORMAT_VERSION
        attrs["slide_id"] = info.slide_id
        attrs["slide_path"] = str(info.path)
        attrs["base_mpp"] = float("nan") if info.base_mpp is None else float(info.base_mpp)
        attrs["base_magnification"] = float(info.base_magnification)
        attrs["fingerprint"] = json.dumps(fingerprint(info.path)) if Path(info.path).is_file() else "{}"
        attrs["mags"] = json.dumps(list(self.grid.names))
        if extractor is not None:
            attrs["extractor"] = extractor
            attrs["extractor_config"] = json.dumps(extractor_config or {}, sort_keys=True)
        if self.feature_dim is not None:
            attrs["feature_dim"] = int(self.feature_dim)

    def _write_grid(self) -> None:
        names = self.grid.names
        for i, name in enumerate(names):
            coords = np.asarray(self.grid.coords[name], dtype=np.int64).reshape(-1, 2)
            group = self._file.create_group(name)
            group.create_dataset("coords", data=coords)
            group.attrs["magnification"] = float(parse_mag(name))
            group.attrs["patch_size"] = PATCH_SIZE
            group.attrs["patch_size_level0"] = int(self.grid.patch_size_level0[name])
            for coarser in names[i + 1 :]:
                group.create_dataset(f"parent_{coarser}", data=np.asarray(self.grid.parents[name][coarser], np.int64))
            if self.feature_dim is not None:
                n = len(coords)
                chunks = (min(n, 1024), self.feature_dim) if n else None
                group.create_dataset("features", shape=(n, self.feature_dim), dtype=np.float32, chunks=chunks)
                self._written[name] = np.zeros(n, bool)

    def write_features(self, mag_name: str, start: int, rows: np.ndarray) -> None:
        """Store float32 ``rows`` [B, D] as feature rows ``start:start+B`` of magnification ``mag_name``."""
        if self.feature_dim is None:
            raise DataError(f"{self.path}: this tile file was opened without feature_dim; pass feature_dim=D")
        rows = np.asarray(rows, dtype=np.float32)
        written = self._written[mag_name]
        if rows.ndim != 2 or rows.shape[1] != self.feature_dim or start < 0 or start + len(rows) > len(written):
            raise DataError(f"{self.path}: features {rows.shape} at row {start} do not fit {mag_name} "
                            f"[{len(written)}, {self.feature_dim}]")
        self._file[mag_name]["features"][start : start + len(rows)] = rows
        written[start : start + len(rows)] = True

    def write_extra_group(self, name: str, coords: np.ndarray, features: np.ndarray,
                          description: str = "") -> None:
        """Store a side group ``name`` (``coords`` int64 [M, 2], ``features`` float32 [M, C]) before ``commit``.

        ``name`` must not parse as a magnification (e.g. ``"conditioning_extra_20x"``), so ``read_grid`` and
        ``verify_file`` keep ignoring the group; ValueError when it does or when the rows disagree.
        """
        try:
            parse_mag(name)
        except ValueError:
            pass
        else:
            raise ValueError(f"extra group name {name!r} reads as a magnification: pick a name like 'extra_{name}'")
        coords = np.asarray(coords, np.int64).reshape(-1, 2)
        features = np.asarray(features, np.float32)
        if len(features) != len(coords):
            raise ValueError(f"extra group {name!r}: {len(coords)} coords but {len(features)} feature rows")
        group = self._file.create_group(name)
        group.create_dataset("coords", data=coords)
        group.create_dataset("features", data=features)
        if description:
            group.attrs["description"] = description

    def commit(self) -> Path:
        """Mark complete (last), flush, fsync, rename to the final path; return it."""
        missing = {name: int((~w).sum()) for name, w in self._written.items() if not w.all()}
        if missing:
            raise DataError(f"{self.path}: feature rows never written: {missing}")
        self._file.attrs["complete"] = True
        self._file.flush()
        self._file.close()
        return commit_file(self.tmp, self.path)

    def abort(self) -> None:
        """Close and delete the temporary file (idempotent)."""
        if self._file.id.valid:
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TileStoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.tmp.exists():
            self.abort()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on folders
    finally:
        os.close(fd)


def _group_names(f) -> list[str]:
    names = []
    for key in f.keys():
        try:
            parse_mag(key)
        except ValueError:
            continue
        names.append(key)
    return sorted(names, key=parse_mag, reverse=True)


def read_grid(path: str | Path) -> TileGrid:
    """The tile grid stored in a tile or feature file."""
    import h5py

    with h5py.File(path, "r") as f:
        names = _group_names(f)
        coords = {n: f[n]["coords"][()].astype(np.int64) for n in names}
        parents = {n: {c: f[n][f"parent_{c}"][()].astype(np.int64) for c in names[i + 1 :]}
                   for i, n in enumerate(names)}
        sizes = {n: int(f[n].attrs["patch_size_level0"]) for n in names}
    return TileGrid(mags=tuple(parse_mag(n) for n in names), coords=coords, parents=parents, patch_size_level0=sizes)


def read_features(path: str | Path, mag_name_: str) -> np.ndarray:
    """float32 [N, D] features of one magnification; :class:`DataError` when absent."""
    import h5py

    name = mag_name(parse_mag(mag_name_))
    with h5py.File(path, "r") as f:
        if name not in f or "features" not in f[name]:
            raise DataError(f"{path}: no features at {name}: extract them with `zoomfeat extract --mags {name}`")
        return f[name]["features"][()].astype(np.float32)


def verify_file(path: str | Path) -> list[str]:
    """Problems with one file (empty when fine): unreadable, incomplete, inconsistent, NaN/inf, bad parents."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return _verify_open(f)
    except OSError as exc:
        return [f"unreadable: {' '.join(str(exc).split())}"]


def _verify_open(f) -> list[str]:
    attrs = {k: _decode(v) for k, v in f.attrs.items()}
    problems = [f"missing root attribute {a!r}" for a in REQUIRED_ATTRS if a not in attrs]
    if not attrs.get("complete"):
        problems.append("incomplete (no complete=True attribute): rerun the command to redo it")
    if attrs.get("format") != FORMAT or attrs.get("format_version") != FORMAT_VERSION:
        problems.append(f"format {attrs.get('format')!r} version {attrs.get('format_version')!r}, "
                        f"expected {FORMAT!r} version {FORMAT_VERSION}")
    names = _group_names(f)
    base_mag = attrs.get("base_magnification")
    feature_dims = set()
    for i, name in enumerate(names):
        problems += _verify_group(f, name, names[i + 1 :], base_mag, feature_dims)
    if len(feature_dims) > 1:
        problems.append(f"feature dimensions differ between magnifications: {sorted(feature_dims)}")
    if "extractor" in attrs and not feature_dims:
        problems.append("feature file (has 'extractor') without any features dataset")
    return problems


def _verify_group(f, name: str, coarser: list[str], base_mag, feature_dims: set) -> list[str]:
    group = f[name]
    if "coords" not in group:
        return [f"{name}: no coords dataset"]
    coords = group["coords"][()]
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.dtype != np.int64:
        return [f"{name}/coords has shape {coords.shape} dtype {coords.dtype}, expected int64 [N, 2]"]
    problems = []
    size = int(group.attrs.get("patch_size_level0", -1))
    if isinstance(base_mag, (int, float)) and math.isfinite(base_mag):
        expected = PATCH_SIZE * base_mag / parse_mag(name)
        if abs(size - expected) > 1e-6:
            problems.append(f"{name}: patch_size_level0 {size} != 256 * {base_mag:g} / {name}")
    if size > 0 and len(coords) and (coords % size).any():
        problems.append(f"{name}: coords not on the {size}-px lattice")
    for parent in coarser:
        problems += _verify_parents(f, name, parent, coords)
    if "features" in group:
        features = group["features"]
        feature_dims.add(features.shape[1] if features.ndim == 2 else -1)
        if features.ndim != 2 or features.shape[0] != len(coords):
            problems.append(f"{name}/features has shape {features.shape}, expected [{len(coords)}, D]")
        else:
            bad = sum(int((~np.isfinite(features[i : i + 4096])).any(axis=1).sum())
                      for i in range(0, len(features), 4096))
            if bad:
                problems.append(f"{name}/features: {bad} rows contain NaN or inf")
    return problems


def _verify_parents(f, name: str, parent: str, coords: np.ndarray) -> list[str]:
    key = f"parent_{parent}"
    if key not in f[name]:
        return [f"{name}: missing {key}"]
    rows = f[name][key][()]
    parent_coords = f[parent]["coords"][()]
    parent_size = int(f[parent].attrs.get("patch_size_level0", 0))
    if rows.shape != (len(coords),):
        return [f"{name}/{key} has shape {rows.shape}, expected ({len(coords)},)"]
    if len(rows) and (rows.min() < 0 or rows.max() >= len(parent_coords)):
        return [f"{name}/{key}: rows out of range [0, {len(parent_coords)})"]
    if len(rows) and parent_size > 0:
        wrong = int(((coords // parent_size) * parent_size != parent_coords[rows]).any(axis=1).sum())
        if wrong:
            return [f"{name}/{key}: {wrong} tiles do not lie inside their parent tile"]
    return []


def verify_dir(folder: str | Path) -> dict[Path, list[str]]:
    """Problems per file for every ``*.h5`` in ``folder`` (and leftover temporary files of killed runs)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: give the output folder of `zoomfeat tile` or `extract`")
    report = {p: verify_file(p) for p in sorted(folder.glob("*.h5")) if not p.name.startswith(".")}
    for tmp in sorted(folder.glob(".*.h5.tmp*")):
        report[tmp] = ["temporary file of an interrupted run: rerun the command (it redoes that slide)"]
    return report
