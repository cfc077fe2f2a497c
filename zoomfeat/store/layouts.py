"""Other tools' per-slide feature layouts, read and written (the store owns those files too).

zoomfeat's own HDF5 files are handled by :mod:`zoomfeat.store`; this module reads and writes the layouts that
CLAM, TRIDENT, STAMP, slide2vec and eva leave behind, so any feature set can be evaluated with the papers'
protocols without re-extraction. Each layout maps its coordinates to level-0 pixels where the file allows:

=========  ==========================================  ===============================================
layout     files                                       coordinates
=========  ==========================================  ===============================================
clam       ``h5_files/<id>.h5`` (root ``features``,     level-0 px top-left; patch size from ``coords``
           ``coords``) and/or ``pt_files/<id>.pt``      attrs (``patch_size`` x ``downsample``) or the
                                                        lattice spacing; ``pt_files`` alone: none
trident    ``features_<encoder>/<id>.h5`` (root         level-0 px; ``coords`` attrs ``patch_size_level0``,
           ``features``, ``coords``)                    ``level0_magnification``, ``target_magnification``
stamp      ``<id>.h5`` (``feats``, ``coords``)           micrometres (attrs ``unit``, ``tile_size_um``):
                                                        divided by the slide's mpp when one is given
slide2vec  ``tile_embeddings/<id>.pt|.npz`` (+           ``coordinates/<id>.npy`` (fields ``x``, ``y``,
           ``<id>.meta.json``)                          level-0 px) when present, else none
eva        ``manifest.csv`` (``embeddings`` column) +   none (eva keeps no tile coordinates)
           one ``.pt`` tensor per slide
=========  ==========================================  ===============================================

The facts about each layout come from those projects' documentation and output files; the code is ours.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoomfeat.errors import ConfigError, DataError, one_line
from zoomfeat.store import FeatureFile, atomic_write

MPP_20X = 0.5  # um/px of a 20x scan, the convention behind "10 / mpp" magnifications


@dataclass(frozen=True)
class ForeignFeatures:
    """One slide's features from another tool, with what its file says about geometry.

    ``coords_level0`` int64 [N, 2] top-left (x, y) in level-0 px, or None when the layout has none (or
    micrometre coordinates without an mpp); ``coords_note`` says how they were obtained, for messages.
    """

    slide_id: str
    features: np.ndarray
    coords_level0: np.ndarray | None
    patch_size_level0: int | None
    magnification: float | None
    layout: str
    source: Path
    coords_note: str


@dataclass(frozen=True)
class Layout:
    """A registered layout: how to find its per-slide files in a folder, read one, and write one."""

    name: str
    description: str
    files: Callable[[Path], dict[str, Path]]
    read: Callable[..., ForeignFeatures]
    write: Callable[..., list[Path]] | None


LAYOUTS: dict[str, Layout] = {}


def register_layout(name: str, description: str, files, read, write=None) -> Layout:
    layout = Layout(name, description, files, read, write)
    LAYOUTS[name] = layout
    return layout


def layout_names() -> list[str]:
    return sorted(LAYOUTS)


# ----------------------------------------------------------------------------------------------------------
# helpers


def _h5():
    import h5py

    return h5py


def _decode(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.size <= 4:
        return value.tolist()
    return value


def _features(array, where: Path) -> np.ndarray:
    feats = np.asarray(array, dtype=np.float32)
    if feats.ndim == 3 and feats.shape[0] == 1:  # [1, N, D] as some tools save a batch of one
        feats = feats[0]
    if feats.ndim != 2:
        raise DataError(f"{where}: features have shape {feats.shape}, expected [N, D]")
    return feats


def _coords(array, n: int, where: Path) -> np.ndarray:
    coords = np.asarray(array)
    if coords.ndim != 2 or coords.shape[1] < 2 or len(coords) != n:
        raise DataError(f"{where}: coords have shape {coords.shape}, expected [{n}, 2] for {n} feature rows")
    return coords[:, :2]


def lattice_spacing(coords: np.ndarray) -> int | None:
    """The tile pitch of a regular grid of top-left corners (gcd of the coordinate steps), None if unknown."""
    steps = []
    for axis in (0, 1):
        values = np.unique(np.asarray(coords[:, axis], dtype=np.int64))
        if len(values) > 1:
            steps.append(int(np.gcd.reduce(np.diff(values))))
    steps = [s for s in steps if s > 0]
    return int(np.gcd.reduce(steps)) if steps else None


def _torch_load(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a foreign file
        raise DataError(f"{path}: not a readable torch tensor file ({type(exc).__name__}); re-export it") from exc


def _tensor_to_numpy(value, where: Path) -> np.ndarray:
    if isinstance(value, dict):
        for key in ("features", "feats", "embeddings"):
            if key in value:
                value = value[key]
                break
        else:
            raise DataError(f"{where}: a dict without features/feats/embeddings (keys: {', '.join(map(str, value))})")
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return _features(value, where)


def _save_torch(path: Path, features: np.ndarray) -> None:
    import torch

    with atomic_write(path) as tmp:
        torch.save(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)), tmp)


def _write_h5(path: Path, datasets: dict[str, np.ndarray], attrs: dict[str, dict]) -> None:
    with atomic_write(path) as tmp:
        with _h5().File(tmp, "w") as fh:
            for name, data in datasets.items():
                dset = fh.create_dataset(name, data=data)
                for key, value in attrs.get(name, {}).items():
                    dset.attrs[key] = value
            for key, value in attrs.get("/", {}).items():
                fh.attrs[key] = value


def _glob_ids(folder: Path, pattern: str) -> dict[str, Path]:
    return {p.name.split(".")[0] if p.suffix == ".npz" or p.suffix == ".pt" else p.stem: p
            for p in sorted(folder.glob(pattern)) if not p.name.startswith(".")}


def _read_h5_checked(path: Path):
    try:
        return _h5().File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: unreadable HDF5 file ({one_line(exc, 80)}); re-export it") from exc


# ----------------------------------------------------------------------------------------------------------
# CLAM


def _clam_files(folder: Path) -> dict[str, Path]:
    h5_dir = folder / "h5_files" if (folder / "h5_files").is_dir() else folder
    files = {p.stem: p for p in sorted(h5_dir.glob("*.h5")) if not p.name.startswith(".")}
    pt_dir = folder / "pt_files"
    for p in sorted(pt_dir.glob("*.pt")) if pt_dir.is_dir() else []:
        files.setdefault(p.stem, p)
    return files


def _read_clam(path: Path, mpp: float | None = None) -> ForeignFeatures:
    if path.suffix == ".pt":
        feats = _tensor_to_numpy(_torch_load(path), path)
        return ForeignFeatures(path.stem, feats, None, None, None, "clam", path,
                               "CLAM pt_files carry no coordinates")
    with _read_h5_checked(path) as fh:
        if "features" not in fh or "coords" not in fh:
            raise DataError(f"{path}: a CLAM file needs root datasets 'features' and 'coords' "
                            f"(found {', '.join(fh.keys()) or 'none'})")
        feats = _features(fh["features"][()], path)
        coords = _coords(fh["coords"][()], len(feats), path).astype(np.int64)
        cattrs = {k: _decode(v) for k, v in fh["coords"].attrs.items()}
    size, note = None, "CLAM coords (level-0 px)"
    if "patch_size_level0" in cattrs:
        size = int(cattrs["patch_size_level0"])
    elif "patch_size" in cattrs and "downsample" in cattrs:
        downsample = cattrs["downsample"]
        factor = float(downsample[0] if isinstance(downsample, (list, tuple)) else downsample)
        size = int(round(float(cattrs["patch_size"]) * factor))
    else:
        size = lattice_spacing(coords)
        note += "; patch size from the lattice spacing" if size else "; patch size unknown"
    return ForeignFeatures(path.stem, feats, coords, size, None, "clam", path, note)


def _write_clam(folder: Path, slide_id: str, features: np.ndarray, coords_level0: np.ndarray, *,
                patch_size_level0: int, magnification: float, base_magnification: float, **_) -> list[Path]:
    h5 = folder / "h5_files" / f"{slide_id}.h5"
    pt = folder / "pt_files" / f"{slide_id}.pt"
    level_down = float(base_magnification) / float(magnification)
    _write_h5(h5, {"features": features.astype(np.float32), "coords": coords_level0.astype(np.int64)},
              {"coords": {"patch_size": int(round(patch_size_level0 / level_down)),
                          "downsample": np.array([level_down, level_down]), "patch_level": 0, "name": slide_id,
                          # beyond CLAM's own attributes: the geometry, so readers need not infer it
                          "patch_size_level0": int(patch_size_level0),
                          "level0_magnification": float(base_magnification),
                          "target_magnification": float(magnification)}})
    _save_torch(pt, features)
    return [h5, pt]


register_layout("clam", "CLAM: h5_files/<id>.h5 (features, coords) + pt_files/<id>.pt", _clam_files, _read_clam,
                _write_clam)


# ----------------------------------------------------------------------------------------------------------
# TRIDENT


def _trident_dir(folder: Path) -> Path:
    if folder.name.startswith("features_"):
        return folder
    found = sorted(p for p in folder.glob("features_*") if p.is_dir())
    if len(found) == 1:
        return found[0]
    if not found:
        return folder
    names = ", ".join(p.name for p in found)
    raise ConfigError(f"{folder} holds several TRIDENT feature folders ({names}): name one, e.g. "
                      f"trident:{found[0]}@20x")


def _trident_files(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(_trident_dir(folder).glob("*.h5")) if not p.name.startswith(".")}


def _read_trident(path: Path, mpp: float | None = None) -> ForeignFeatures:
    with _read_h5_checked(path) as fh:
        if "features" not in fh or "coords" not in fh:
            raise DataError(f"{path}: a TRIDENT file needs root datasets 'features' and 'coords'")
        feats = _features(fh["features"][()], path)
        coords = _coords(fh["coords"][()], len(feats), path).astype(np.int64)
        cattrs = {k: _decode(v) for k, v in fh["coords"].attrs.items()}
    size = cattrs.get("patch_size_level0")
    size = int(size) if size is not None else lattice_spacing(coords)
    mag = cattrs.get("target_magnification")
    return ForeignFeatures(path.stem, feats, coords, size, float(mag) if mag is not None else None, "trident", path,
                           "TRIDENT coords (level-0 px)")


def _write_trident(folder: Path, slide_id: str, features: np.ndarray, coords_level0: np.ndarray, *,
                   patch_size_level0: int, magnification: float, base_magnification: float,
                   encoder: str = "zoomfeat", **_) -> list[Path]:
    out = (folder if folder.name.startswith("features_") else folder / f"features_{encoder}") / f"{slide_id}.h5"
    _write_h5(out, {"features": features.astype(np.float32), "coords": coords_level0.astype(np.int64)},
              {"coords": {"patch_size": int(round(patch_size_level0 * magnification / base_magnification)),
                          "patch_size_level0": int(patch_size_level0),
                          "level0_magnification": float(base_magnification),
                          "target_magnification": float(magnification), "overlap": 0, "name": slide_id}})
    return [out]


register_layout("trident", "TRIDENT: features_<encoder>/<id>.h5 (features, coords + attrs)", _trident_files,
                _read_trident, _write_trident)


# ----------------------------------------------------------------------------------------------------------
# STAMP


def _stamp_files(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.glob("*.h5")) if not p.name.startswith(".")}


def _read_stamp(path: Path, mpp: float | None = None) -> ForeignFeatures:
    with _read_h5_checked(path) as fh:
        if "feats" not in fh:
            raise DataError(f"{path}: a STAMP file needs a 'feats' dataset (found {', '.join(fh.keys()) or 'none'})")
        feats = _features(fh["feats"][()], path)
        raw = np.asarray(fh["coords"][()], dtype=np.float64) if "coords" in fh else None
        attrs = {k: _decode(v) for k, v in fh.attrs.items()}
        if "coords" in fh:
            attrs.update({k: _decode(v) for k, v in fh["coords"].attrs.items()})
    tile_um, tile_px = attrs.get("tile_size_um"), attrs.get("tile_size_px")
    magnification = None
    if tile_um and tile_px:
        magnification = round(MPP_20X * 20.0 / (float(tile_um) / float(tile_px)), 6)  # 0.5 um/px = 20x
    if raw is None:
        return ForeignFeatures(path.stem, feats, None, None, magnification, "stamp", path, "no coords in the file")
    raw = _coords(raw, len(feats), path)
    unit = str(attrs.get("unit", "um")).lower()
    if unit in ("px", "pixel", "pixels", "level0"):
        coords = np.rint(raw).astype(np.int64)
        size = lattice_spacing(coords)
        return ForeignFeatures(path.stem, feats, coords, size, magnification, "stamp", path, "STAMP coords (px)")
    if mpp is None:
        return ForeignFeatures(path.stem, feats, None, None, magnification, "stamp", path,
                               "STAMP coords are in micrometres and no slide mpp is known: pair it with a zoomfeat "
                               "feature folder of the same slides or pass the slides' mpp")
    coords = np.rint(raw / float(mpp)).astype(np.int64)
    size = int(round(float(tile_um) / float(mpp))) if tile_um else lattice_spacing(coords)
    return ForeignFeatures(path.stem, feats, coords, size, magnification, "stamp", path,
                           f"STAMP coords (um / {mpp:g} um/px)")


def _write_stamp(folder: Path, slide_id: str, features: np.ndarray, coords_level0: np.ndarray, *,
                 patch_size_level0: int, magnification: float, base_magnification: float, mpp: float | None = None,
                 encoder: str = "zoomfeat", **_) -> list[Path]:
    if mpp is None or not np.isfinite(mpp):
        raise DataError(f"{slide_id}: STAMP stores coordinates in micrometres and this slide has no mpp: "
                        "extract with --mpp")
    out = folder / f"{slide_id}.h5"
    _write_h5(out, {"feats": features.astype(np.float32),
                    "coords": (coords_level0.astype(np.float64) * float(mpp)).astype(np.float32)},
              {"/": {"extractor": encoder, "unit": "um", "tile_size_um": float(patch_size_level0 * mpp),
                     "tile_size_px": int(round(patch_size_level0 * magnification / base_magnification))}})
    return [out]


register_layout("stamp", "STAMP: <id>.h5 (feats, coords in micrometres)", _stamp_files, _read_stamp, _write_stamp)


# ----------------------------------------------------------------------------------------------------------
# slide2vec


def _slide2vec_files(folder: Path) -> dict[str, Path]:
    base = folder / "tile_embeddings" if (folder / "tile_embeddings").is_dir() else folder
    files = {}
    for p in sorted(base.iterdir()) if base.is_dir() else []:
        if p.suffix in (".pt", ".npz") and not p.name.startswith("."):
            files[p.name[: -len(p.suffix)]] = p
    return files


def _read_slide2vec(path: Path, mpp: float | None = None) -> ForeignFeatures:
    sample_id = path.name[: -len(path.suffix)]
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as payload:
            if "features" not in payload:
                raise DataError(f"{path}: a slide2vec .npz needs a 'features' array")
            feats = _features(payload["features"], path)
    else:
        feats = _tensor_to_numpy(_torch_load(path), path)
    root = path.parent.parent if path.parent.name == "tile_embeddings" else path.parent
    coords_file = root / "coordinates" / f"{sample_id}.npy"
    if not coords_file.is_file():
        return ForeignFeatures(sample_id, feats, None, None, None, "slide2vec", path,
                               f"no coordinates file {coords_file}")
    table = np.load(coords_file, allow_pickle=False)
    if table.dtype.names and {"x", "y"} <= set(table.dtype.names):
        coords = np.stack([table["x"], table["y"]], axis=1).astype(np.int64)
        size = int(table["tile_size_lv0"][0]) if "tile_size_lv0" in table.dtype.names and len(table) else None
    else:
        coords = _coords(table, len(feats), coords_file).astype(np.int64)
        size = None
    coords = _coords(coords, len(feats), coords_file)
    return ForeignFeatures(sample_id, feats, coords, size or lattice_spacing(coords), None, "slide2vec", path,
                           "slide2vec coordinates (level-0 px)")


def _write_slide2vec(folder: Path, slide_id: str, features: np.ndarray, coords_level0: np.ndarray, *,
                     patch_size_level0: int, magnification: float, encoder: str = "zoomfeat", **_) -> list[Path]:
    pt = folder / "tile_embeddings" / f"{slide_id}.pt"
    meta = folder / "tile_embeddings" / f"{slide_id}.meta.json"
    coords_file = folder / "coordinates" / f"{slide_id}.npy"
    _save_torch(pt, features)
    table = np.zeros(len(coords_level0), dtype=[("x", "<i8"), ("y", "<i8"), ("tile_size_lv0", "<i8")])
    table["x"], table["y"], table["tile_size_lv0"] = coords_level0[:, 0], coords_level0[:, 1], patch_size_level0
    with atomic_write(coords_file) as tmp, open(tmp, "wb") as fh:
        np.save(fh, table)
    with atomic_write(meta) as tmp:
        tmp.write_text(json.dumps({"sample_id": slide_id, "artifact_type": "tile_embeddings", "format": "pt",
                                   "feature_dim": int(features.shape[1]), "num_tiles": int(len(features)),
                                   "encoder": encoder, "target_magnification": float(magnification)}, indent=2))
    return [pt, meta, coords_file]


register_layout("slide2vec", "slide2vec: tile_embeddings/<id>.pt|.npz (+ coordinates/<id>.npy)", _slide2vec_files,
                _read_slide2vec, _write_slide2vec)


# ----------------------------------------------------------------------------------------------------------
# eva


def _eva_files(folder: Path) -> dict[str, Path]:
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        return {}
    files = {}
    with open(manifest, newline="") as fh:
        for row_number, row in enumerate(csv.DictReader(fh), start=2):
            if "embeddings" not in row:
                raise DataError(f"{manifest}: no 'embeddings' column; an eva manifest has origin,embeddings,...")
            embedding = folder / row["embeddings"]
            slide_id = Path(row.get("origin") or row["embeddings"]).name.split(".")[0]
            if slide_id in files and files[slide_id] != embedding:
                raise DataError(f"{manifest} row {row_number}: slide {slide_id} listed twice")
            files[slide_id] = embedding
    return files


def _read_eva(path: Path, mpp: float | None = None) -> ForeignFeatures:
    if not path.is_file():
        raise DataError(f"{path}: listed in the eva manifest but missing")
    value = _torch_load(path)
    if isinstance(value, (list, tuple)):
        import torch

        value = torch.cat([v.reshape(-1, v.shape[-1]) for v in value])
    return ForeignFeatures(path.name.split(".")[0], _tensor_to_numpy(value, path), None, None, None, "eva", path,
                           "eva embeddings carry no tile coordinates")


def _write_eva(folder: Path, slide_id: str, features: np.ndarray, coords_level0: np.ndarray, **_) -> list[Path]:
    pt = folder / "embeddings" / f"{slide_id}.pt"
    _save_torch(pt, features)
    manifest = folder / "manifest.csv"
    rows = []
    if manifest.is_file():
        with open(manifest, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if Path(r["origin"]).name.split(".")[0] != slide_id]
    rows.append({"origin": slide_id, "embeddings": f"embeddings/{slide_id}.pt", "target": "", "split": ""})
    with atomic_write(manifest) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["origin", "embeddings", "target", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return [pt, manifest]


register_layout("eva", "eva: manifest.csv + one embeddings .pt per slide (no coordinates)", _eva_files, _read_eva,
                _write_eva)


# ----------------------------------------------------------------------------------------------------------
# detection and containment


def _first_h5_keys(folder: Path) -> set[str] | None:
    for path in sorted(folder.glob("*.h5")):
        if path.name.startswith("."):
            continue
        try:
            with _h5().File(path, "r") as fh:
                keys = set(fh.keys())
                if fh.attrs.get("format") in ("zoomfeat", b"zoomfeat"):
                    keys.add("__zoomfeat__")
                return keys
        except OSError:
            continue
    return None


def detect_layout(folder: str | Path) -> str:
    """The layout of a feature folder: ``zoomfeat`` or one of :data:`LAYOUTS`; ConfigError when unknown."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"feature folder {folder} not found: check the feature set DIR@MAG")
    if (folder / "manifest.csv").is_file():
        return "eva"
    if (folder / "tile_embeddings").is_dir():
        return "slide2vec"
    if (folder / "h5_files").is_dir() or (folder / "pt_files").is_dir():
        return "clam"
    if folder.name.startswith("features_") or any(p.is_dir() for p in folder.glob("features_*")):
        return "trident"
    keys = _first_h5_keys(folder)
    if keys is not None:
        if "__zoomfeat__" in keys:
            return "zoomfeat"
        if "feats" in keys:
            return "stamp"
        if {"features", "coords"} <= keys:
            return "clam"
    raise ConfigError(f"{folder}: not a known feature layout (zoomfeat, {', '.join(layout_names())}); name it "
                      f"explicitly, e.g. trident:{folder}@20x")


