"""Export zoomfeat feature files to the CLAM and TRIDENT layouts, for one magnification.

* CLAM: ``OUT/h5_files/<slide_id>.h5`` (root datasets ``features`` float32 [N, D] and ``coords`` int64 [N, 2])
  and ``OUT/pt_files/<slide_id>.pt`` (the features as a torch tensor);
* TRIDENT: ``OUT/features_<encoder>/<slide_id>.h5`` (root ``features`` and ``coords``; ``coords`` carries
  ``patch_size``, ``patch_size_level0``, ``level0_magnification`` and ``target_magnification`` attrs).

``coords`` are level-0 (x, y) top-left corners, as in the source file. Every file is written to a temporary
name and renamed, so an interrupted export leaves no half file under the final name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoomfeat.errors import ConfigError
from zoomfeat.mags import PATCH_SIZE, mag_name

FORMATS = ("clam", "trident")


@dataclass(frozen=True)
class ExportConfig:
    """``src_dir``: a zoomfeat feature folder; ``fmt``: clam|trident; ``mag``: canonical name; ``encoder``:
    the TRIDENT folder suffix (default: the files' ``extractor`` attr)."""

    src_dir: Path
    fmt: str
    mag: str
    out_dir: Path
    encoder: str | None = None

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ConfigError(f"bad --format {self.fmt!r}: use one of {', '.join(FORMATS)}")
        object.__setattr__(self, "mag", mag_name(self.mag))
        if not Path(self.src_dir).is_dir():
            raise ConfigError(f"feature folder {self.src_dir} does not exist: give the --out of `zoomfeat extract`")
        if Path(self.out_dir).resolve() == Path(self.src_dir).resolve():
            raise ConfigError("export --out must differ from the feature folder")


@dataclass(frozen=True)
class ExportResult:
    written: tuple[Path, ...]
    skipped: tuple[Path, ...]  # incomplete source files


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _write_h5(path: Path, features: np.ndarray, coords: np.ndarray, coord_attrs: dict, root_attrs: dict) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features.astype(np.float32, copy=False))
        dset = f.create_dataset("coords", data=coords.astype(np.int64, copy=False))
        for key, value in coord_attrs.items():
            dset.attrs[key] = value
        for key, value in root_attrs.items():
            f.attrs[key] = value
    os.replace(tmp, path)


def _write_pt(path: Path, features: np.ndarray) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    torch.save(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)), tmp)
    os.replace(tmp, path)


def export_slide(src: Path, cfg: ExportConfig) -> list[Path]:
    """Export one feature file; returns the files written."""
    from zoomfeat.store import read_attrs, read_features, read_grid

    attrs = read_attrs(src)
    grid = read_grid(src)
    if cfg.mag not in grid.coords:
        raise ConfigError(f"{src} has no {cfg.mag} features: export one of {', '.join(grid.coords)}")
    features, coords = read_features(src, cfg.mag), grid.coords[cfg.mag]
    slide_id = str(attrs.get("slide_id", src.stem))
    base_mag = float(attrs.get("base_magnification", 0.0))
    coord_attrs = {"patch_size": PATCH_SIZE, "patch_size_level0": int(grid.patch_size_level0[cfg.mag]),
                   "level0_magnification": base_mag, "target_magnification": float(cfg.mag[:-1]),
                   "name": slide_id}
    root_attrs = {"extractor": str(attrs.get("extractor", "")), "source": str(src), "magnification": cfg.mag}
    if cfg.fmt == "clam":
        h5 = Path(cfg.out_dir) / "h5_files" / f"{slide_id}.h5"
        pt = Path(cfg.out_dir) / "pt_files" / f"{slide_id}.pt"
        _write_h5(h5, features, coords, coord_attrs, root_attrs)
        _write_pt(pt, features)
        return [h5, pt]
    encoder = cfg.encoder or str(attrs.get("extractor") or "features")
    h5 = Path(cfg.out_dir) / f"features_{encoder}" / f"{slide_id}.h5"
    _write_h5(h5, features, coords, coord_attrs, root_attrs)
    return [h5]


def export_features(cfg: ExportConfig) -> ExportResult:
    """Export every complete ``*.h5`` feature file of ``cfg.src_dir``; incomplete ones are listed as skipped."""
    from zoomfeat.store import is_complete

    sources = sorted(Path(cfg.src_dir).glob("*.h5"))
    if not sources:
        raise ConfigError(f"no .h5 feature files in {cfg.src_dir}: give the --out of `zoomfeat extract`")
    written: list[Path] = []
    skipped: list[Path] = []
    for src in sources:
        if not is_complete(src):
            skipped.append(src)
            continue
        written += export_slide(src, cfg)
    return ExportResult(tuple(written), tuple(skipped))
