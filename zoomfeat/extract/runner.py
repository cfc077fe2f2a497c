"""The slides loop of ``zoomfeat extract``: resume/skip, shard, per-slide errors, progress and summary.

Per slide: the tile grid (from ``--tiles`` or made on the fly), the conditioning grids (read back from
``--conditioning``, or from this run's own complete conditioning file, else computed once), then one
streamed pass per magnification through the featurizer into a temporary HDF5 file renamed on commit.
When the conditioning is computed and 20x is requested, the 20x tiles are read once: the conditioning pass
embeds them first and the 20x features are computed from the same batches of pixels.
Several devices or nodes: :mod:`zoomfeat.extract.distributed` (Lightning Fabric, one slide shard per rank).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zoomfeat.batch import run_batch
from zoomfeat.conditioning import ConditioningStream
from zoomfeat.errors import SlideError
from zoomfeat.extract import conditioning_io as cio, distributed as dist
from zoomfeat.extract.config import CONFIG_NAME, ExtractConfig
from zoomfeat.extract.featurizer import PatchBatch
from zoomfeat.extract.loading import Networks, load_networks
from zoomfeat.mags import CONDITIONING_MAG, PATCH_SIZE, MagDict, Magnification
from zoomfeat.runtime import Runtime, check_devices, on_device, resolve_runtime
from zoomfeat.slides import Slide, find_slides, slide_id_of
from zoomfeat.store import TileStoreWriter, check_output_folder, h5_path, is_complete_with, slide_tile_grid


@dataclass
class ExtractStats:
    """Counters for the end-of-run summary."""

    patches: int = 0
    seconds: float = 0.0
    per_slide: dict[str, int] = field(default_factory=dict)


def slide_grid(slide, cfg: ExtractConfig):
    """TileGrid of one slide at ``cfg.mags``: read from ``cfg.tiles_dir`` or made with the same rules as ``tile``."""
    return slide_tile_grid(slide, cfg.mags, cfg.tissue, cfg.tiles_dir)


class SlideExtractor:
    """Extracts one slide at a time with networks loaded once."""

    def __init__(self, cfg: ExtractConfig, networks: Networks, runtime: Runtime, stats: ExtractStats):
        self.cfg, self.net, self.runtime, self.stats = cfg, networks, runtime, stats

    def out_path(self, slide_id: str) -> Path:
        return h5_path(self.cfg.out_dir, slide_id)

    def cond_path(self, slide_id: str) -> Path | None:
        return h5_path(self.cfg.conditioning_out_dir(), slide_id) if self.cfg.writes_conditioning() else None

    def is_done(self, slide_path: Path, slide_id: str) -> bool:
        """True when this slide's files are complete, of this slide file, and made with this run's settings.

        A complete file made with other settings (another encoder, dimension, checkpoint ...) is never
        overwritten nor taken as done: the slide fails with a message naming the file and what differs."""
        cond = self.cond_path(slide_id)
        return is_complete_with(self.out_path(slide_id), slide_path, self.net.extractor_config) and (
            cond is None or is_complete_with(cond, slide_path, self.net.conditioning_config))

    def __call__(self, slide_path: Path) -> str:
        """Process one slide; "skipped" when its complete files exist (fingerprint checked), else "done"."""
        slide_id = slide_id_of(slide_path)
        if self.is_done(Path(slide_path), slide_id):
            return "skipped"
        with Slide(slide_path, **self.cfg.slide_kwargs) as slide:
            info = slide.info
            grid = slide_grid(slide, self.cfg)
        self._check_base_mag(Path(slide_path), info)
        bar = _progress_bar(info.slide_id, sum(len(c) for c in grid.coords.values()))
        try:
            with TileStoreWriter(self.out_path(info.slide_id), info, grid, extractor=self.net.extractor,
                                 extractor_config=self.net.extractor_config,
                                 feature_dim=self.net.featurizer.dim) as writer:
                cond, fused = self._conditioning(Path(slide_path), info, grid, writer, bar)
                for mag in self.cfg.mags:
                    if mag not in fused:
                        self._extract_mag(Path(slide_path), info, grid, mag, cond, writer, bar)
                writer.commit()
        finally:
            bar.close()
        return "done"

    def _check_base_mag(self, slide_path: Path, info) -> None:
        if self.cfg.is_zoomldm and info.base_magnification < 20.0:
            raise SlideError(f"{slide_path}: base magnification {info.base_magnification:g}x is below 20x, but "
                             "ZoomLDM is conditioned on 20x tiles: pass the right --base-mag/--mpp or skip this slide")

    def _conditioning(self, slide_path: Path, info, grid, writer, bar):
        """(conditioning grids or None, the magnifications whose features are already written)."""
        if not self.cfg.is_zoomldm:
            return None, ()
        coords = MagDict({m: grid.coords[m] for m in self.cfg.mags})
        dim = self.net.featurizer.model.conditioning_dim
        if self.cfg.conditioning_dir is not None:
            return cio.read_conditioning(self.cfg.conditioning_dir, info, coords, dim), ()
        path = self.cond_path(info.slide_id)
        if cio.is_reusable(path, slide_path, self.net.conditioning_config):
            return cio.read_conditioning(path.parent, info, coords, dim), ()
        tile = CONDITIONING_MAG
        first = coords[tile] if tile in coords and len(coords[tile]) > 0 else None
        stream = ConditioningStream(slide_path, coords, self.net.conditioner, self.cfg.batch_size, self.cfg.workers,
                                    self.runtime.device, base_mag=info.base_magnification,
                                    slide_kwargs=self.cfg.slide_kwargs, autocast=self.runtime.autocast(),
                                    progress=lambda n: bar.set_postfix_str(f"conditioning +{n}", refresh=False),
                                    first=first)
        for batch in stream:  # read each 20x tile once: its features come from the same pixels
            grids = batch.embeddings[:, :, None, None]  # the 1 x 1 grid of a 20x patch is its own tile
            self._features_batch(writer, tile, batch.positions, batch.images, grids, info.slide_id, bar)
        cond = stream.finish()
        cio.write_conditioning(path, info, grid, cond, self.net.conditioning_config)
        return cond, ((tile,) if first is not None else ())

    def _features_batch(self, writer, mag: Magnification, rows: np.ndarray, images, grids, slide_id: str,
                        bar) -> None:
        """Features of one batch of patches (rows of ``mag``'s coords, in order) streamed into ``writer``."""
        coords = writer.grid.coords[mag]
        feats = self.net.featurizer(PatchBatch(images, mag, coords[rows], slide_id, grids))
        for start, stop in contiguous_runs(rows):
            writer.write_features(mag, int(rows[start]), feats[start:stop])
        bar.update(len(rows))
        self.stats.patches += len(rows)

    def _extract_mag(self, slide_path: Path, info, grid, mag: Magnification, cond, writer, bar) -> None:
        from zoomfeat.patches import TilePatchDataset, patch_loader

        coords = grid.coords[mag]
        if len(coords) == 0:
            return
        dataset = TilePatchDataset(slide_path, coords, mag, size=PATCH_SIZE, **self.cfg.slide_kwargs)
        try:
            for rows, images in patch_loader(dataset, self.cfg.batch_size, self.cfg.workers):
                rows = rows.numpy()
                grids = cond.grid(mag, rows, pool_to=8) if cond is not None else None
                self._features_batch(writer, mag, rows, images, grids, info.slide_id, bar)
        finally:
            dataset.close()


def contiguous_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) positions of runs of consecutive row indices (a DataLoader yields one run per batch)."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    edges = [0, *breaks.tolist(), len(rows)]
    return list(zip(edges[:-1], edges[1:]))


