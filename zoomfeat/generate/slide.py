"""Synthetic whole slides: cascaded joint multi-scale sampling, region by region, streamed to a pyramidal TIFF.

``zoomfeat generate-slide`` takes a real slide's tissue layout and conditions and makes a new slide with them,
coarse to fine over ``levels`` (e.g. 1.25x, 5x, 20x), one ZoomLDM for every level (Yellapragada et al.,
ZoomLDM, CVPR 2025: one model at every magnification, §3.2 joint multi-scale sampling):

1. **Conditions.** The real slide's 20x embedding grid ``E`` [D, rows, cols] under the region (the conditioner
   on every 256-px 20x tile, background included, as extraction does) and its tissue mask
   (:mod:`zoomfeat.tissue`). A patch at magnification m is conditioned on its (20/m)^2 sub-grid of ``E``
   summarised at m; a 20x window at a fractional position on the slerp-interpolated embedding
   (:mod:`zoomfeat.generate.interpolate`, the official large-image rule).
2. **Coarsest level.** The whole tissue area at ``levels[0]`` as one latent, sampled from noise with
   overlapping windows (MultiDiffusion: the clean estimates of overlapping windows averaged at every step), each
   window conditioned on the sub-grid under it; windows with no tissue under them are not run.
3. **Each finer level**, region by region in raster order (a region = the area of one patch of the level above:
   (m_k / m_{k-1})^2 patches): the region's patches are sampled by :func:`zoomfeat.generate.joint.joint_sample`
   with a *fixed guide*, the level above decoded over the region (the joint update keeps the downsampled
   mosaic in agreement with it); then the supplement's refinement ("add noise and denoise", t0 300, stride 50)
   runs over the region together with a one-patch band of its already finished neighbours above and to the
   left, with overlapping windows, the neighbours' band re-imposed (re-noised to the current t) before every
   step (replacement, as in inpainting), so the windows that straddle the border are pulled to agree with what
   is already there. Neighbours are never changed. Regions with no tissue are not sampled.
4. **Output.** The finest level's latent is decoded band by band (Gaussian-blended windows,
   :mod:`zoomfeat.generate.decode`, with one window of margin above and below so band borders leave no seam),
   pixels outside the real slide's tissue mask are painted the real slide's background colour, and the bands
   are streamed into a pyramidal TIFF (:mod:`zoomfeat.generate.pyramid`) at the model's 20x (one 20x patch =
   the model's R px; mpp = the source slide's 20x mpp when R = 256) with the settings, seeds, model hash and
   the source slide's fingerprint in its description.

With a CDM instead of a real slide (``cfg.cdm``, ``cfg.size``; :func:`drawn_layout`): the whole area is tissue,
the first level's contexts are drawn by the CDM, one per first-level patch (:meth:`Cascade.draw`), and each finer
level's 20x embedding grid is the conditioner's on the level above as generated (:meth:`Cascade.embed_level`);
this rule is the toolkit's, not the paper's (:data:`DRAWN_RULE`).

Resumable and deterministic: every finished unit (conditions, the coarsest level, each region's latent) is
written atomically into ``<out>.parts/`` before the next starts; each region draws its noise from its own seed
``SeedSequence([seed, level, row, col])`` and reads only finished files, so a killed run, started again with
the same command, skips what is there and writes a byte-identical TIFF. ``<out>.parts`` is removed once the
TIFF is complete (``keep_parts`` keeps it).

Memory: one region's latents and activations, one band of output pixels (``tile`` rows of the slide's width,
decoded in column chunks of :data:`DECODE_CHUNK_PX`); the 20x embedding grid and the finished levels' latents
stay on disk, written band by band and read by crops (:func:`read_crop`, :func:`save_bands`). Only the coarsest
level grows with the slide while it is sampled (one latent over the whole area, 1/(g0 f)^2 of the output's
pixels per channel, a few copies: start ``levels`` at 1.25x for large slides) and the tissue mask (1.25x).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from zoomfeat.cdm.sample import sample_contexts
from zoomfeat.cdm.source import load_checked
from zoomfeat.errors import ConfigError, DataError
from zoomfeat.extract.loading import load_conditioner
from zoomfeat.generate.conditions import contexts_for_mag, grid_source
from zoomfeat.generate.decode import decode_large, to_uint8
from zoomfeat.generate.guidance import Guidance, guided_eps
from zoomfeat.generate.interpolate import contexts_20x, embeddings_at
from zoomfeat.generate.joint import FixedGuide, JointSettings, joint_sample, stitch
from zoomfeat.generate.pyramid import PyramidSettings, write_pyramid_streamed
from zoomfeat.generate.windows import SeededNoise, StepCoefficients, large_image_timesteps, renoise, window_grid
from zoomfeat.mags import CONDITIONING_MAG, PATCH_SIZE, Magnification, parse_mag
from zoomfeat.model import load_zoomldm
from zoomfeat.resolve import file_sha256
from zoomfeat.runtime import resolve_runtime
from zoomfeat.slides import Slide
from zoomfeat.store import atomic_write, write_text
from zoomfeat.tissue import TissueParams, mask_from_rgb

PARTS_VERSION = 1
DEFAULT_LEVELS = ("1.25x", "5x", "20x")
DECODE_CHUNK_PX = 4096  # output px of the finest level decoded at a time across a band (whole windows)


@dataclass(frozen=True)
class SlideGenConfig:
    """``zoomfeat generate-slide``. ``region``: level-0 (x, y, w, h) of the real slide (None: all of it),
    rounded down to whole patches of the coarsest level. ``steps``: denoising steps from t = 1000 of the
    coarsest level and of each region's joint sampling; ``refine_t0`` 0 turns the neighbour/refinement pass off."""

    zoomldm: object  # zoomfeat.resolve.ZoomLDMSource
    conditions: object  # zoomfeat.generate.conditions.ConditionRequest (its slide, conditioner, tissue, scale)
    out: Path
    levels: tuple[Magnification, ...] = tuple(parse_mag(m) for m in DEFAULT_LEVELS)
    region: tuple[int, int, int, int] | None = None
    steps: int = 50
    guidance: Guidance = field(default_factory=lambda: Guidance(2.0, "large_image"))
    h: float = 0.005
    lr: float = 0.5
    joint_update: str = "je"
    joint_iterations: int = 1
    krylov: int = 10
    refine_t0: int = 300
    refine_stride: int = 50
    window_stride: int | None = None
    decode_stride: int | None = None
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"
    tile: int = 256
    compression: str = "jpeg"
    quality: int = 90
    keep_parts: bool = False
    size: tuple[int, int] | None = None  # --cdm: (W, H) px of the new slide at 20x
    cdm: Path | None = None  # a train-cdm run folder or CDM checkpoint: the first level's contexts are drawn
    cdm_steps: int = 200
    cdm_guidance: float = 1.0
    cdm_seed: int = 0

    def __post_init__(self) -> None:
        levels = tuple(sorted({parse_mag(m) for m in self.levels}))
        object.__setattr__(self, "levels", levels)
        if len(levels) < 2 or levels[-1] != CONDITIONING_MAG:
            raise ConfigError(f"--levels {','.join(m.name for m in levels)}: give at least two magnifications "
                              "ending at 20x, e.g. 1.25x,5x,20x")
        for above, below in zip(levels, levels[1:]):
            if below.grid_width and above.grid_width % below.grid_width:
                raise ConfigError(f"--levels: {below.name} is not a whole zoom of {above.name}")
        if self.region is not None and (len(self.region) != 4 or min(self.region[2:]) < 1 or min(self.region) < 0):
            raise ConfigError(f"bad --region {self.region}: give X,Y,W,H in level-0 px (W, H >= 1)")
        if not 1 <= self.steps <= 1000:
            raise ConfigError(f"bad --steps {self.steps}: use 1..1000")
        if self.refine_t0 < 0 or self.refine_t0 > 1000 or self.refine_stride < 1:
            raise ConfigError("bad --refine-t0/--refine-stride: t0 in 0..1000 (0 = off), stride >= 1")
        if self.seed < 0:
            raise ConfigError(f"bad --seed {self.seed}: use a seed >= 0")
        self._check_cdm()
        if self.decode_stride is not None and self.decode_stride < 1:
            raise ConfigError(f"bad --decode-stride {self.decode_stride}: use 1 or more latent px")
        if self.window_stride is not None and self.window_stride < 1:
            raise ConfigError(f"bad --window-stride {self.window_stride}: use 1 or more latent px")
        self.joint_settings(1)  # validates the joint update's settings
        if self.batch_size < 1:
            raise ConfigError(f"bad --batch-size {self.batch_size}: use 1 or more")
        if Path(self.out).suffix.lower() not in (".tif", ".tiff"):
            raise ConfigError(f"--out {self.out}: give a .tiff file name")
        if Path(self.out).exists():
            raise ConfigError(f"--out {self.out} exists: give a new file name (generation never overwrites)")
        PyramidSettings(self.tile, self.compression, self.quality)

    def _check_cdm(self) -> None:
        if self.cdm is None:
            if self.size is not None:
                raise ConfigError("--size is the layout of a slide drawn with --cdm: pass --cdm, or drop --size "
                                  "(a real --slide gives the layout)")
            return
        if self.region is not None:
            raise ConfigError("--region is a part of a real slide: with --cdm give the new slide's --size W,H")
        if self.size is None or len(self.size) != 2 or min(self.size) < 1:
            raise ConfigError(f"--cdm needs --size W,H (px of the new slide at 20x, e.g. 4096,4096), got {self.size}")
        if not 2 <= self.cdm_steps <= 1000:
            raise ConfigError(f"bad --cdm-steps {self.cdm_steps}: use 2..1000")
        if self.cdm_seed < 0:
            raise ConfigError(f"bad --cdm-seed {self.cdm_seed}: use a seed >= 0")

    def joint_settings(self, stride: int):
        return JointSettings(1000, stride, self.guidance, self.h, self.lr, update=self.joint_update,
                             iterations=self.joint_iterations, krylov=self.krylov, batch_size=self.batch_size)

    @property
    def parts(self) -> Path:
        return Path(self.out).with_name(Path(self.out).name + ".parts")

    def record(self) -> dict:
        """The settings that decide the pixels (written into the parts folder and the TIFF)."""
        return {"levels": [m.name for m in self.levels], "region": list(self.region) if self.region else None,
                "steps": self.steps, "guidance": self.guidance.value, "guidance_form": self.guidance.form,
                "h": self.h, "lr": self.lr, "joint_update": self.joint_update,
                "joint_iterations": self.joint_iterations, "krylov": self.krylov, "refine_t0": self.refine_t0,
                "refine_stride": self.refine_stride, "window_stride": self.window_stride, "decode_stride": self.decode_stride,
                "seed": self.seed,
                "batch_size": self.batch_size, "tile": self.tile, "compression": self.compression,
                "quality": self.quality,
                **({"size": list(self.size), "cdm_steps": self.cdm_steps, "cdm_guidance": self.cdm_guidance,
                    "cdm_seed": self.cdm_seed} if self.cdm is not None else {})}


