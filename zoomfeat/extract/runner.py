"""The slides loop of ``zoomfeat extract``: resume/skip, shard, per-slide errors, progress and summary.

Per slide: the tile grid (from ``--tiles`` or made on the fly), the conditioning grids (read back from
``--conditioning``, or from this run's own complete conditioning file, else computed once), then one
streamed pass per magnification through the featurizer into a temporary HDF5 file renamed on commit.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zoomfeat.config import to_jsonable, write_json_atomic
from zoomfeat.errors import ConfigError, DataError, SlideError
from zoomfeat.extract.config import CONFIG_NAME, ExtractConfig
from zoomfeat.extract.loading import Networks, load_networks
from zoomfeat.extract.runtime import Runtime, resolve_runtime
from zoomfeat.mags import PATCH_SIZE, mag_name


@dataclass
class ExtractStats:
    """Counters for the end-of-run summary."""

    patches: int = 0
    seconds: float = 0.0
    per_slide: dict[str, int] = field(default_factory=dict)


def distributed_shard(shard: str | None) -> tuple[str | None, int | None]:
    """(shard, local_rank): under torchrun/SLURM-style env (``WORLD_SIZE`` > 1, ``RANK``) without an explicit
    ``--shard``, rank r of world w processes shard r/w on GPU ``LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return shard, None
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return (shard if shard is not None else f"{rank}/{world}"), local


def restrict_grid(grid, names: tuple[str, ...], source: Path):
    """The part of a tile grid at the requested magnifications (parents kept among them)."""
    from zoomfeat.tiling import TileGrid

    missing = [n for n in names if n not in grid.coords]
    if missing:
        raise DataError(f"tile store {source} has no {missing[0]} tiles: re-run `zoomfeat tile` with "
                        f"--mags {','.join(names)} or drop --tiles")
    mags = tuple(m for m in grid.mags if mag_name(m) in names)
    parents = {n: {p: a for p, a in grid.parents.get(n, {}).items() if p in names} for n in names}
    return TileGrid(mags=mags, coords={n: grid.coords[n] for n in names}, parents=parents,
                    patch_size_level0={n: grid.patch_size_level0[n] for n in names})


def slide_grid(slide, cfg: ExtractConfig):
    """TileGrid of one slide at ``cfg.mags``: read from ``cfg.tiles_dir`` or made with the same rules."""
    from zoomfeat.store import h5_path, is_complete, read_grid
    from zoomfeat.tiling import make_grid
    from zoomfeat.tissue import TissueParams

    if cfg.tiles_dir is None:
        return make_grid(slide, cfg.mags, TissueParams(min_tissue=cfg.min_tissue))
    path = h5_path(cfg.tiles_dir, slide.info.slide_id)
    if not is_complete(path):
        raise SlideError(f"no complete tile store {path}: run `zoomfeat tile` for this slide or drop --tiles")
    return restrict_grid(read_grid(path), cfg.mag_names, path)


