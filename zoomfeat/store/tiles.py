"""HDF5 tile and feature files, one per slide (format: docs/formats.md).

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

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from zoomfeat.errors import ConfigError, DataError, SlideError, one_line
from zoomfeat.mags import PATCH_SIZE, MagDict, Magnification, mag_name, parse_mag
from zoomfeat.slides import SlideInfo
from zoomfeat.store.files import (HDF5_OVERHEAD, check_free_space, commit_file, describe_diff, fingerprint, same_file,
                                  settings_diff, temp_path, write_failure, writing)
from zoomfeat.tiling import TileGrid, grid_from_coords, make_grid, restrict_grid
from zoomfeat.tissue import TissueParams

FORMAT = "zoomfeat"
FORMAT_VERSION = 1
REQUIRED_ATTRS = ("format", "format_version", "slide_id", "slide_path", "base_mpp", "base_magnification")


def h5_path(out_dir: str | Path, slide_id: str) -> Path:
    """``<out_dir>/<slide_id>.h5``."""
    return Path(out_dir) / f"{slide_id}.h5"


def _decode(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(path: str | Path) -> dict:
    """Root attributes as plain Python values (str, int, float, bool); DataError for an unreadable file."""
    with FeatureFile(path) as f:
        return dict(f.attrs)


def is_complete(path: str | Path, slide_path: str | Path | None = None) -> bool:
    """True when ``path`` is a finished zoomfeat file (and, with ``slide_path``, made from that exact file)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        attrs = read_attrs(path)
    except DataError:  # truncated or foreign files
        return False
    if attrs.get("format") != FORMAT or attrs.get("format_version") != FORMAT_VERSION or not attrs.get("complete"):
        return False
    return slide_path is None or same_file(attrs.get("fingerprint", "{}"), slide_path)


def is_complete_with(path: str | Path, slide_path: str | Path | None, extractor_config: dict | None) -> bool:
    """``path`` is a complete feature file of ``slide_path`` (any slide when None) made with ``extractor_config``;
    SlideError naming the keys that differ when it was made with another one (extract and the feature copies
    skip a complete file, never overwrite one made otherwise)."""
    if not is_complete(path, slide_path):
        return False
    with FeatureFile(path) as f:
        diff = settings_diff(f.extractor_config or {}, extractor_config or {})
    if diff:
        raise SlideError(f"{path} holds features made with other settings ({describe_diff(diff)}): "
                         "use another --out (or --conditioning-out), or delete the file")
    return True


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
        check_free_space(self.path, self.expected_bytes())
        self._written: dict[str, np.ndarray] = {}
        try:
            self._file = h5py.File(self.tmp, "w")
        except OSError as exc:
            self.tmp.unlink(missing_ok=True)
            raise write_failure(exc, self.path) from exc
        try:
            with writing(self.path):
                self._write_header(info, extractor, extractor_config)
                self._write_grid()
        except BaseException:
            self.abort()
            raise

    def expected_bytes(self) -> int:
        """Generous size of the finished file: twice its arrays plus the HDF5 overhead."""
        names = self.grid.names
        rows = sum(len(self.grid.coords[n]) * (2 + len(names) - 1 - i) * 8 for i, n in enumerate(names))
        rows += sum(len(self.grid.coords[n]) for n in names) * 4 * int(self.feature_dim or 0)
        return 2 * rows + HDF5_OVERHEAD

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

    def write_features(self, mag: Magnification, start: int, rows: np.ndarray) -> None:
        """Store float32 ``rows`` [B, D] as feature rows ``start:start+B`` of magnification ``mag``."""
        mag_name = Magnification(mag).name
        if self.feature_dim is None:
            raise DataError(f"{self.path}: this tile file was opened without feature_dim; pass feature_dim=D")
        rows = np.asarray(rows, dtype=np.float32)
        written = self._written[mag_name]
        if rows.ndim != 2 or rows.shape[1] != self.feature_dim or start < 0 or start + len(rows) > len(written):
            raise DataError(f"{self.path}: features {rows.shape} at row {start} do not fit {mag_name} "
                            f"[{len(written)}, {self.feature_dim}]")
        if not np.isfinite(rows).all():
            bad = int((~np.isfinite(rows)).any(axis=1).sum())
            raise DataError(f"{self.path}: {bad} {mag_name} feature rows from row {start} are NaN or inf: "
                            "the extractor diverged (try --precision fp32) or its weights are broken")
        with writing(self.path):
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
        except ConfigError:
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
        with writing(self.path):
            self._file.attrs["complete"] = True
            self._file.flush()
            self._file.close()
        return commit_file(self.tmp, self.path)

    def abort(self) -> None:
        """Close and delete the temporary file (idempotent)."""
        try:
            if self._file.id.valid:
                self._file.close()
        except (OSError, RuntimeError):
            pass  # a full disk can make the close fail: the file is deleted anyway
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TileStoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.tmp.exists():
            self.abort()