def region_seed(seed: int, level: int, row: int, col: int) -> int:
    """The seed of one unit: ``SeedSequence([seed, level, row, col])`` (level 0 = the coarsest, one unit)."""
    return int(np.random.SeedSequence([seed, level, row, col]).generate_state(1, np.uint32)[0])


# ----- the parts store -------------------------------------------------------------------------------------
class Parts:
    """The resumable store ``<out>.parts/``: ``run.json`` (what the parts belong to) and one ``.npy`` per unit,
    each written atomically; a unit is finished when its file exists."""

    def __init__(self, folder: Path, record: dict):
        self.folder = Path(folder)
        run = self.folder / "run.json"
        text = json.dumps(record, sort_keys=True, indent=1)
        if run.exists():
            if run.read_text() != text:
                raise ConfigError(f"{self.folder} holds the parts of a run with other settings or inputs: delete it "
                                  "or give another --out")
        else:

            self.folder.mkdir(parents=True, exist_ok=True)
            write_text(run, text)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npy"

    def has(self, name: str) -> bool:
        return self.path(name).exists()

    def save(self, name: str, array: np.ndarray) -> None:

        with atomic_write(self.path(name)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)

    def load(self, name: str) -> np.ndarray:
        return np.load(self.path(name), allow_pickle=False)