def read_foreign(layout: str, folder: str | Path, slide_id: str, mpp: float | None = None) -> ForeignFeatures:
    """One slide's features from a folder in ``layout``; DataError when the slide has no file there."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown feature layout {layout!r}: use one of zoomfeat, {', '.join(layout_names())}")
    files = LAYOUTS[layout].files(Path(folder))
    if slide_id not in files:
        raise DataError(f"{folder}: no {layout} feature file for slide {slide_id}")
    return LAYOUTS[layout].read(files[slide_id], mpp=mpp)


def containment_parents(fine_coords: np.ndarray, coarse_coords: np.ndarray, coarse_size: int,
                        where: str = "") -> np.ndarray:
    """Row into ``coarse_coords`` of the coarse tile (side ``coarse_size`` level-0 px) containing each fine
    tile's top-left corner; DataError naming the count when some fine tile lies in no coarse tile."""
    fine = np.asarray(fine_coords, dtype=np.int64).reshape(-1, 2)
    coarse = np.asarray(coarse_coords, dtype=np.int64).reshape(-1, 2)
    if coarse_size <= 0:
        raise DataError(f"{where}: the coarse tiles have no known size; cannot link instances by containment")
    lookup = {(int(x), int(y)): i for i, (x, y) in enumerate(coarse)}
    if len(lookup) != len(coarse):
        raise DataError(f"{where}: duplicate coarse tile coordinates; the coarse feature file is inconsistent")
    origin = coarse.min(axis=0) % coarse_size if len(coarse) else np.zeros(2, np.int64)
    keys = (fine - origin) // coarse_size * coarse_size + origin
    rows = np.array([lookup.get((int(x), int(y)), -1) for x, y in keys], dtype=np.int64)
    outside = int((rows < 0).sum())
    if outside:
        raise DataError(f"{where}: {outside} of {len(fine)} fine tiles lie in no coarse tile (the two feature sets "
                        f"were tiled on different grids or tissue masks); use one tiling for both")
    return rows