def _group_names(f) -> list[str]:
    names = []
    for key in f.keys():
        try:
            parse_mag(key)
        except ConfigError:
            continue
        names.append(key)
    return sorted(names, key=parse_mag, reverse=True)


def _open_h5(path: Path):
    import h5py

    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "not found"
        raise DataError(f"{path}: feature file {what}; extract the slide or fix the path")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: unreadable HDF5 file ({one_line(exc)}): it is truncated or not a "
                        "zoomfeat file; delete it and rerun the command that wrote it") from exc


class FeatureFile:
    """Read access to one tile or feature file: the one reader of the format (bags, export, heatmaps,
    conditioning reuse, verify). A context manager; every failure is a :class:`DataError` naming the file.

    Root metadata: :attr:`attrs`, :attr:`complete`, :attr:`version`, :attr:`slide_id`,
    :attr:`base_magnification`, :attr:`slide_fingerprint`, :attr:`extractor`, :attr:`extractor_config`.
    Contents: :attr:`mags` (names of the magnification groups, finest first), :meth:`grid`, :meth:`coords`,
    :meth:`shape`, :meth:`features`, :meth:`fused_shape` / :meth:`fused` (a feature spec's fused bag),
    :meth:`extra` (a side group such as the conditioning tiles).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = _open_h5(self.path)
        try:
            self.attrs = {k: _decode(v) for k, v in self._f.attrs.items()}
        except OSError as exc:
            self.close()
            raise DataError(f"{self.path}: unreadable attributes ({exc}); delete it and rerun") from exc

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- root metadata -------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def version(self) -> int | None:
        value = self.attrs.get("format_version")
        return int(value) if value is not None else None

    @property
    def slide_id(self) -> str:
        return str(self.attrs.get("slide_id", self.path.stem))

    @property
    def base_magnification(self) -> float | None:
        value = self.attrs.get("base_magnification")
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) and value > 0 else None

    @property
    def slide_fingerprint(self) -> dict | None:
        raw = self.attrs.get("fingerprint")
        try:
            value = json.loads(raw) if raw else None
        except ValueError:
            return None
        return value or None

    @property
    def extractor(self) -> str | None:
        value = self.attrs.get("extractor")
        return None if value is None else str(value)

    @property
    def extractor_config(self) -> dict | None:
        raw = self.attrs.get("extractor_config")
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return {"raw": str(raw)}

    def require_complete(self) -> FeatureFile:
        if not self.complete:
            raise DataError(f"{self.path}: incomplete feature file (no 'complete' attribute); rerun the extraction")
        return self

    # --- contents ------------------------------------------------------------------------------------------
    @property
    def mags(self) -> tuple[Magnification, ...]:
        return tuple(Magnification(n) for n in _group_names(self._f))

    def _group(self, mag, dataset: str = "features"):
        name = mag_name(mag)
        if name not in self._f or dataset not in self._f[name]:
            present = ", ".join(self._f.keys()) or "none"
            raise DataError(f"{self.path}: no {dataset} at {name} (groups present: {present}); "
                            f"extract {name} or change the feature set")
        return self._f[name]

    def coords(self, mag) -> np.ndarray:
        return self._group(mag, "coords")["coords"][()].astype(np.int64)

    def shape(self, mag) -> tuple[int, int]:
        """(rows, width) of one magnification's features, from the dataset shape (no data read)."""
        shape = self._group(mag)["features"].shape
        if len(shape) != 2:
            raise DataError(f"{self.path}: {mag_name(mag)}/features has shape {shape}, expected [N, D]")
        return int(shape[0]), int(shape[1])

    def features(self, mag) -> np.ndarray:
        """float32 [N, D] features of one magnification (float16 storage upcast)."""
        return np.asarray(self._group(mag)["features"][()], dtype=np.float32)

    def grid(self) -> TileGrid:
        names = [m.name for m in self.mags]
        f = self._f
        coords = {n: self.coords(n) for n in names}
        parents = {n: {c: self._parents(n, c) for c in names[i + 1 :]} for i, n in enumerate(names)}
        sizes = {n: int(f[n].attrs.get("patch_size_level0", 0)) for n in names}
        return TileGrid(mags=self.mags, coords=coords, parents=parents, patch_size_level0=sizes)

    def _parents(self, fine: str, coarse: str) -> np.ndarray:
        key = f"parent_{coarse}"
        if key not in self._group(fine, "coords"):
            raise DataError(f"{self.path}: group {fine} has no {key}; extract with both magnifications "
                            f"({fine}+{coarse}) in one run")
        return np.asarray(self._f[fine][key][()], dtype=np.int64)

    def fused_shape(self, mags: Sequence) -> tuple[int, int]:
        """(instances, fused width) of the bag fusing ``mags`` (finest first), from shapes only."""
        names = [mag_name(m) for m in mags]
        shapes = [self.shape(m) for m in names]
        for coarse in names[1:]:
            if f"parent_{coarse}" not in self._group(names[0]):
                raise DataError(f"{self.path}: group {names[0]} has no parent_{coarse}; extract with both "
                                f"magnifications ({'+'.join(names)}) in one run")
        return shapes[0][0], sum(d for _, d in shapes)

    def fused(self, mags: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [N, sum D], coords int64 [N, 2]): each finest-mag row concatenated with its parents' rows."""
        names = [mag_name(m) for m in mags]
        parts = [self.features(names[0])]
        for coarse in names[1:]:
            parents = self._parents(names[0], coarse)
            coarse_feats = self.features(coarse)
            if parents.size and (parents.min() < 0 or parents.max() >= len(coarse_feats)):
                raise DataError(f"{self.path}: {names[0]}/parent_{coarse} points outside {coarse}/features "
                                f"({len(coarse_feats)} rows); rerun the extraction")
            parts.append(coarse_feats[parents])
        return np.concatenate(parts, axis=1), self.coords(names[0])

    def extra(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(coords int64 [M, 2], features float32 [M, C]) of a side group, None when absent."""
        if name not in self._f:
            return None
        group = self._f[name]
        return group["coords"][()].astype(np.int64), np.asarray(group["features"][()], np.float32)


def read_grid(path: str | Path) -> TileGrid:
    """The tile grid stored in a tile or feature file."""
    with FeatureFile(path) as f:
        return f.grid()


def read_features(path: str | Path, mag: Magnification) -> np.ndarray:
    """float32 [N, D] features of one magnification; :class:`DataError` when absent."""
    mag = Magnification(mag)
    name = mag.name
    with FeatureFile(path) as f:
        if mag not in f.mags or "features" not in f._f[name]:
            raise DataError(f"{path}: no features at {name}: extract them with `zoomfeat extract --mags {name}`")
        return f.features(name)


def write_feature_file(folder: str | Path, slide_id: str, features: Mapping[Magnification, np.ndarray],
                       coords: Mapping[Magnification, np.ndarray] | None = None, *, base_magnification: float = 20.0,
                       extractor: str = "toy", extractor_config: dict | None = None,
                       slide_path: str | Path | None = None) -> Path:
    """Write a complete feature file from arrays (synthetic cohorts, tests, imports of other tools' features).

    ``features`` maps magnification -> float32 [N_m, D]; ``coords`` (level-0 corners per magnification,
    default: the finest tiles in one row and their containing coarser tiles) must put every tile inside one
    tile of each coarser magnification: the parents are found from the geometry.
    """
    feats = MagDict({m: np.asarray(v, np.float32) for m, v in features.items()})
    names = sorted(feats, reverse=True)
    if coords is None:
        coords = _row_layout(names, {n: len(feats[n]) for n in names}, base_magnification)
    grid = grid_from_coords(coords, base_magnification)
    dims = {feats[n].shape[1] for n in names}
    if len(dims) != 1:
        raise DataError(f"{slide_id}: feature widths differ between magnifications {sorted(dims)}")
    info = SlideInfo(path=Path(slide_path or f"{slide_id}.svs"), slide_id=slide_id, width=0, height=0,
                     level_count=1, level_dimensions=(), level_downsamples=(1.0,),
                     base_magnification=float(base_magnification), base_mpp=10.0 / base_magnification,
                     magnification_source="given", mpp_source="given", vendor=None)
    with TileStoreWriter(h5_path(folder, slide_id), info, grid, extractor=extractor,
                         extractor_config=extractor_config or {"dim": dims.pop()},
                         feature_dim=feats[names[0]].shape[1]) as writer:
        for n in names:
            if len(feats[n]) != len(grid.coords[n]):
                raise DataError(f"{slide_id}: {len(feats[n])} {n} feature rows for {len(grid.coords[n])} tiles")
            writer.write_features(n, 0, feats[n])
        return writer.commit()


def _row_layout(names: list[Magnification], counts: dict[Magnification, int], base_mag: float) -> MagDict:
    """Default geometry: coarsest tiles side by side in one row; finest tile i inside coarsest tile
    ``i % n_coarsest`` (row-major within it); in-between magnifications the tiles that contain them."""
    size = {n: n.level0_size(base_mag) for n in names}
    fine, coarse = names[0], names[-1]
    n_fine, n_coarse = counts[fine], max(counts[coarse], 1)
    per_side = size[coarse] // size[fine]
    i = np.arange(n_fine)
    cell, k = i % n_coarse, i // n_coarse
    if n_fine and k.max() >= per_side * per_side:
        raise DataError(f"{n_fine} {fine} tiles do not fit in {n_coarse} {coarse} tiles: pass coords")
    out = MagDict({fine: np.stack([cell * size[coarse] + (k % per_side) * size[fine], (k // per_side) * size[fine]],
                                   1).astype(np.int64)})
    for n in names[1:]:
        cells = np.unique(out[fine] // size[n], axis=0) if n_fine else np.zeros((0, 2), np.int64)
        if n == coarse:
            cells = np.stack([np.arange(counts[n]), np.zeros(counts[n], np.int64)], 1)
        if len(cells) != counts[n]:
            raise DataError(f"the default layout gives {len(cells)} {n} tiles, not {counts[n]}: pass coords")
        out[n] = (cells * size[n]).astype(np.int64)
    return out


def verify_file(path: str | Path) -> list[str]:
    """Problems with one file (empty when fine): unreadable, incomplete, inconsistent, NaN/inf, bad parents,
    a magnification group or a features dataset missing."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return _verify_open(f)
    except OSError as exc:
        return [f"unreadable: {one_line(exc)}"]


def feature_width(path: str | Path) -> int | None:
    """Feature width D of a readable feature file (None for a tile file or an unreadable one)."""
    try:
        with FeatureFile(path) as f:
            widths = {f.shape(m)[1] for m in f.mags if "features" in f._f[m.name]}
    except DataError:
        return None
    return widths.pop() if len(widths) == 1 else None


def _verify_open(f) -> list[str]:
    attrs = {k: _decode(v) for k, v in f.attrs.items()}
    problems = [f"missing root attribute {a!r}" for a in REQUIRED_ATTRS if a not in attrs]
    if not attrs.get("complete"):
        problems.append("incomplete (no complete=True attribute): rerun the command to redo it")
    if attrs.get("format") != FORMAT or attrs.get("format_version") != FORMAT_VERSION:
        problems.append(f"format {attrs.get('format')!r} version {attrs.get('format_version')!r}, "
                        f"expected {FORMAT!r} version {FORMAT_VERSION}")
    names = _group_names(f)
    problems += _verify_listed_mags(attrs, names)
    base_mag = attrs.get("base_magnification")
    feature_dims = set()
    for i, name in enumerate(names):
        problems += _verify_group(f, name, names[i + 1 :], base_mag, feature_dims)
        if "extractor" in attrs and "features" not in f[name]:
            problems.append(f"{name}: no features dataset in a feature file (extractor {attrs['extractor']!r})")
    if len(feature_dims) > 1:
        problems.append(f"feature dimensions differ between magnifications: {sorted(feature_dims)}")
    if "extractor" in attrs and not feature_dims:
        problems.append("feature file (has 'extractor') without any features dataset")
    return problems


def _verify_listed_mags(attrs: dict, names: list[str]) -> list[str]:
    """The ``mags`` root attribute lists the groups written: each must be there."""
    try:
        listed = json.loads(attrs.get("mags", "[]"))
    except ValueError:
        return ["root attribute 'mags' is not a JSON list"]
    missing = [m for m in listed if m not in names]
    return [f"magnification group {m} missing (the file lists {', '.join(listed)})" for m in missing]


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
    _verify_widths(report)
    for tmp in sorted(folder.glob(".*.h5.tmp*")):
        report[tmp] = ["temporary file of an interrupted run: rerun the command (it redoes that slide)"]
    return report


def _verify_widths(report: dict[Path, list[str]]) -> None:
    """Every feature file of a folder has one width: the files off the most common width get a problem."""
    widths = {p: w for p in report if (w := feature_width(p)) is not None}
    if len(set(widths.values())) <= 1:
        return
    counts: dict[int, int] = {}
    for w in widths.values():
        counts[w] = counts.get(w, 0) + 1
    common = max(sorted(counts), key=lambda w: counts[w])
    example = next(p for p, w in widths.items() if w == common)
    for path, width in widths.items():
        if width != common:
            report[path].append(f"feature width {width} differs from the folder's {common} (e.g. {example.name}): "
                                "a folder holds one feature set; extract it again with the same settings")


def slide_tile_grid(slide, mags: Sequence[Magnification], tissue: TissueParams = TissueParams(), tiles_dir=None, *,
                    drop_larger_than_slide: bool = False) -> TileGrid:
    """A slide's tile grid, the one way ``tile``, ``extract`` and ``prepare-train`` get it.

    With ``tiles_dir`` (the ``--out`` of ``zoomfeat tile``) the stored grid of this slide is read and cut to
    ``mags`` (SlideError when the slide has no complete, same-file tile store there); otherwise it is made
    with :func:`make_grid` and ``tissue``. ``drop_larger_than_slide`` leaves out (as empty) the magnifications
    whose tile is larger than the slide itself (prepare-train trains on whole patches only).
    """
    mags = sorted({parse_mag(m) for m in mags}, reverse=True)
    if tiles_dir is not None:
        path = h5_path(tiles_dir, slide.info.slide_id)
        if not is_complete(path, slide.info.path):
            raise SlideError(f"no complete tile store {path} of {slide.info.path}: run `zoomfeat tile` for this "
                             "slide or drop --tiles")
        grid = restrict_grid(read_grid(path), mags, path)
    else:
        info = slide.info
        fits = [m for m in mags if not drop_larger_than_slide
                or m.level0_size(info.base_magnification) <= min(info.width, info.height)]
        grid = make_grid(slide, fits, tissue) if fits else None
    if grid is None or len(grid.mags) < len(mags):
        return _with_empty(grid, mags)
    return grid


def _with_empty(grid: TileGrid | None, mags: Sequence[Magnification]) -> TileGrid:
    """``grid`` plus empty entries for the magnifications of ``mags`` it lacks (coarser ones than it has)."""
    coords = MagDict({m: np.zeros((0, 2), np.int64) for m in mags})
    parents = MagDict({m: MagDict({c: np.zeros(0, np.int64) for c in mags[i + 1 :]}) for i, m in enumerate(mags)})
    sizes = MagDict({m: 0 for m in mags})
    if grid is not None:
        for m in grid.mags:
            coords[m], sizes[m] = grid.coords[m], grid.patch_size_level0[m]
            parents[m].update(grid.parents[m])
    return TileGrid(mags=tuple(mags), coords=coords, parents=parents, patch_size_level0=sizes)
