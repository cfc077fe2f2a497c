"""``prepare_training_set``: slides -> a ZoomLDM training set of first-stage latents and conditioning grids.

The on-disk format (``shards/<slide_id>.h5``, ``index.h5``) is a store module:
:mod:`zoomfeat.store.trainset` documents and writes it. Beside them: ``prepare_config.json`` (the settings of
the last run) and ``first_stage.pt`` (the first-stage weights, ``first_stage_model.*`` without the prefix, that
encoded the latents, so training decodes with the same ones; its digest is the index attr
``first_stage_digest``). Patches come from the one tile-grid function (:func:`zoomfeat.store.slide_tile_grid`)
with the same tissue flags as ``tile`` and ``extract``.

A slide whose complete shard exists with the same fingerprint and settings is skipped (resumable).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoomfeat.batch import run_batch
from zoomfeat.conditioning import ConditioningGrids
from zoomfeat.config import save_config
from zoomfeat.mags import PATCH_SIZE, MagDict, Magnification, mag_name
from zoomfeat.serial import to_jsonable
from zoomfeat.slides import Slide, find_slides
from zoomfeat.store import atomic_write, check_output_folder, slide_tile_grid
from zoomfeat.store.trainset import (FORMAT_VERSION, INDEX_FORMAT, INDEX_NAME, SHARD_FORMAT,  # noqa: F401
                                     ShardWriter, shard_is_current, shard_path, write_index)
from zoomfeat.train.config import PrepareConfig, resolve_zoomldm_config
from zoomfeat.tissue import TissueParams

FIRST_STAGE_NAME = "first_stage.pt"  # the first-stage state_dict the latents were made with
RECORD_NAME = "trainset.json"  # what the shards' content depends on (a folder made otherwise is refused)


@dataclass(frozen=True)
class PrepareReport:
    """Outcome of one ``prepare-train`` run: patch counts per magnification over the whole set."""

    out: Path
    counts: dict[str, int]
    n_shards: int
    exit_code: int


def content_settings(cfg: PrepareConfig, conditioner_dim: int, first_stage: str,
                     slide_kwargs: dict | None = None) -> str:
    """JSON of everything a shard's content depends on (a change redoes the slide); the base-mag/mpp
    overrides are included only when given, so sets prepared without them stay current."""
    extra = {k: v for k, v in (slide_kwargs or {}).items() if v is not None}
    if cfg.tissue != TissueParams():
        extra["tissue"] = cfg.tissue
    return json.dumps(to_jsonable({**extra,
        "conditioner": cfg.conditioner, "conditioner_weights": _absolute(cfg.conditioner_weights),
        "conditioner_dim": conditioner_dim, "zoomldm": resolve_zoomldm_config(cfg.zoomldm),
        "zoomldm_weights": _absolute(cfg.zoomldm_weights), "mags": [mag_name(m) for m in cfg.mags],
        "max_patches_per_mag": cfg.max_patches_per_mag, "seed": cfg.seed, "grid_pool_to": cfg.grid_pool_to,
        "first_stage_digest": first_stage,
    }), sort_keys=True)


def _absolute(path: Path | None) -> Path | None:
    """A weight file's absolute path: the same file named from another working directory is the same setting."""
    return None if path is None else Path(path).resolve()


def subsample_rows(n: int, limit: int | None, seed: int, slide_id: str, mag: Magnification) -> np.ndarray:
    """Sorted rows kept at one magnification: all, or ``limit`` drawn reproducibly per (seed, slide, mag)."""
    if limit is None or n <= limit:
        return np.arange(n, dtype=np.int64)
    key = zlib.crc32(f"{seed}:{slide_id}:{mag_name(mag)}".encode())
    rng = np.random.default_rng(key)
    return np.sort(rng.choice(n, size=limit, replace=False)).astype(np.int64)


class FirstStageEncoder:
    """Patches uint8 [B, 3, 256, 256] -> first-stage latents float16 [B, z, h, w] with a (frozen) ZoomLDM."""

    def __init__(self, model, device: str):
        self.model = model
        self.device = device
        self.resolution = int(model.first_stage_resolution)

    def __call__(self, images):
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            x = images.to(self.device).float() / 127.5 - 1.0
            if x.shape[-1] != self.resolution:
                x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                                  antialias=True, align_corners=False)
            return self.model.encode_first_stage(x).to(torch.float16).cpu().numpy()


def _latent_shape(first_stage: FirstStageEncoder) -> tuple[int, ...]:
    import torch

    return tuple(first_stage(torch.full((1, 3, PATCH_SIZE, PATCH_SIZE), 255, dtype=torch.uint8)).shape[1:])


def _coords_by_mag(slide, mags: tuple[Magnification, ...], cfg: PrepareConfig) -> MagDict:
    """Tissue-grid patch corners per magnification; mags whose tile is larger than the slide give none."""
    grid = slide_tile_grid(slide, mags, cfg.tissue, drop_larger_than_slide=True)
    return MagDict({mag: np.asarray(c, np.int64).reshape(-1, 2)[
                subsample_rows(len(c), cfg.max_patches_per_mag, cfg.seed, slide.info.slide_id, mag)]
            for mag, c in grid.coords.items()})


