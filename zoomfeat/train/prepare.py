"""``prepare_training_set``: slides -> a ZoomLDM training set of first-stage latents and conditioning grids.

Layout under ``OUT`` (format ``zoomfeat-trainset`` version 1):

- ``shards/<slide_id>.h5``, one per slide, written to a temporary name and renamed when complete. Root attrs
  ``format``, ``format_version``, ``slide_id``, ``slide_path``, ``fingerprint`` (JSON size/mtime), ``settings``
  (JSON of what the content depends on) and ``complete`` = True last. One group per magnification (``"5x"``):
  ``coords`` int64 [N, 2] level-0 patch corners, ``latents`` float16 [N, z, h, w] (pre-quantisation first-stage
  latents, [3, 64, 64] for the released model), ``grids`` float16 [N, C, g, g] raw conditioning grids of the
  patch's 20x tiles (not standardised; ``g = min(grid_width, grid_pool_to)``, wider grids average-pooled).
  Chunks are one sample, so random reads touch one chunk.
- ``index.h5``: attrs (format, mags, latent_shape, grid_channels, grid_pool_to, grid_storage, conditioner,
  zoomldm_config, counts JSON), datasets ``shards`` / ``slide_ids`` (strings), ``counts`` int64 [S, 8] (columns:
  20x ... 0.15625x), and per magnification a group with ``shard`` int32 [N], ``row`` int64 [N], ``coords``.
- ``prepare_config.json``: the settings of the last run; ``first_stage.pt``: the first-stage weights
  (``first_stage_model.*`` without the prefix) that encoded the latents, so training decodes with the same
  ones; its digest is the index attr ``first_stage_digest``.

A slide whose complete shard exists with the same fingerprint and settings is skipped (resumable).
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoomfeat.config import save_config, to_jsonable
from zoomfeat.errors import DataError
from zoomfeat.mags import MAGNIFICATIONS, PATCH_SIZE, grid_width, mag_name
from zoomfeat.train.config import PrepareConfig, resolve_zoomldm_config

SHARD_FORMAT = "zoomfeat-trainshard"
INDEX_FORMAT = "zoomfeat-trainset"
FORMAT_VERSION = 1
INDEX_NAME = "index.h5"
FIRST_STAGE_NAME = "first_stage.pt"  # the first-stage state_dict the latents were made with
GRID_STORAGE = "raw (unstandardised) grids of 20x-tile embeddings; grids wider than grid_pool_to average-pooled to it"


@dataclass(frozen=True)
class PrepareReport:
    """Outcome of one ``prepare-train`` run: patch counts per magnification over the whole set."""

    out: Path
    counts: dict[str, int]
    n_shards: int
    exit_code: int


def shard_path(out: Path, slide_id: str) -> Path:
    return Path(out) / "shards" / f"{slide_id}.h5"


def fingerprint(slide_path: Path) -> str:
    st = Path(slide_path).stat()
    return json.dumps({"path": str(Path(slide_path).resolve()), "size": st.st_size, "mtime": int(st.st_mtime)})


def content_settings(cfg: PrepareConfig, conditioner_dim: int, first_stage: str,
                     slide_kwargs: dict | None = None) -> str:
    """JSON of everything a shard's content depends on (a change redoes the slide); the base-mag/mpp
    overrides are included only when given, so sets prepared without them stay current."""
    extra = {k: v for k, v in (slide_kwargs or {}).items() if v is not None}
    return json.dumps(to_jsonable({**extra,
        "conditioner": cfg.conditioner, "conditioner_weights": cfg.conditioner_weights,
        "conditioner_dim": conditioner_dim, "zoomldm": resolve_zoomldm_config(cfg.zoomldm),
        "zoomldm_weights": cfg.zoomldm_weights, "mags": [mag_name(m) for m in cfg.mags],
        "max_patches_per_mag": cfg.max_patches_per_mag, "seed": cfg.seed, "grid_pool_to": cfg.grid_pool_to,
        "first_stage_digest": first_stage,
    }), sort_keys=True)


def shard_is_current(path: Path, slide_path: Path, settings: str) -> bool:
    """True when ``path`` is a complete shard of this slide file made with these settings."""
    import h5py

    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            return bool(a.get("complete", False)) and a.get("fingerprint") == fingerprint(slide_path) \
                and a.get("settings") == settings
    except OSError:
        return False


def subsample_rows(n: int, limit: int | None, seed: int, slide_id: str, mag: float) -> np.ndarray:
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


def _coords_by_mag(slide, mags: tuple[float, ...], cfg: PrepareConfig) -> dict[str, np.ndarray]:
    """Tissue-grid patch corners per magnification; mags whose tile is larger than the slide give none."""
    from zoomfeat.tiling import make_grid

    info = slide.info
    fits = tuple(m for m in mags if PATCH_SIZE * slide.downsample(m) <= min(info.width, info.height))
    coords = {mag_name(m): np.zeros((0, 2), dtype=np.int64) for m in mags}
    if not fits:
        return coords
    grid = make_grid(slide, fits)
    for m in fits:
        c = np.asarray(grid.coords[mag_name(m)], dtype=np.int64).reshape(-1, 2)
        coords[mag_name(m)] = c[subsample_rows(len(c), cfg.max_patches_per_mag, cfg.seed, info.slide_id, m)]
    return coords


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
        from zoomfeat.slides import Slide

        path = shard_path(self.cfg.out, Path(slide_path).stem)
        if shard_is_current(path, slide_path, self.settings):
            return "skipped"
        with Slide(slide_path, **self.slide_kwargs) as slide:
            coords = _coords_by_mag(slide, self.cfg.mags, self.cfg)
            base_mag = slide.info.base_magnification
            slide_id = slide.info.slide_id
        self._write(path, slide_path, slide_id, coords, base_mag)
        return "done"

    def _write(self, path: Path, slide_path: Path, slide_id: str, coords: dict[str, np.ndarray],
               base_mag: float) -> None:
        import h5py

        from zoomfeat.conditioning import ConditioningGrids

        cfg = self.cfg
        grids = ConditioningGrids(slide_path, coords, self.encoder, cfg.batch_size, cfg.workers, cfg.device,
                                  base_mag=base_mag, slide_kwargs=self.slide_kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs.update({"format": SHARD_FORMAT, "format_version": FORMAT_VERSION, "slide_id": slide_id,
                                "slide_path": str(slide_path), "fingerprint": fingerprint(slide_path),
                                "settings": self.settings, "base_magnification": float(base_mag)})
                for name, c in coords.items():
                    self._write_mag(f.create_group(name), slide_path, name, c, grids)
                f.flush()
                f.attrs["complete"] = True
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _write_mag(self, group, slide_path: Path, name: str, coords: np.ndarray, grids) -> None:
        from zoomfeat.patches import TilePatchDataset, patch_loader

        n, g = len(coords), min(grid_width(name), self.cfg.grid_pool_to)
        group.attrs.update({"magnification": float(name[:-1]), "grid_width": grid_width(name), "grid_stored": g})
        group.create_dataset("coords", data=coords.astype(np.int64))
        lat = group.create_dataset("latents", shape=(n, *self.latent_shape), dtype=np.float16,
                                   chunks=(1, *self.latent_shape) if n else None)
        grid_shape = (grids.dim, g, g)
        grd = group.create_dataset("grids", shape=(n, *grid_shape), dtype=np.float16,
                                   chunks=(1, *grid_shape) if n else None)
        if n == 0:
            return
        dataset = TilePatchDataset(slide_path, coords, float(name[:-1]), size=PATCH_SIZE, **self.slide_kwargs)
        for rows, images in patch_loader(dataset, self.cfg.batch_size, self.cfg.workers):
            rows = rows.numpy()
            order = np.argsort(rows)
            rows = rows[order]
            lat[rows] = self.first_stage(images[order])
            grd[rows] = grids.grid(name, rows, pool_to=self.cfg.grid_pool_to).astype(np.float16)


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
    tmp = out / f".{FIRST_STAGE_NAME}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, out / FIRST_STAGE_NAME)
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
        encoder = load_encoder("uni", cfg.conditioner_weights)
    return model, encoder.to(cfg.device).eval()


def prepare_training_set(cfg: PrepareConfig) -> PrepareReport:
    """Write (or complete) the training set under ``cfg.out``; returns the per-magnification counts.
    ``cfg.base_mag`` / ``cfg.mpp`` override the slides' metadata in every reader (tiling, conditioning, latents)."""
    from zoomfeat.batch import run_batch
    from zoomfeat.slides import find_slides

    overrides = {"base_mag": cfg.base_mag, "mpp": cfg.mpp}
    slides = find_slides(cfg.slides)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "prepare_config.json")
    model, encoder = _load_models(cfg)
    digest = _save_first_stage(model, out)
    settings = content_settings(cfg, int(encoder.spec.dim), digest, overrides)
    writer = SlideShardWriter(cfg, FirstStageEncoder(model, cfg.device), encoder, settings, overrides)
    batch = run_batch(slides, out, writer, desc="prepare-train")
    counts, n_shards = write_index(out, settings=settings, conditioner=cfg.conditioner,
                                   zoomldm_config=str(resolve_zoomldm_config(cfg.zoomldm)),
                                   grid_pool_to=cfg.grid_pool_to, first_stage=digest)
    print("patches per magnification: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return PrepareReport(out=out, counts=counts, n_shards=n_shards, exit_code=int(batch.exit_code))


def _complete_shards(out: Path, settings: str | None) -> list[Path]:
    import h5py

    shards = []
    for p in sorted((out / "shards").glob("*.h5")):
        with h5py.File(p, "r") as f:
            if f.attrs.get("complete", False) and (settings is None or f.attrs.get("settings") == settings):
                shards.append(p)
    return shards


def _shard_entries(path: Path):
    """(slide_id, {mag: coords}, latent_shape, grid_channels) of one complete shard."""
    import h5py

    with h5py.File(path, "r") as f:
        coords = {name: f[name]["coords"][()] for name in f.keys()}
        shapes = {(f[n]["latents"].shape[1:], f[n]["grids"].shape[1]) for n in f.keys() if len(f[n]["coords"])}
        return str(f.attrs["slide_id"]), coords, shapes


def write_index(out: str | Path, *, settings: str | None = None, conditioner: str = "",
                zoomldm_config: str = "", grid_pool_to: int = 8, first_stage: str = "") -> tuple[dict[str, int], int]:
    """Rebuild ``OUT/index.h5`` from the complete shards (those made with ``settings`` when given)."""
    import h5py

    out = Path(out)
    shards = _complete_shards(out, settings)
    names = [mag_name(m) for m in MAGNIFICATIONS]
    counts = np.zeros((len(shards), len(names)), dtype=np.int64)
    per_mag: dict[str, list[tuple[int, np.ndarray]]] = {n: [] for n in names}
    shapes: set = set()
    slide_ids = []
    for s, path in enumerate(shards):
        slide_id, coords, shard_shapes = _shard_entries(path)
        slide_ids.append(slide_id)
        shapes |= shard_shapes
        for name, c in coords.items():
            counts[s, names.index(name)] = len(c)
            per_mag[name].append((s, c))
    if len(shapes) > 1:
        raise DataError(f"shards under {out / 'shards'} disagree on latent/grid shapes {sorted(shapes)}: "
                        "delete the shards made with other settings and rerun prepare-train")
    latent_shape, grid_channels = next(iter(shapes)) if shapes else ((), 0)
    totals = {n: int(counts[:, i].sum()) for i, n in enumerate(names)}
    tmp = out / f".{INDEX_NAME}.tmp{os.getpid()}"
    with h5py.File(tmp, "w") as f:
        f.attrs.update({"format": INDEX_FORMAT, "format_version": FORMAT_VERSION, "mags": json.dumps(names),
                        "latent_shape": json.dumps(list(latent_shape)), "grid_channels": int(grid_channels),
                        "grid_pool_to": int(grid_pool_to), "grid_storage": GRID_STORAGE,
                        "conditioner": conditioner, "zoomldm_config": zoomldm_config,
                        "counts": json.dumps(totals), "first_stage_digest": first_stage})
        f.create_dataset("shards", data=np.array([p.name for p in shards], dtype=object),
                         dtype=h5py.string_dtype())
        f.create_dataset("slide_ids", data=np.array(slide_ids, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("counts", data=counts)
        for name, entries in per_mag.items():
            g = f.create_group(name)
            g.create_dataset("shard", data=np.concatenate(
                [np.full(len(c), s, np.int32) for s, c in entries] + [np.zeros(0, np.int32)]))
            g.create_dataset("row", data=np.concatenate(
                [np.arange(len(c), dtype=np.int64) for _, c in entries] + [np.zeros(0, np.int64)]))
            g.create_dataset("coords", data=np.concatenate(
                [c.reshape(-1, 2) for _, c in entries] + [np.zeros((0, 2), np.int64)]).astype(np.int64))
    os.replace(tmp, out / INDEX_NAME)
    return totals, len(shards)