# The arrays that grow with the slide (the 20x embedding grid, the first level's latent) stay on disk: they are
# written band by band and read by crops, so memory holds one band or one crop of them, never the whole.
def read_crop(path: Path, index) -> np.ndarray:
    """``np.load(path)[index]`` through a memory map opened for this read only: only the crop's pages are read,
    and none stay mapped (a map kept open would count every page it ever read in the resident set)."""
    return np.array(np.load(path, mmap_mode="r", allow_pickle=False)[index])


def save_bands(path: Path, shape: tuple[int, int, int], bands) -> None:
    """Write a float32 [D, rows, cols] ``.npy`` at ``path`` (atomically) from ``bands``, an iterable of
    (row0, float32 [D, n, cols]) covering the rows in order, one band in memory at a time."""
    d, rows, cols = (int(v) for v in shape)
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (d, rows, cols)})
        start, done = fh.tell(), 0
        fh.truncate(start + 4 * d * rows * cols)
        for r0, band in bands:
            band = np.ascontiguousarray(band, np.float32)
            if r0 != done or band.shape[0] != d or band.shape[2] != cols:
                raise DataError(f"{path}: a band at row {r0} of shape {band.shape} does not continue "
                                f"[{d}, {rows}, {cols}]")
            for k in range(d):  # row-major [D, rows, cols]: one contiguous run of rows per channel
                fh.seek(start + 4 * (k * rows + r0) * cols)
                fh.write(band[k].tobytes())
            done += band.shape[1]
        if done != rows:
            raise DataError(f"{path}: {done} of {rows} rows written")


