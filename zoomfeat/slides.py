"""Slide access through OpenSlide: metadata (base magnification, mpp and where they came from), patches
read at any magnification from the best pyramid level, thumbnails.

Base magnification (docs/ARCHITECTURE.md, "Binding contracts"): ``--base-mag`` override, else ``openslide.objective-power``, else
10 / mpp rounded to the nearest standard objective, where mpp is ``--mpp`` or ``openslide.mpp-x``;
an mpp outside 0.1-2.0 um/px is treated as missing. Without either, a :class:`SlideError` names the options.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoomfeat.errors import ConfigError, SlideError, one_line
from zoomfeat.mags import Magnification

SLIDE_EXTENSIONS: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi",
    ".png", ".jpg", ".jpeg",  # plain images (zoomfeat.plain_images): need --mpp or --base-mag
)
STANDARD_OBJECTIVES: tuple[float, ...] = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0)
MPP_RANGE: tuple[float, float] = (0.1, 2.0)  # um/px; values outside are treated as missing
WHITE = 255


def find_slides(paths: Sequence[str | Path]) -> list[Path]:
    """Files given as-is plus every slide (by extension) inside given folders, sorted, without duplicates.

    A DICOM folder with several ``.dcm`` files counts once (its first file). Raises :class:`ConfigError`
    for a missing path or when nothing is found.
    """
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            dicom_dirs: set[Path] = set()
            for child in sorted(path.rglob("*")):
                if not child.is_file() or child.suffix.lower() not in SLIDE_EXTENSIONS or child.name.startswith("."):
                    continue
                if child.suffix.lower() == ".dcm":
                    if child.parent in dicom_dirs:
                        continue
                    dicom_dirs.add(child.parent)
                found.add(child)
        elif path.is_file():
            found.add(path)
        else:
            raise ConfigError(f"slide path {path} does not exist: give slide files or folders that hold slides")
    if not found:
        names = ", ".join(str(p) for p in paths) or "(none)"
        raise ConfigError(f"no slides found in {names}: expected files ending in {' '.join(SLIDE_EXTENSIONS)}")
    return check_unique_ids(found)


def check_unique_ids(slides) -> list[Path]:
    """The slides sorted, one per file; ConfigError naming both paths when two files share a slide id (their
    outputs ``<out>/<slide_id>.h5`` would overwrite each other)."""
    by_file: dict[Path, Path] = {}
    for path in sorted(Path(s) for s in slides):
        by_file.setdefault(path.resolve(), path)
    by_id: dict[str, Path] = {}
    for path in sorted(by_file.values()):
        other = by_id.setdefault(slide_id_of(path), path)
        if other != path:
            raise ConfigError(f"two slides have the id {slide_id_of(path)!r}: {other} and {path} (the slide id is "
                              "the file name without extension): rename one or process them into different --out "
                              "folders")
    return sorted(by_file.values())


def slide_id_of(path: str | Path) -> str:
    """File name without its extension: ``/a/TCGA-01.svs -> "TCGA-01"``."""
    return Path(path).stem


@dataclass(frozen=True)
class SlideInfo:
    """Geometry and scale of one slide. Dimensions are level-0 px; mpp in um/px (None when unknown)."""

    path: Path
    slide_id: str
    width: int
    height: int
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    base_magnification: float
    base_mpp: float | None
    magnification_source: str  # "objective-power" | "mpp" | "--base-mag" | "--mpp"
    mpp_source: str  # "mpp" | "--mpp" | "missing"
    vendor: str | None


def _plausible_mpp(value: str | float | None) -> float | None:
    try:
        mpp = float(value) if value is not None else None
    except ValueError:
        return None
    if mpp is None or not math.isfinite(mpp) or not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        return None
    return mpp


def _nearest_objective(mpp: float) -> float:
    target = 10.0 / mpp
    return min(STANDARD_OBJECTIVES, key=lambda o: abs(math.log(o / target)))


def check_scale_overrides(base_mag: float | None, mpp: float | None) -> None:
    """Validate the ``--base-mag`` / ``--mpp`` overrides a command was given (ConfigError naming the fix)."""
    if base_mag is not None and mpp is not None:
        raise ConfigError("give --base-mag or --mpp, not both")
    if mpp is not None and _plausible_mpp(mpp) is None:
        raise ConfigError(f"--mpp {mpp} is outside {MPP_RANGE[0]}-{MPP_RANGE[1]} um/px: give the level-0 mpp, "
                          "e.g. 0.25")
    if base_mag is not None and not (math.isfinite(base_mag) and base_mag > 0):
        raise ConfigError(f"--base-mag {base_mag} must be a positive magnification such as 20 or 40")


def resolve_scale(properties: dict, path: Path, base_mag: float | None, mpp: float | None) -> tuple[float, str, float | None, str]:
    """(base magnification, its source, base mpp or None, its source) from OpenSlide properties and overrides;
    with both overrides, ``base_mag`` wins (the CLI lets a user give only one)."""
    check_scale_overrides(None, mpp)
    check_scale_overrides(base_mag, None)
    if mpp is not None:
        slide_mpp, mpp_source = float(mpp), "--mpp"
    else:
        slide_mpp = _plausible_mpp(properties.get("openslide.mpp-x"))
        mpp_source = "mpp" if slide_mpp is not None else "missing"
    objective = _plausible_objective(properties.get("openslide.objective-power"))
    if base_mag is None and mpp is None and objective is not None and slide_mpp is not None:
        _check_agreement(path, objective, slide_mpp)
    if base_mag is not None:
        return float(base_mag), "--base-mag", slide_mpp, mpp_source
    if mpp is not None:
        return _nearest_objective(slide_mpp), "--mpp", slide_mpp, mpp_source
    if objective is not None:
        return objective, "objective-power", slide_mpp, mpp_source
    if slide_mpp is not None:
        return _nearest_objective(slide_mpp), "mpp", slide_mpp, mpp_source
    raw = properties.get("openslide.mpp-x")
    detail = f"its mpp {float(raw):g} um/px is implausible" if raw is not None else "it has no mpp"
    raise SlideError(f"{path}: no objective power and {detail}: pass --base-mag (e.g. 20) or --mpp (e.g. 0.5)")


_WARNED: set[str] = set()


def _check_agreement(path: Path, objective: float, mpp: float) -> None:
    """Warn (once per slide) when the objective power and the mpp disagree by more than a factor 1.5 (an
    AppMag 40 slide scanned at 0.5 um/px is really ~20x): the objective power is used."""
    implied = 10.0 / mpp
    if max(objective, implied) / min(objective, implied) <= 1.5 or str(path) in _WARNED:
        return
    _WARNED.add(str(path))
    from zoomfeat.log import warn

    warn(f"{path}: objective power {objective:g}x disagrees with its mpp {mpp:g} um/px (about "
         f"{_nearest_objective(mpp):g}x): using {objective:g}x; pass --base-mag or --mpp if that is wrong")


def _plausible_objective(value: str | None) -> float | None:
    try:
        objective = float(value) if value is not None else None
    except ValueError:
        return None
    return objective if objective is not None and math.isfinite(objective) and objective > 0 else None


class Slide:
    """An open slide with resolved scale. Context manager; every failure is a :class:`SlideError`."""

    def __init__(self, path: str | Path, base_mag: float | None = None, mpp: float | None = None):
        self.path = Path(path)
        self._slide = _open_backend(self.path)
        try:
            self.info = self._make_info(base_mag, mpp)
        except Exception:
            self._slide.close()
            raise

    def _make_info(self, base_mag: float | None, mpp: float | None) -> SlideInfo:
        props = dict(self._slide.properties)
        magnification, mag_source, base_mpp, mpp_source = resolve_scale(props, self.path, base_mag, mpp)
        width, height = self._slide.dimensions
        return SlideInfo(
            path=self.path, slide_id=slide_id_of(self.path), width=int(width), height=int(height),
            level_count=int(self._slide.level_count),
            level_dimensions=tuple((int(w), int(h)) for w, h in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            base_magnification=float(magnification), base_mpp=base_mpp,
            magnification_source=mag_source, mpp_source=mpp_source, vendor=props.get("openslide.vendor"),
        )

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._slide.close()

    def downsample(self, mag: Magnification) -> float:
        """Level-0 px per px at ``mag`` (= base_magnification / mag)."""
        return self.info.base_magnification / Magnification(mag)

    def read_region_level0(self, x0: int, y0: int, extent: int, out_size: int) -> np.ndarray:
        """uint8 [out_size, out_size, 3] RGB of the level-0 square (x0, y0, x0+extent, y0+extent).

        Read from the best pyramid level (``get_best_level_for_downsample``), then resized with a box/Lanczos
        filter; transparent or out-of-slide pixels become white.
        """
        import openslide
        from PIL import Image

        level = self._slide.get_best_level_for_downsample(extent / out_size)
        level_ds = self.info.level_downsamples[level]
        size_at_level = max(1, int(math.ceil(extent / level_ds)))
        try:
            region = self._slide.read_region((int(x0), int(y0)), level, (size_at_level, size_at_level))
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise SlideError(f"{self.path}: reading pixels at ({x0}, {y0}) failed ({one_line(exc, None)}): "
                             "the file is damaged; re-export or exclude it") from exc
        rgb = _flatten_white(region)
        if rgb.size != (out_size, out_size):
            rgb = rgb.resize((out_size, out_size), Image.Resampling.BOX if size_at_level >= 2 * out_size
                             else Image.Resampling.LANCZOS)
        return np.asarray(rgb, dtype=np.uint8)

    def read_patch(self, x0: int, y0: int, mag: Magnification, size: int = 256) -> np.ndarray:
        """uint8 [size, size, 3] RGB of the square at level-0 (x0, y0) covering ``size * downsample(mag)`` px."""
        extent = int(round(size * self.downsample(mag)))
        return self.read_region_level0(x0, y0, extent, size)

    def thumbnail(self, max_size: int) -> np.ndarray:
        """uint8 [h, w, 3] RGB of the whole slide, longest side ``max_size`` px, aspect ratio kept."""
        import openslide

        try:
            thumb = self._slide.get_thumbnail((max_size, max_size))
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise SlideError(f"{self.path}: reading the thumbnail failed ({one_line(exc, None)}): "
                             "the file is damaged; re-export or exclude it") from exc
        return np.asarray(thumb.convert("RGB"), dtype=np.uint8)


def _open_backend(path: Path):
    """OpenSlide for slides; :class:`zoomfeat.plain_images.PlainImage` for PNG/JPEG and flat TIFFs."""
    import openslide

    from zoomfeat.plain_images import PlainImage, PlainImageError, is_plain_image

    if not path.exists():
        raise SlideError(f"{path}: no such file: check the path")
    if path.is_dir():
        raise SlideError(f"{path} is a folder, not a slide file: give the slide file (or use a command that takes "
                         "folders of slides)")
    if is_plain_image(path):
        try:
            return PlainImage(path)
        except PlainImageError as exc:
            raise SlideError(f"{path}: {exc}: check that it is a PNG, JPEG or TIFF image") from exc
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise SlideError(f"{path}: cannot be opened by OpenSlide ({one_line(exc, None)}): "
                         "check that it is a whole-slide image in a supported format") from exc


def _flatten_white(region):
    """RGBA PIL image -> RGB on white (OpenSlide returns transparent pixels outside the scanned area)."""
    from PIL import Image

    if region.getchannel("A").getextrema() == (255, 255):  # fully opaque: no compositing needed
        return region.convert("RGB")
    background = Image.new("RGB", region.size, (WHITE, WHITE, WHITE))
    background.paste(region, mask=region.getchannel("A"))
    return background