class SlideExtractor:
    """Extracts one slide at a time with networks loaded once."""

    def __init__(self, cfg: ExtractConfig, networks: Networks, runtime: Runtime, stats: ExtractStats):
        self.cfg, self.net, self.runtime, self.stats = cfg, networks, runtime, stats

    def out_path(self, slide_id: str) -> Path:
        from zoomfeat.store import h5_path

        return h5_path(self.cfg.out_dir, slide_id)

    def cond_path(self, slide_id: str) -> Path | None:
        from zoomfeat.store import h5_path

        return h5_path(self.cfg.conditioning_out_dir(), slide_id) if self.cfg.writes_conditioning() else None

    def is_done(self, slide_path: Path, slide_id: str) -> bool:
        from zoomfeat.store import is_complete

        cond = self.cond_path(slide_id)
        return is_complete(self.out_path(slide_id), slide_path) and (cond is None or is_complete(cond, slide_path))

    def __call__(self, slide_path: Path) -> str:
        """Process one slide; "skipped" when its complete files exist (fingerprint checked), else "done"."""
        from zoomfeat.slides import Slide, slide_id_of

        slide_id = slide_id_of(slide_path)
        if self.is_done(Path(slide_path), slide_id):
            return "skipped"
        with Slide(slide_path, **self.cfg.slide_kwargs) as slide:
            info = slide.info
            grid = slide_grid(slide, self.cfg)
        bar = _progress_bar(info.slide_id, sum(len(c) for c in grid.coords.values()))
        try:
            cond = self._conditioning(Path(slide_path), info, grid, bar)
            self._write_features(Path(slide_path), info, grid, cond, bar)
        finally:
            bar.close()
        return "done"

    def _conditioning(self, slide_path: Path, info, grid, bar):
        from zoomfeat.extract import conditioning_io as cio

        if not self.cfg.is_zoomldm:
            return None
        if info.base_magnification < 20.0:
            raise SlideError(f"{slide_path}: base magnification {info.base_magnification:g}x is below 20x, but "
                             "ZoomLDM is conditioned on 20x tiles: pass the right --base-mag/--mpp or skip this slide")
        coords = {n: grid.coords[n] for n in self.cfg.mag_names}
        dim = self.net.featurizer.model.conditioning_dim
        if self.cfg.conditioning_dir is not None:
            return cio.read_conditioning(self.cfg.conditioning_dir, info, coords, dim)
        path = self.cond_path(info.slide_id)
        if cio.is_reusable(path, slide_path, self.net.conditioning_config):
            return cio.read_conditioning(path.parent, info, coords, dim)
        from zoomfeat.conditioning import ConditioningGrids

        cond = ConditioningGrids(slide_path, coords, self.net.conditioner, self.cfg.batch_size, self.cfg.workers,
                                 self.runtime.device, base_mag=info.base_magnification,
                                 slide_kwargs=self.cfg.slide_kwargs, autocast=self.runtime.autocast(),
                                 progress=lambda n: bar.set_postfix_str(f"conditioning +{n}", refresh=False))
        cio.write_conditioning(path, info, grid, cond, self.net.conditioning_config)
        return cond

    def _write_features(self, slide_path: Path, info, grid, cond, bar) -> None:
        from zoomfeat.store import TileStoreWriter

        with TileStoreWriter(self.out_path(info.slide_id), info, grid, extractor=self.net.extractor,
                             extractor_config=self.net.extractor_config,
                             feature_dim=self.net.featurizer.dim) as writer:
            for mag in self.cfg.mags:
                self._extract_mag(slide_path, info, grid, mag, cond, writer, bar)
            writer.commit()

    def _extract_mag(self, slide_path: Path, info, grid, mag: float, cond, writer, bar) -> None:
        from zoomfeat.patches import TilePatchDataset, patch_loader

        name = mag_name(mag)
        coords = grid.coords[name]
        if len(coords) == 0:
            return
        dataset = TilePatchDataset(slide_path, coords, mag, size=PATCH_SIZE, **self.cfg.slide_kwargs)
        try:
            for rows, images in patch_loader(dataset, self.cfg.batch_size, self.cfg.workers):
                rows = rows.numpy()
                grids = cond.grid(name, rows, pool_to=8) if cond is not None else None
                feats = self.net.featurizer(images, grids, mag, name, coords[rows], info.slide_id)
                for start, stop in _contiguous_runs(rows):
                    writer.write_features(name, int(rows[start]), feats[start:stop])
                bar.update(len(rows))
                self.stats.patches += len(rows)
        finally:
            dataset.close()


def _contiguous_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) positions of runs of consecutive row indices (a DataLoader yields one run per batch)."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    edges = [0, *breaks.tolist(), len(rows)]
    return list(zip(edges[:-1], edges[1:]))


def _progress_bar(slide_id: str, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=slide_id, unit="patch", leave=False, disable=None, file=sys.stderr)


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the values that differ between two JSON records (nested one dict deep or more)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def check_out_dir(cfg: ExtractConfig, networks: Networks) -> None:
    """Save the config in the out dir; refuse an out dir that holds features made with other settings."""
    record = {"extractor": networks.extractor, "extractor_config": networks.extractor_config,
              "min_tissue": cfg.min_tissue, "base_mag": cfg.base_mag, "mpp": cfg.mpp,
              "tiles_dir": str(cfg.tiles_dir) if cfg.tiles_dir else None}
    path = Path(cfg.out_dir) / CONFIG_NAME
    if path.is_file():
        try:
            old = json.loads(path.read_text()).get("features", {})
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ConfigError(f"{path} is not valid JSON: delete it or use another --out") from exc
        if old and to_jsonable(old) != to_jsonable(record):
            changed = _changed_keys(old, to_jsonable(record))
            raise ConfigError(f"{cfg.out_dir} holds features made with other settings ({', '.join(changed)}): "
                              "use a new --out or the same settings")
    write_json_atomic(path, {"config": cfg, "features": record})


def extract(cfg: ExtractConfig, slides: list[str | Path]) -> int:
    """Run extraction over ``slides`` (files or folders); returns the exit code (1 if any slide failed)."""
    from zoomfeat.batch import run_batch, shard_slides
    from zoomfeat.slides import find_slides

    shard, local_rank = distributed_shard(cfg.shard)
    paths = shard_slides(find_slides(slides), shard)
    runtime = resolve_runtime(cfg.device, cfg.precision, local_rank)
    networks = load_networks(cfg, runtime)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    check_out_dir(cfg, networks)
    stats = ExtractStats()
    start = time.perf_counter()
    report = run_batch(paths, cfg.out_dir, SlideExtractor(cfg, networks, runtime, stats), desc="extract")
    stats.seconds = time.perf_counter() - start
    rate = stats.patches / stats.seconds if stats.seconds > 0 else 0.0
    print(f"extract: {stats.patches} patches in {stats.seconds:.1f} s ({rate:.1f} patches/s) on "
          f"{runtime.device} ({runtime.precision}); features in {cfg.out_dir}", file=sys.stderr)
    return report.exit_code


__all__ = ["ExtractStats", "SlideExtractor", "extract", "restrict_grid"]