# ----------------------------------------------------------------------------------------------------------
# feature-set specs over any layout (the reader behind mil.bags for non-zoomfeat and cross-folder sets)


def _listing_key(folder: Path) -> tuple:
    """Changes whenever a file is added to or removed from ``folder`` or one of its sub-folders."""
    stamps = []
    for path in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())] if folder.is_dir() else []:
        try:
            stamps.append((str(path), path.stat().st_mtime_ns))
        except OSError:
            continue
    return tuple(stamps)


_FILES_CACHE: dict[tuple, dict[str, Path]] = {}


def layout_files(layout: str, folder: str | Path) -> dict[str, Path]:
    """``slide_id -> file`` of a folder in ``layout`` (listing cached until the folder changes)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown feature layout {layout!r}: use one of zoomfeat, {', '.join(layout_names())}")
    folder = Path(folder)
    key = (layout, str(folder.resolve()), _listing_key(folder))
    if key not in _FILES_CACHE:
        if len(_FILES_CACHE) > 256:
            _FILES_CACHE.clear()
        _FILES_CACHE[key] = LAYOUTS[layout].files(folder)
    return _FILES_CACHE[key]


@dataclass(frozen=True)
class _Part:
    features: np.ndarray
    coords: np.ndarray | None
    size: int | None
    mpp: float | None
    note: str
    source: str


def _read_native(directory: Path, mag, slide_id: str) -> _Part:
    path = directory / f"{slide_id}.h5"
    if not path.is_file():
        raise DataError(f"{path}: feature file not found; extract slide {slide_id} or drop it from the split")
    with FeatureFile(path) as f:
        f.require_complete()
        feats, coords = f.features(mag), f.coords(mag)
        size = int(f.grid().patch_size_level0[mag.name])
        mpp = f.attrs.get("base_mpp")
    mpp = float(mpp) if mpp is not None and np.isfinite(float(mpp)) else None
    return _Part(feats, coords, size, mpp, "zoomfeat coords (level-0 px)", str(path))


def _parts(spec, slide_id: str) -> list[_Part]:
    parts: list[_Part | None] = [None] * len(spec.sources)
    foreign = []
    for i, source in enumerate(spec.sources):
        layout = source.layout or detect_layout(source.directory)
        if layout == "zoomfeat":
            parts[i] = _read_native(source.directory, source.mag, slide_id)
        else:
            foreign.append((i, layout, source))
    mpp = next((p.mpp for p in parts if p is not None and p.mpp is not None), None)
    for i, layout, source in foreign:
        got = read_foreign(layout, source.directory, slide_id, mpp=mpp)
        parts[i] = _Part(got.features, got.coords_level0, got.patch_size_level0, None, got.coords_note,
                         str(got.source))
    return parts  # type: ignore[return-value]


def read_spec_bag(spec, slide_id: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(features float32 [N, sum D], coords int64 [N, 2] or None) of one slide for any feature-set spec.

    The finest source gives the instances; each coarser source contributes the row of the tile that contains
    each instance (by level-0 coordinates). A DataError names the source when the link cannot be made.
    """
    parts = _parts(spec, slide_id)
    fine = parts[0]
    columns = [fine.features]
    for part, source in zip(parts[1:], spec.sources[1:]):
        if fine.coords is None or part.coords is None:
            missing = fine if fine.coords is None else part
            raise DataError(f"{missing.source}: cannot fuse {spec} by containment: {missing.note}")
        rows = containment_parents(fine.coords, part.coords, part.size or 0, where=f"{part.source} ({source.mag})")
        columns.append(part.features[rows])
    feats = np.concatenate(columns, axis=1).astype(np.float32, copy=False)
    return feats, (None if fine.coords is None else np.asarray(fine.coords, np.int64))
