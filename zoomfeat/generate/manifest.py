"""The manifest of a generation run: enough provenance to regenerate every image exactly.

``<out>/manifest.json`` (format ``zoomfeat-generation``, version 1) records the command, the model (config and
checkpoint paths with their sha256, EMA weights), the conditions (their source record -- slide, magnification,
level-0 coordinates, conditioner -- and ``conditions.npz``, the raw grids themselves, with its sha256), the
sampler settings, the runtime (device, precision, batch size) and every image with its seed and sha256.
``conditions.npz`` holds ``grids`` float32 [P, C, g, g], ``coords_level0`` int64 [P, 2] and ``mag`` (the
canonical name), so regenerating needs neither the slide nor the conditioner.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from zoomfeat.errors import DataError
from zoomfeat.store import atomic_write, write_text

FORMAT = "zoomfeat-generation"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CONDITIONS_NAME = "conditions.npz"


def save_conditions(out_dir: Path, grids: np.ndarray, coords_level0, mag: str) -> Path:
    """Write ``<out_dir>/conditions.npz`` (atomic)."""
    path = Path(out_dir) / CONDITIONS_NAME
    coords = np.zeros((len(grids), 2), np.int64) if coords_level0 is None else np.asarray(coords_level0, np.int64)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, grids=np.asarray(grids, np.float32), coords_level0=coords, mag=np.array(str(mag)))
    return path


def load_conditions(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(grids, coords_level0, mag name) of a ``conditions.npz``; DataError naming the file when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["grids"].astype(np.float32), data["coords_level0"].astype(np.int64), str(data["mag"])
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: not a readable conditions file ({exc}); regenerate it with the original command") \
            from exc


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """Write ``<out_dir>/manifest.json`` (atomic) with the format header first."""
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    return write_text(Path(out_dir) / MANIFEST_NAME, json.dumps(data, indent=2) + "\n")


def read_manifest(path: str | Path) -> dict:
    """The manifest at ``path`` (a file or its folder); DataError naming the file and the fix when invalid."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable generation manifest ({exc}); give the manifest.json a "
                        "`zoomfeat sample` or `zoomfeat generate-large` run wrote") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"{path}: not a zoomfeat generation manifest (format {data.get('format')!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: manifest version {data.get('format_version')} is not {FORMAT_VERSION}: "
                        "regenerate it with this zoomfeat version")
    data["_folder"] = str(path.parent)
    return data
