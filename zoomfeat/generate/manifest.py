"""The manifest of a generation run: enough provenance to regenerate every image exactly.

``<out>/manifest.json`` (format ``zoomfeat-generation``, version 1) records the command, the model (config and
checkpoint paths with their sha256, EMA weights), the conditions (their source record -- slide, magnification,
level-0 coordinates, conditioner -- and ``conditions.npz``, the raw grids themselves, with its sha256), the
sampler settings, the runtime (device, precision, batch size) and every image with its seed and sha256.
``conditions.npz`` holds ``grids`` float32 [P, C, g, g], ``coords_level0`` int64 [P, 2] and ``mag`` (the
canonical name), so regenerating needs neither the slide nor the conditioner; a source that draws contexts
instead of reading grids (e.g. a CDM) saves ``contexts`` float32 [P, 65, D] in the same file instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from zoomfeat.errors import DataError
from zoomfeat.mags import Magnification
from zoomfeat.store import atomic_write, write_text

FORMAT = "zoomfeat-generation"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CONDITIONS_NAME = "conditions.npz"


def save_conditions(out_dir: Path, mag: Magnification, grids: np.ndarray | None = None, coords_level0=None,
                    contexts: np.ndarray | None = None) -> Path:
    """Write ``<out_dir>/conditions.npz`` (atomic): the raw grids (and coordinates), or drawn contexts."""
    path = Path(out_dir) / CONDITIONS_NAME
    arrays = {"mag": np.array(Magnification(mag).name)}
    if grids is not None:
        arrays["grids"] = np.asarray(grids, np.float32)
        arrays["coords_level0"] = (np.zeros((len(grids), 2), np.int64) if coords_level0 is None
                                   else np.asarray(coords_level0, np.int64))
    if contexts is not None:
        arrays["contexts"] = np.asarray(contexts, np.float32)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return path


def load_conditions(path: Path) -> dict[str, np.ndarray | str]:
    """``{"mag": name, "grids", "coords_level0"}`` and/or ``"contexts"`` of a ``conditions.npz``; DataError naming
    the file when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in data.files}
        out["mag"] = str(out["mag"])
        if "grids" not in out and "contexts" not in out:
            raise KeyError("grids or contexts")
        return out
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
