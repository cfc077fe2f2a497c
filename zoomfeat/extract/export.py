"""Export zoomfeat feature files to other tools' layouts, one magnification (writers: zoomfeat.store.layouts).

* CLAM: ``OUT/h5_files/<slide_id>.h5`` (root datasets ``features`` float32 [N, D] and ``coords`` int64 [N, 2])
  and ``OUT/pt_files/<slide_id>.pt`` (the features as a torch tensor);
* TRIDENT: ``OUT/features_<encoder>/<slide_id>.h5`` (root ``features`` and ``coords``; ``coords`` carries
  ``patch_size``, ``patch_size_level0``, ``level0_magnification`` and ``target_magnification`` attrs);
* STAMP: ``OUT/<slide_id>.h5`` (``feats``, ``coords`` in micrometres: needs the slide's mpp);
* slide2vec: ``OUT/tile_embeddings/<slide_id>.pt`` + ``.meta.json`` and ``OUT/coordinates/<slide_id>.npy``;
* eva: ``OUT/embeddings/<slide_id>.pt`` listed in ``OUT/manifest.csv``.

``coords`` are level-0 (x, y) top-left corners, as in the source file. Every file is written to a temporary
name and renamed, so an interrupted export leaves no half file under the final name. A source file
that is incomplete, unreadable or holds NaN/inf rows is not exported (and makes the command exit 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoomfeat.errors import ConfigError, DataError
from zoomfeat.mags import Magnification
from zoomfeat.store import FeatureFile, check_output_folder
from zoomfeat.store.files import OutputError
from zoomfeat.store.layouts import LAYOUTS

FORMATS = ("clam", "trident", "stamp", "slide2vec", "eva")  # = zoomfeat.store.layouts.layout_names() (tested)
RECORD_NAME = "zoomfeat_export.json"  # what filled the folder (source folder, format, magnification)


@dataclass(frozen=True)
class ExportConfig:
    """``src_dir``: a zoomfeat feature folder; ``fmt``: clam|trident; ``mag``: canonical name; ``encoder``:
    the TRIDENT folder suffix (default: the files' ``extractor`` attr)."""

    src_dir: Path
    fmt: str
    mag: Magnification
    out_dir: Path
    encoder: str | None = None

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ConfigError(f"bad --format {self.fmt!r}: use one of {', '.join(FORMATS)}")
        object.__setattr__(self, "mag", Magnification(self.mag))
        if not Path(self.src_dir).is_dir():
            raise ConfigError(f"feature folder {self.src_dir} does not exist: give the --out of `zoomfeat extract`")
        if Path(self.out_dir).resolve() == Path(self.src_dir).resolve():
            raise ConfigError("export --out must differ from the feature folder")


@dataclass(frozen=True)
class ExportResult:
    written: tuple[Path, ...]
    skipped: dict[Path, str]  # source file -> why it was not exported (incomplete, unreadable, non-finite)

    @property
    def exit_code(self) -> int:
        """1 when a source file was skipped: the export is not the whole folder."""
        return 1 if self.skipped else 0


def export_slide(src: Path, cfg: ExportConfig) -> list[Path]:
    """Export one feature file; returns the files written. DataError for an incomplete file or non-finite rows
    (nothing is written for that slide then)."""
    with FeatureFile(src) as f:
        f.require_complete()
        if cfg.mag not in f.mags:
            raise DataError(f"{src} has no {cfg.mag} features: export one of {', '.join(map(str, f.mags)) or 'none'}")
        features, coords = f.features(cfg.mag), f.coords(cfg.mag)
        grid = f.grid()
        slide_id, base_mag, extractor = f.slide_id, f.base_magnification or 0.0, f.extractor or ""
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise DataError(f"{src}: {int(bad.sum())} {cfg.mag} feature rows are NaN or inf (first row "
                        f"{int(np.flatnonzero(bad)[0])}): not exported; extract the slide again")
    mpp = _mpp_of(src)
    return LAYOUTS[cfg.fmt].write(_target_folder(src, cfg), slide_id, features, coords,
                                  patch_size_level0=int(grid.patch_size_level0[cfg.mag]),
                                  magnification=float(cfg.mag), base_magnification=float(base_mag),
                                  mpp=mpp, encoder=cfg.encoder or extractor or "features")


def _mpp_of(src: Path) -> float | None:
    with FeatureFile(src) as f:
        value = f.attrs.get("base_mpp")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _target_folder(src: Path, cfg: ExportConfig) -> Path:
    """The folder one export run fills: ``OUT/features_<encoder>`` (TRIDENT) or ``OUT`` (the others)."""
    if cfg.fmt != "trident":
        return Path(cfg.out_dir)
    try:
        with FeatureFile(src) as f:
            extractor = f.extractor
    except DataError:
        extractor = None
    return Path(cfg.out_dir) / f"features_{cfg.encoder or extractor or 'features'}"


def export_features(cfg: ExportConfig) -> ExportResult:
    """Export every ``*.h5`` feature file of ``cfg.src_dir``; files that cannot be exported (incomplete,
    unreadable, non-finite rows) are listed as skipped with the reason, and the others are still exported."""
    sources = sorted(p for p in Path(cfg.src_dir).glob("*.h5") if not p.name.startswith("."))
    if not sources:
        raise ConfigError(f"no .h5 feature files in {cfg.src_dir}: give the --out of `zoomfeat extract`")
    for src in sources[:1]:
        check_output_folder(_target_folder(src, cfg), "--out", {"source": str(Path(cfg.src_dir).resolve()),
                                                                 "format": cfg.fmt, "mag": cfg.mag.name}, RECORD_NAME,
                            section="export")
    written: list[Path] = []
    skipped: dict[Path, str] = {}
    for src in sources:
        try:
            written += export_slide(src, cfg)
        except OutputError:
            raise
        except DataError as exc:
            skipped[src] = str(exc)
    return ExportResult(tuple(written), skipped)