def _progress_bar(slide_id: str, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=slide_id, unit="patch", leave=False, disable=None, file=sys.stderr)


def out_record(cfg: ExtractConfig, networks: Networks) -> dict:
    """What the features of ``--out`` depend on (saved in ``<out>/extract_config.json``, compared on reruns)."""
    return {"extractor": networks.extractor, "extractor_config": networks.extractor_config,
            "tissue": cfg.tissue, "base_mag": cfg.base_mag, "mpp": cfg.mpp,
            "tiles_dir": str(cfg.tiles_dir) if cfg.tiles_dir else None}


def conditioning_record(cfg: ExtractConfig, networks: Networks) -> dict:
    """What the conditioning files depend on (saved in ``<conditioning-out>/extract_config.json``)."""
    return {"extractor": cfg.conditioner, "extractor_config": networks.conditioning_config,
            "tissue": cfg.tissue, "base_mag": cfg.base_mag, "mpp": cfg.mpp,
            "tiles_dir": str(cfg.tiles_dir) if cfg.tiles_dir else None}


def check_out_dir(cfg: ExtractConfig, networks: Networks, write: bool = True) -> None:
    """Refuse an output folder (``--out``, and the conditioning folder a ZoomLDM run writes) that holds
    features made with other settings, naming the folder and the option; save the records when ``write``."""

    check_output_folder(cfg.out_dir, "--out", out_record(cfg, networks), CONFIG_NAME, write=write,
                        extra={"config": cfg})
    if cfg.writes_conditioning():
        option = "--conditioning-out" if cfg.conditioning_out else \
            f"--conditioning-out (default <out>/../{cfg.conditioner})"
        check_output_folder(cfg.conditioning_out_dir(), option, conditioning_record(cfg, networks), CONFIG_NAME,
                            write=write)


def extract(cfg: ExtractConfig, slides: list[str | Path]) -> int:
    """Run extraction over ``slides`` (files or folders) on ``cfg.devices`` x ``cfg.num_nodes`` processes;
    returns the exit code (1 if any slide failed on any rank)."""
    all_slides = find_slides(slides)
    runtime = resolve_runtime(cfg.device, cfg.precision)
    check_devices(cfg.devices, runtime.device, cfg.num_nodes)
    fabric = dist.start_fabric(runtime, cfg.devices, cfg.num_nodes)
    try:
        rank, world = fabric.global_rank, fabric.world_size
        runtime = on_device(runtime, fabric.device)
        networks = load_networks(cfg, runtime)
        check_out_dir(cfg, networks, write=False)
        if rank == 0:
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
            check_out_dir(cfg, networks)
        fabric.barrier()
        stats = ExtractStats()
        start = time.perf_counter()
        report = run_batch(dist.rank_slides(all_slides, cfg.shard, rank, world), cfg.out_dir,
                           SlideExtractor(cfg, networks, runtime, stats), desc="extract", progress=rank == 0,
                           shard=cfg.shard, rank=rank, world=world)
        stats.seconds = time.perf_counter() - start
        counts = {"done": report.count("done"), "skipped": report.count("skipped") + report.count("claimed"),
                  "failed": report.count("failed"), "patches": stats.patches, "seconds": stats.seconds}
        totals = dist.gather_counts(fabric, counts)
        fabric.barrier()  # every rank's error record is written
        if rank == 0:
            print(f"extract: {dist.summary(totals, world)} on {runtime.device} ({runtime.precision}); "
                  f"features in {cfg.out_dir}", file=sys.stderr)
        fabric.barrier()
        return 1 if totals[:, dist.COUNTS.index("failed")].sum() > 0 else 0
    finally:
        dist.end_process_group()


__all__ = ["ExtractStats", "SlideExtractor", "check_out_dir", "extract", "slide_grid"]