# ----- geometry --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    """One level of the cascade: ``mag``, its patches ``rows x cols``, regions of ``region`` x ``region``
    patches (the coarsest level is one region)."""

    index: int
    mag: Magnification
    rows: int
    cols: int
    region_rows: int
    region_cols: int

    @property
    def g(self) -> int:
        return self.mag.grid_width

    @property
    def n_regions(self) -> tuple[int, int]:
        return self.rows // self.region_rows, self.cols // self.region_cols


def build_levels(mags: tuple[Magnification, ...], rows0: int, cols0: int) -> list[Level]:
    levels = [Level(0, mags[0], rows0, cols0, rows0, cols0)]
    for k, m in enumerate(mags[1:], start=1):
        zoom = mags[k - 1].grid_width // m.grid_width
        levels.append(Level(k, m, levels[-1].rows * zoom, levels[-1].cols * zoom, zoom, zoom))
    return levels


class LatentReader:
    """Crops of one level's latent assembled from its unit files (a region not sampled reads as zeros), each
    file read through a memory map opened for that crop only (:func:`read_crop`)."""

    def __init__(self, parts: Parts, level: Level, side: int, channels: int):
        self.parts, self.level, self.side, self.channels = parts, level, side, channels
        self.rh, self.rw = level.region_rows * side, level.region_cols * side

    def crop(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """float32 [C, r1-r0, c1-c0] of the level's latent (latent px)."""
        out = np.zeros((self.channels, r1 - r0, c1 - c0), np.float32)
        for i in range(r0 // self.rh, (r1 - 1) // self.rh + 1):
            for j in range(c0 // self.rw, (c1 - 1) // self.rw + 1):
                name = unit_name(self.level.index, i, j)
                if not self.parts.has(name):
                    continue
                y0, y1 = max(r0, i * self.rh), min(r1, (i + 1) * self.rh)
                x0, x1 = max(c0, j * self.rw), min(c1, (j + 1) * self.rw)
                index = np.s_[:, y0 - i * self.rh:y1 - i * self.rh, x0 - j * self.rw:x1 - j * self.rw]
                out[:, y0 - r0:y1 - r0, x0 - c0:x1 - c0] = read_crop(self.parts.path(name), index)
        return out


def unit_name(level: int, row: int, col: int) -> str:
    return f"L{level}_r{row:05d}_c{col:05d}"


# ----- the source slide: conditions, tissue, scale -----------------------------------------------------------
@dataclass
class Source:
    """What the real slide gives: its 20x embedding grid under the region, tissue mask, geometry, provenance."""

    grid: Path | None  # .npy of the raw 20x embeddings float32 [D, rows20, cols20] (as the conditioner writes them)
    mask: np.ndarray  # bool [h, w] tissue mask of the whole slide
    mask_scale: tuple[float, float]  # level-0 px per mask px (x, y)
    origin: tuple[int, int]  # level-0 (x, y) of the region's corner
    tile0: float  # level-0 px of one 20x tile
    mpp20: float  # mpp of the output (the source's mpp at 20x; 0.5 when the slide has none)
    background: tuple[int, int, int]
    record: dict


def _region_patches(info, cfg: SlideGenConfig) -> tuple[int, int, int, int, float]:
    """(x, y, rows0, cols0, level-0 px of a 20x tile) of the region in whole coarsest-level patches."""
    tile0 = PATCH_SIZE * info.base_magnification / CONDITIONING_MAG
    x, y, w, h = cfg.region if cfg.region else (0, 0, info.width, info.height)
    if x + w > info.width or y + h > info.height:
        raise ConfigError(f"--region {x},{y},{w},{h} leaves the {info.width}x{info.height} slide {info.path}: "
                          "give a region inside it")
    p0 = cfg.levels[0].grid_width * tile0
    rows0, cols0 = int(h // p0), int(w // p0)
    if rows0 < 1 or cols0 < 1:
        raise ConfigError(f"the region {w}x{h} of {info.path} is smaller than one {cfg.levels[0].name} patch "
                          f"({p0:g} level-0 px): give a larger --region or a finer first level in --levels")
    return int(x), int(y), rows0, cols0, tile0


def read_source(model, cfg: SlideGenConfig, runtime, grid: Path) -> tuple[Source, int, int]:
    """The conditions and tissue of the real slide's region (conditioner on every 20x tile under it); the
    embedding grid is written to ``grid`` one row of first-level patches at a time."""
    request = cfg.conditions
    with Slide(request.slide, base_mag=request.base_mag, mpp=request.mpp) as slide:
        info = slide.info
        x, y, rows0, cols0, tile0 = _region_patches(info, cfg)
        params = request.tissue or TissueParams()
        downsample = max(1.0, info.base_magnification / params.mask_mag)
        thumb = slide.thumbnail(max(1, int(np.ceil(max(info.width, info.height) / downsample))))
        props = dict(slide._slide.properties) if hasattr(slide._slide, "properties") else {}
    mask, _ = mask_from_rgb(thumb, params)
    background = tuple(int(v) for v in np.median(thumb[~mask], axis=0)) if (~mask).any() else (255, 255, 255)
    g0 = cfg.levels[0].grid_width
    p0 = int(round(g0 * tile0))
    records = []
    encoder = None  # the conditioner, loaded once for every row (UNI's weights take seconds to load)
    if request.conditioning_dir is None:
        encoder = load_conditioner(request, model.conditioning_dim).to(runtime.device if runtime else "cpu")

    def bands():
        for i in range(rows0):
            coords = tuple((x + j * p0, y + i * p0) for j in range(cols0))
            conds = grid_source(model, replace(request, mag=cfg.levels[0], coords=coords), runtime, encoder)
            records.append(conds.record)
            grids = conds.grids.reshape(cols0, -1, g0, g0)  # [cols0, D, g0, g0]
            yield i * g0, grids.transpose(1, 2, 0, 3).reshape(grids.shape[1], g0, cols0 * g0)

    save_bands(grid, (model.conditioning_dim, rows0 * g0, cols0 * g0), bands())
    mpp20 = info.base_mpp * info.base_magnification / CONDITIONING_MAG if info.base_mpp else 0.5
    record = {"slide_id": info.slide_id, "file": Path(info.path).name, "bytes": Path(info.path).stat().st_size,
              "openslide_quickhash1": props.get("openslide.quickhash-1"),
              "base_magnification": info.base_magnification, "base_mpp": info.base_mpp,
              "region_level0": [x, y, int(cols0 * p0), int(rows0 * p0)],
              "conditioner": {k: records[0].get(k) for k in ("conditioner", "toy_seed", "conditioning_dir")}}
    scale = (info.width / mask.shape[1], info.height / mask.shape[0])
    source = Source(Path(grid), mask, scale, (x, y), tile0, float(mpp20), background, record)
    return source, rows0, cols0


# ----- a slide with no real counterpart: contexts drawn by a CDM ----------------------------------------------
DRAWN_RULE = ("toolkit rule (not the paper's): the first level's contexts are drawn by the CDM, one per first-level "
              "patch, a window taking the context of the patch under its centre; the 20x embeddings that condition "
              "each finer level are the conditioner's on the level above as generated (each 20x tile's area of it, "
              "resized by the conditioner's preprocessing)")


DRAWN_MPP = 0.5  # the nominal mpp of 20x (ZoomLDM's 20x training tiles)


def drawn_layout(model, cfg: SlideGenConfig, cdm) -> tuple[Source, int, int]:
    """The layout of a ``--cdm`` slide: ``cfg.size`` px at 20x rounded down to whole first-level patches, all of
    it tissue; no embeddings (each finer level's come from the level above, :meth:`Cascade.embed_level`)."""
    r = int(model.first_stage_resolution)  # output px of one 20x tile
    p0 = cfg.levels[0].grid_width * r
    w, h = cfg.size
    rows0, cols0 = h // p0, w // p0
    if rows0 < 1 or cols0 < 1:
        raise ConfigError(f"--size {w},{h} is smaller than one {cfg.levels[0].name} patch ({p0} px with this "
                          "model): give a larger --size or a finer first level in --levels")
    for above in cfg.levels[:-1]:
        if r % above.grid_width:
            raise ConfigError(f"--levels: a 20x tile is {r / above.grid_width:g} px of the generated {above.name} "
                              f"level with this {r}-px model, too small for the conditioner: start --levels at a "
                              f"magnification of at least {20 / r:g}x")
    tile0 = float(PATCH_SIZE)  # a virtual 20x level 0: 256 px per 20x tile, as a real 20x slide
    extent = (cols0 * cfg.levels[0].grid_width * tile0, rows0 * cfg.levels[0].grid_width * tile0)
    record = {"cdm": Path(cdm.weights).name, "cdm_sha256": cdm.weights_sha256,
              "cdm_trained_on_zoomldm_sha256": cdm.zoomldm_sha256, "cdm_mags_seen": cdm.mags_seen,
              "contexts_drawn": rows0 * cols0, "layout": "--size at 20x, all tissue",
              "conditioner": {"conditioner": cfg.conditions.conditioner,
                              "toy_seed": cfg.conditions.toy_seed if cfg.conditions.conditioner == "toy" else None},
              "rule": DRAWN_RULE}
    source = Source(None, np.ones((1, 1), bool), extent, (0, 0), tile0, DRAWN_MPP, (255, 255, 255), record)
    return source, int(rows0), int(cols0)


def tissue_rows(source: Source, y0: int, y1: int, width: int, px_per_tile: int) -> np.ndarray:
    """bool [y1-y0, width] tissue mask at output px rows y0..y1 (nearest mask px of each output px)."""
    to0 = source.tile0 / px_per_tile  # level-0 px per output px
    ys = ((source.origin[1] + (np.arange(y0, y1) + 0.5) * to0) / source.mask_scale[1]).astype(np.int64)
    xs = ((source.origin[0] + (np.arange(width) + 0.5) * to0) / source.mask_scale[0]).astype(np.int64)
    h, w = source.mask.shape
    return source.mask[np.clip(ys, 0, h - 1)][:, np.clip(xs, 0, w - 1)]


def any_tissue(source: Source, level: Level, i: int, j: int) -> bool:
    """Whether the mask has tissue under region (i, j) of ``level``."""
    tile0 = source.tile0 * level.g
    x0 = source.origin[0] + j * level.region_cols * tile0
    y0 = source.origin[1] + i * level.region_rows * tile0
    sx, sy = source.mask_scale
    c0, c1 = int(x0 // sx), int(np.ceil((x0 + level.region_cols * tile0) / sx))
    r0, r1 = int(y0 // sy), int(np.ceil((y0 + level.region_rows * tile0) / sy))
    return bool(source.mask[r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)].any())


# ----- the samplers ------------------------------------------------------------------------------------------
class Cascade:
    """The model, the conditions and the settings of one run; the units of work are its methods."""

    def __init__(self, model, cfg: SlideGenConfig, source: Source, levels: list[Level], parts: Parts, runtime):
        self.m, self.cfg, self.src, self.levels, self.parts, self.runtime = model, cfg, source, levels, parts, runtime
        self.side = int(model.config.diffusion.image_size)
        self.f = int(model.config.first_stage.downsample_factor)
        self.channels = int(model.latent_channels)
        self.device = model.alphas_cumprod.device
        self.stride = max(1, 1000 // cfg.steps)
        self.drawn = None  # --cdm: float32 [rows0 * cols0, 65, D] contexts of the first level's patches

    def grid(self, level: Level) -> Path:
        """The .npy of the raw 20x embedding grid [D, rows20, cols20] that conditions ``level`` (read by crops)."""
        return self.src.grid if self.cfg.cdm is None else self.parts.path(f"E{level.index}")

    # conditions ---------------------------------------------------------------------------------------------
    def window_contexts(self, level: Level, positions: np.ndarray, offset: tuple[int, int] = (0, 0)):
        """Contexts [N, 65, D] of windows at latent ``positions`` (row, col) of a latent whose corner is the
        level's latent px ``offset``: the (20/m)^2 sub-grid under the window at m, or at 20x the slerped
        embedding (official rule)."""

        pos = np.asarray(positions, np.int64) + np.asarray(offset, np.int64)
        if level.index == 0 and self.drawn is not None:  # the patch under each window's centre
            rows = np.minimum((pos[:, 0] + self.side // 2) // self.side, level.rows - 1)
            cols = np.minimum((pos[:, 1] + self.side // 2) // self.side, level.cols - 1)
            return torch.from_numpy(np.ascontiguousarray(self.drawn[rows * level.cols + cols])).to(self.device)
        if level.g == 1:  # only the tiles under the batch (and the next ones, for the interpolation) are read
            r0, c0 = int(pos[:, 0].min()) // self.side, int(pos[:, 1].min()) // self.side
            r1, c1 = int(pos[:, 0].max()) // self.side + 2, int(pos[:, 1].max()) // self.side + 2
            local = pos - np.array([r0 * self.side, c0 * self.side], np.int64)
            crop = read_crop(self.grid(level), np.s_[:, r0:r1, c0:c1])
            return contexts_20x(self.m, embeddings_at(crop, local, self.side))
        rows = pos[:, 0] * level.g // self.side
        cols = pos[:, 1] * level.g // self.side
        grid = np.load(self.grid(level), mmap_mode="r", allow_pickle=False)  # unmapped when this call returns
        grids = np.stack([np.array(grid[:, r:r + level.g, c:c + level.g]) for r, c in zip(rows, cols)])
        del grid
        with torch.no_grad():
            return contexts_for_mag(self.m, grids, level.mag)

    def window_stride(self, level: Level) -> int:
        """Latent px between windows: ``window_stride`` (default a quarter window), below 20x rounded down to a
        multiple of the latent px of one 20x tile, so that every window sits on whole tiles of the grid."""
        stride = self.cfg.window_stride or self.side // 4
        if level.g == 1:
            return max(1, min(stride, self.side))
        unit = max(1, self.side // level.g)
        return max(unit, min(stride, self.side) // unit * unit)

    # the windowed (MultiDiffusion) loop ---------------------------------------------------------------------
    def windows_denoise(self, level: Level, x, steps: list[int], stride: int, noise, offset=(0, 0), known=None,
                        active=None):
        """Denoise ``x`` [1, C, H, W] through ``steps`` with overlapping windows (uniform average of their clean
        estimates; a pixel no window covers keeps x0 = 0). ``known`` = (mask [1,1,H,W] bool, z [1,C,H,W]):
        before every step the masked part of x is set to z re-noised to that step's t. ``active(r, c)``:
        whether a window is run (default all)."""

        _, _, h, w = x.shape
        pos = window_grid(h, w, self.side, self.window_stride(level))
        if active is not None:
            pos = pos[[active(r, c) for r, c in pos]] if len(pos) else pos
        win = self.side
        autocast = self.runtime.autocast() if self.runtime.precision != "fp32" else None
        for t in steps:
            coef = StepCoefficients.at(self.m, t, stride)
            if known is not None:
                mask, z = known
                x = torch.where(mask, renoise(self.m, z, t, noise(tuple(z.shape))), x)
            total, count = torch.zeros_like(x), torch.zeros_like(x[:, :1])
            with torch.no_grad():
                for s in range(0, len(pos), self.cfg.batch_size):
                    batch = pos[s:s + self.cfg.batch_size]
                    crops = torch.cat([x[:, :, r:r + win, c:c + win] for r, c in batch])
                    ctx = self.window_contexts(level, batch, offset)
                    with autocast() if autocast else torch.autocast("cpu", enabled=False):
                        eps = guided_eps(self.m, crops, t, ctx, self.cfg.guidance, "one_based").float()
                    x0w = coef.x0(crops, eps)
                    for k, (r, c) in enumerate(batch):
                        total[:, :, r:r + win, c:c + win] += x0w[k:k + 1]
                        count[:, :, r:r + win, c:c + win] += 1
            x0 = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
            x = coef.step(x0, coef.eps(x, x0), noise(tuple(x.shape)))
        return x

    def timesteps(self, t_start: int, stride: int) -> list[int]:

        return large_image_timesteps(t_start, stride, self.m.num_timesteps)

    # units --------------------------------------------------------------------------------------------------
    def coarsest(self) -> None:
        """Level 0: the whole tissue area sampled as one latent with overlapping windows."""
        level = self.levels[0]
        name = unit_name(0, 0, 0)
        if self.parts.has(name):
            return
        noise = SeededNoise(region_seed(self.cfg.seed, 0, 0, 0), self.device)
        x = noise((1, self.channels, level.rows * self.side, level.cols * self.side)).to(self.device)
        fine = Level(level.index, level.mag, level.rows, level.cols, 1, 1)

        def active(r, c) -> bool:  # a window is run when tissue lies under one of its patches
            i0, j0 = r // self.side, c // self.side
            i1, j1 = (r + self.side - 1) // self.side, (c + self.side - 1) // self.side
            return any(any_tissue(self.src, fine, i, j) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1))

        x = self.windows_denoise(level, x, self.timesteps(1000, self.stride), self.stride, noise, active=active)
        self._check(x, "the coarsest level")
        self.parts.save(name, x[0].float().cpu().numpy())

    def draw(self, cdm) -> None:
        """--cdm: one context per first-level patch, drawn by the CDM at the first level's magnification (seeded
        by ``cdm_seed``; the draw does not depend on the batch size), kept in the parts store."""
        level, name = self.levels[0], "cdm_contexts"
        if not self.parts.has(name):
            contexts = sample_contexts(cdm, level.mag, level.rows * level.cols, steps=self.cfg.cdm_steps,
                                       guidance=self.cfg.cdm_guidance, seed=self.cfg.cdm_seed,
                                       batch_size=self.cfg.batch_size)
            self.parts.save(name, contexts.numpy())
        self.drawn = np.load(self.parts.path(name), mmap_mode="r", allow_pickle=False)

    def embed_level(self, level: Level, encoder) -> None:
        """--cdm: the 20x embedding grid that conditions ``level``, the conditioner on the level above as
        generated: that level decoded one row of its patches at a time (one window of margin), each 20x tile's
        area of it (R / g px square) embedded; stored as ``E<level>``."""
        name = f"E{level.index}"
        if self.parts.has(name):
            return
        above = self.levels[level.index - 1]
        reader = LatentReader(self.parts, above, self.side, self.channels)
        autocast = self.runtime.autocast() if self.runtime.precision != "fp32" else None
        save_bands(self.parts.path(name), (int(encoder.spec.dim), self.levels[-1].rows, self.levels[-1].cols),
                   (self._embed_row(above, i, reader, encoder, autocast) for i in range(above.rows)))

    def _embed_row(self, above: Level, i: int, reader: LatentReader, encoder, autocast):
        """(row0, embeddings [D, g, cols20]) of the 20x tiles under patch row ``i`` of ``above``."""
        s, f = self.side, self.f
        q, g, cols20 = self.side * f // above.g, above.g, self.levels[-1].cols
        h_lat, w_lat = above.rows * s, above.cols * s
        a, b = _widen(max(0, (i - 1) * s), min(h_lat, (i + 2) * s), h_lat, s)
        lat = torch.from_numpy(reader.crop(a, b, 0, w_lat))[None].to(self.device)
        with torch.no_grad():
            img = decode_large(self.m, lat, batch_size=self.cfg.batch_size, stride=self.cfg.decode_stride)
        rows = to_uint8(img[:, :, f * (i * s - a):f * ((i + 1) * s - a)])[0]  # [R, W, 3]
        tiles = rows.reshape(g, q, cols20, q, 3).transpose(0, 2, 4, 1, 3).reshape(g * cols20, 3, q, q)
        embs = []
        for k in range(0, len(tiles), self.cfg.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(tiles[k:k + self.cfg.batch_size])).to(self.device)
            with torch.no_grad(), autocast() if autocast else torch.autocast("cpu", enabled=False):
                embs.append(encoder(encoder.preprocess(batch)).float().cpu().numpy())
        out = np.concatenate(embs).T.reshape(-1, g, cols20)
        if not np.isfinite(out).all():
            raise DataError(f"the conditioner's embeddings of the generated {above.name} level are not finite: use "
                            "--precision fp32")
        return i * g, out

    def guide_image(self, level: Level, i: int, j: int):
        """The level above decoded over region (i, j) of ``level``: float [1, 3, h, w] in about [-1, 1]."""

        above = self.levels[level.index - 1]
        reader = LatentReader(self.parts, above, self.side, self.channels)
        zoom = level.region_rows  # patches of this level per patch of the level above
        lat_per_patch = self.side // zoom  # latent px of the level above per patch of this level
        if lat_per_patch * zoom != self.side:
            raise ConfigError(f"--levels: a {zoom}x zoom does not divide the model's {self.side}-px latent")
        r0, c0 = i * level.region_rows * lat_per_patch, j * level.region_cols * lat_per_patch
        r1, c1 = r0 + level.region_rows * lat_per_patch, c0 + level.region_cols * lat_per_patch
        h_all, w_all = above.rows * self.side, above.cols * self.side
        a, b = max(0, r0 - self.side), min(h_all, r1 + self.side)
        c, d = max(0, c0 - self.side), min(w_all, c1 + self.side)
        a, b = _widen(a, b, h_all, self.side)
        c, d = _widen(c, d, w_all, self.side)
        lat = torch.from_numpy(reader.crop(a, b, c, d))[None].to(self.device)
        img = decode_large(self.m, lat, batch_size=self.cfg.batch_size, stride=self.cfg.decode_stride)
        f = self.f
        return img[:, :, f * (r0 - a):f * (r1 - a), f * (c0 - c):f * (c1 - c)].clamp(-1, 1)

    def region(self, level: Level, i: int, j: int) -> None:
        """One region of a finer level: joint sampling under the level above, then the refinement pass with the
        finished neighbours' band re-imposed."""

        name = unit_name(level.index, i, j)
        if self.parts.has(name) or not any_tissue(self.src, level, i, j):
            return
        noise = SeededNoise(region_seed(self.cfg.seed, level.index, i, j), self.device)
        rr, rc = level.region_rows, level.region_cols
        positions = np.array([((i * rr + a) * self.side, (j * rc + b) * self.side) for a in range(rr)
                              for b in range(rc)], np.int64)
        contexts = self.window_contexts(level, positions)
        settings = self.cfg.joint_settings(self.stride)
        result = joint_sample(self.m, contexts, FixedGuide(image=self.guide_image(level, i, j)), settings, noise,
                              grid_hw=(rr, rc))
        latent = stitch(result.latents, (rr, rc)).to(self.device)
        if self.cfg.refine_t0:
            latent = self.refine(level, i, j, latent, noise)
        self._check(latent, f"region ({i}, {j}) of {level.mag.name}")
        self.parts.save(name, latent[0].float().cpu().numpy())

    def refine(self, level: Level, i: int, j: int, latent, noise):
        """The refinement pass over the region plus a one-patch band of the finished neighbours above and to
        the left (kept: re-imposed before every step); returns the region's part."""

        s = self.side
        top, left = (s if i > 0 else 0), (s if j > 0 else 0)
        rh, rw = latent.shape[-2:]
        r0, c0 = i * rh - top, j * rw - left
        reader = LatentReader(self.parts, level, s, self.channels)
        z = torch.from_numpy(reader.crop(r0, r0 + top + rh, c0, c0 + left + rw))[None].to(self.device)
        mask = torch.zeros(1, 1, top + rh, left + rw, dtype=torch.bool, device=self.device)
        mask[:, :, :top] = True
        mask[:, :, :, :left] = True
        z[:, :, top:, left:] = latent
        x = renoise(self.m, z, self.cfg.refine_t0, noise(tuple(z.shape)))
        steps = self.timesteps(self.cfg.refine_t0, self.cfg.refine_stride)
        known = (mask, z) if (top or left) else None
        x = self.windows_denoise(level, x, steps, self.cfg.refine_stride, noise, offset=(r0, c0), known=known)
        return x[:, :, top:, left:]

    def _check(self, x, what: str) -> None:
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"{what} has non-finite values: use --precision fp32, more --steps or a lower --guidance")

    # assembly -----------------------------------------------------------------------------------------------
    def band_source(self):
        """``band(y0, y1)`` of the finest level's output pixels (uint8 [y1-y0, W, 3]) and (H, W)."""

        level = self.levels[-1]
        reader = LatentReader(self.parts, level, self.side, self.channels)
        h_lat, w_lat = level.rows * self.side, level.cols * self.side
        f, px_per_tile = self.f, self.side * self.f
        bg = np.array(self.src.background, np.uint8)

        def band(y0: int, y1: int) -> np.ndarray:
            """Decoded where the band has tissue (its column span, one window of margin), background elsewhere."""
            tissue = tissue_rows(self.src, y0, y1, w_lat * f, px_per_tile)
            out = np.empty((y1 - y0, w_lat * f, 3), np.uint8)
            out[:] = bg
            cols = np.flatnonzero(tissue.any(axis=0))
            if not len(cols):
                return out
            ly0, ly1 = y0 // f, -(-y1 // f)
            a, b = _widen(max(0, ly0 - self.side), min(h_lat, ly1 + self.side), h_lat, self.side)
            c, d = _widen(max(0, cols[0] // f - self.side), min(w_lat, -(-(cols[-1] + 1) // f) + self.side), w_lat,
                          self.side)
            # column chunks of whole windows, each decoded with one window of margin on both sides (as the band
            # has above and below): memory holds one chunk's decode, however wide the slide
            step = max(1, DECODE_CHUNK_PX // (f * self.side)) * self.side
            for k0 in range(c, d, step):
                k1 = min(d, k0 + step)
                e0, e1 = _widen(max(c, k0 - self.side), min(d, k1 + self.side), w_lat, self.side)
                lat = torch.from_numpy(reader.crop(a, b, e0, e1))[None].to(self.device)
                with torch.no_grad():
                    img = decode_large(self.m, lat, batch_size=self.cfg.batch_size, stride=self.cfg.decode_stride)
                rows = to_uint8(img[:, :, y0 - f * a:y1 - f * a, f * (k0 - e0):f * (k1 - e0)])[0]
                span = slice(f * k0, f * k1)
                out[:, span] = np.where(tissue[:, span, None], rows, bg)
            return out

        return band, (h_lat * f, w_lat * f)


def _widen(a: int, b: int, size: int, window: int) -> tuple[int, int]:
    """[a, b) grown to at least ``window`` (the decoder's window) inside [0, size)."""
    if b - a >= window:
        return a, b
    b = min(size, a + window)
    return max(0, b - window), b


# ----- the run -----------------------------------------------------------------------------------------------
def _load_model(source, runtime):


    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a model without weights is built from seed 0 (as generate-large)
        return load_zoomldm(source.config, source.weights, use_ema=True, device=runtime.device).eval()


def _model_record(source, model) -> dict:

    return {"config_sha256": file_sha256(source.config), "checkpoint_sha256": file_sha256(source.weights),
            "first_stage_resolution": int(model.first_stage_resolution)}


def generate_slide(cfg: SlideGenConfig, progress=None) -> dict:
    """Generate (or resume) the slide of ``cfg``; returns the record written into the TIFF's description."""

    runtime = resolve_runtime(cfg.device, cfg.precision)
    model = _load_model(cfg.zoomldm, runtime)
    if model.first_stage_resolution // int(model.config.diffusion.image_size) * int(model.config.diffusion.image_size) \
            != model.first_stage_resolution:
        raise ConfigError("the model's first-stage resolution is not a multiple of its latent side")
    cdm = encoder = None
    if cfg.cdm is not None:  # refused (one line) before anything is written
        cdm = load_checked(model, cfg.cdm, cfg.levels[0], runtime.device)
        encoder = load_conditioner(cfg.conditions, model.conditioning_dim).to(runtime.device).eval()
        source, rows0, cols0 = drawn_layout(model, cfg, cdm)
    else:
        source, rows0, cols0 = _cached_source(model, cfg, runtime)
    record = {"settings": cfg.record(), "model": _model_record(cfg.zoomldm, model),
              "source_slide": source.record if cdm is None else None,
              "seeds": "SeedSequence([seed, level, row, col]) per unit, level 0 the coarsest",
              "patch_px_20x": int(model.first_stage_resolution), "parts_version": PARTS_VERSION,
              **({"drawn": source.record} if cdm is not None else {})}
    parts = Parts(cfg.parts, record)
    levels = build_levels(cfg.levels, rows0, cols0)
    cascade = Cascade(model, cfg, source, levels, parts, runtime)
    units = 1 + sum(lv.n_regions[0] * lv.n_regions[1] for lv in levels[1:])
    done = 0
    if cdm is not None:
        cascade.draw(cdm)
    cascade.coarsest()
    done += 1
    if progress:
        progress(done, units)
    for level in levels[1:]:
        if encoder is not None:
            cascade.embed_level(level, encoder)
        for i in range(level.n_regions[0]):
            for j in range(level.n_regions[1]):
                cascade.region(level, i, j)
                done += 1
                if progress:
                    progress(done, units)
    band, (h, w) = cascade.band_source()
    meta = {"generator": "zoomfeat generate-slide", **record}
    write_pyramid_streamed(cfg.out, h, w, band, mpp=source.mpp20, magnification=CONDITIONING_MAG, metadata=meta,
                           settings=PyramidSettings(cfg.tile, cfg.compression, cfg.quality))
    if not cfg.keep_parts:
        shutil.rmtree(cfg.parts, ignore_errors=True)
    return {**meta, "size_px": [h, w], "units": units}


def _cached_source(model, cfg: SlideGenConfig, runtime) -> tuple[Source, int, int]:
    """:func:`read_source`, kept in ``<out>.parts/`` so a resumed run reads no tile: the embedding grid in
    ``source_grid.npy``, the rest in ``source.npz`` (written last: its key vouches for the grid)."""
    folder = cfg.parts
    cache, grid = folder / "source.npz", folder / "source_grid.npy"
    key = json.dumps({"slide": str(Path(cfg.conditions.slide).resolve()), "settings": cfg.record()}, sort_keys=True)
    if cache.exists() and grid.exists():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                meta = json.loads(str(z["meta"]))
                src = Source(grid, z["mask"], tuple(meta["mask_scale"]), tuple(meta["origin"]),
                             meta["tile0"], meta["mpp20"], tuple(meta["background"]), meta["record"])
                return src, meta["rows0"], meta["cols0"]
    folder.mkdir(parents=True, exist_ok=True)
    source, rows0, cols0 = read_source(model, cfg, runtime, grid)
    meta = {k: v for k, v in asdict(source).items() if k not in ("grid", "mask")}
    meta.update(rows0=rows0, cols0=cols0)
    with atomic_write(cache) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, mask=source.mask, key=np.array(key), meta=np.array(json.dumps(meta)))
    return source, rows0, cols0