class SlideShardWriter:
    """Writes one slide's shard: per magnification, latents and grids streamed in batches."""

    def __init__(self, cfg: PrepareConfig, first_stage: FirstStageEncoder, encoder, settings: str,
                 slide_kwargs: dict | None = None):
        self.cfg = cfg
        self.slide_kwargs = dict(slide_kwargs or {})  # base_mag / mpp overrides for every slide reader
        self.first_stage = first_stage
        self.encoder = encoder
        self.settings = settings
        self.latent_shape = _latent_shape(first_stage)

    def __call__(self, slide_path: Path) -> str:
        path = shard_path(self.cfg.out, Path(slide_path).stem)
        if shard_is_current(path, slide_path, self.settings):
            return "skipped"
        with Slide(slide_path, **self.slide_kwargs) as slide:
            coords = _coords_by_mag(slide, self.cfg.mags, self.cfg)
            base_mag = slide.info.base_magnification
            slide_id = slide.info.slide_id
        self._write(path, slide_path, slide_id, coords, base_mag)
        return "done"

    def _write(self, path: Path, slide_path: Path, slide_id: str, coords: MagDict,
               base_mag: float) -> None:
        cfg = self.cfg
        grids = ConditioningGrids(slide_path, coords, self.encoder, cfg.batch_size, cfg.workers, cfg.device,
                                  base_mag=base_mag, slide_kwargs=self.slide_kwargs)
        with ShardWriter(path, slide_id, slide_path, self.settings, base_mag) as shard:
            for mag, c in coords.items():
                self._write_mag(shard, slide_path, mag, c, grids)
            shard.commit()

    def _write_mag(self, shard: ShardWriter, slide_path: Path, mag: Magnification, coords: np.ndarray,
                   grids) -> None:
        from zoomfeat.patches import TilePatchDataset, patch_loader

        g = min(mag.grid_width, self.cfg.grid_pool_to)
        writer = shard.add_mag(mag, coords, self.latent_shape, (grids.dim, g, g))
        if len(coords) == 0:
            return
        dataset = TilePatchDataset(slide_path, coords, mag, size=PATCH_SIZE, **self.slide_kwargs)
        for rows, images in patch_loader(dataset, self.cfg.batch_size, self.cfg.workers):
            rows = rows.numpy()
            order = np.argsort(rows)
            rows = rows[order]
            writer.write(rows, self.first_stage(images[order]),
                         grids.grid(mag, rows, pool_to=self.cfg.grid_pool_to).astype(np.float16))


def first_stage_digest(model) -> str:
    """sha256 over the first stage's tensors (names, shapes, float32 bytes): which encoder made the latents."""
    import hashlib

    h = hashlib.sha256()
    for name, value in sorted(model.first_stage_model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _save_first_stage(model, out: Path) -> str:
    import torch

    state = {k: v.detach().cpu() for k, v in model.first_stage_model.state_dict().items()}
    with atomic_write(out / FIRST_STAGE_NAME) as tmp:
        torch.save(state, tmp)
    return first_stage_digest(model)


def _load_models(cfg: PrepareConfig):
    import torch

    from zoomfeat.encoders import load_encoder
    from zoomfeat.model import load_zoomldm

    torch.manual_seed(cfg.seed)  # a random first stage (no weights: tests, demo) is reproducible
    source = cfg.zoomldm if Path(cfg.zoomldm).is_dir() else resolve_zoomldm_config(cfg.zoomldm)
    model = load_zoomldm(source, cfg.zoomldm_weights, use_ema=False, device=cfg.device)
    model.eval()
    if cfg.conditioner == "toy":
        encoder = load_encoder("toy", dim=cfg.conditioner_dim or int(model.conditioning_dim), seed=cfg.seed)
    else:
        encoder = load_encoder(cfg.conditioner, cfg.conditioner_weights)
    return model, encoder.to(cfg.device).eval()


def prepare_training_set(cfg: PrepareConfig) -> PrepareReport:
    """Write (or complete) the training set under ``cfg.out``; returns the per-magnification counts.
    ``cfg.base_mag`` / ``cfg.mpp`` override the slides' metadata in every reader (tiling, conditioning, latents)."""
    overrides = {"base_mag": cfg.base_mag, "mpp": cfg.mpp}
    slides = find_slides(cfg.slides)
    out = Path(cfg.out)
    model, encoder = _load_models(cfg)
    settings = content_settings(cfg, int(encoder.spec.dim), first_stage_digest(model), overrides)
    check_output_folder(out, "--out", json.loads(settings), RECORD_NAME, section="content")
    save_config(cfg, out / "prepare_config.json")
    digest = _save_first_stage(model, out)
    writer = SlideShardWriter(cfg, FirstStageEncoder(model, cfg.device), encoder, settings, overrides)
    batch = run_batch(slides, out, writer, desc="prepare-train")
    counts, n_shards = write_index(out, settings=settings, conditioner=cfg.conditioner,
                                   zoomldm_config=str(resolve_zoomldm_config(cfg.zoomldm)),
                                   grid_pool_to=cfg.grid_pool_to, first_stage=digest)
    print("patches per magnification: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return PrepareReport(out=out, counts=counts, n_shards=n_shards, exit_code=int(batch.exit_code))
