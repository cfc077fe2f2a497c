"""Several devices or nodes for ``zoomfeat extract`` through Lightning Fabric (DDP), not a home-made launcher.

``Fabric(accelerator, devices, num_nodes, strategy="ddp")`` starts the processes (or joins the ones torchrun
or SLURM started); rank r of world w takes the slides ``sorted(slides)[i::n][r::w]`` (``--shard i/n`` first,
then the rank), works on ``fabric.device`` and lists its failures in ``<out>/.errors/rank<r>/errors.csv``.
After a barrier, rank 0 merges those lists into ``<out>/errors.csv`` and prints the combined summary from
the per-rank counts gathered over the process group.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zoomfeat.batch import ERRORS_CSV, write_errors_csv
from zoomfeat.extract.runtime import Runtime

RANKS_DIR = ".errors"
COUNTS = ("done", "skipped", "failed", "patches", "seconds")


def start_fabric(runtime: Runtime, devices: int, num_nodes: int):
    """A launched Fabric on ``runtime``'s accelerator: DDP when ``devices * num_nodes`` > 1 (gloo on the CPU,
    NCCL on GPUs), one process on one device otherwise."""
    from lightning.fabric import Fabric

    accelerator = "cuda" if runtime.is_cuda else "cpu"
    many = devices * num_nodes > 1
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                    strategy="ddp" if many else "auto")
    fabric.launch()
    return fabric


def rank_slides(slides: Sequence[Path], shard: str | None, rank: int, world: int) -> list[Path]:
    """The slides of one rank: the ``--shard i/n`` part of the sorted list, then every ``world``-th from ``rank``."""
    from zoomfeat.batch import shard_slides

    return shard_slides(slides, shard)[rank::world]


def errors_dir(out_dir: Path, rank: int, world: int) -> Path:
    """Where one rank's ``errors.csv`` goes: ``out_dir`` itself in a one-process run."""
    return Path(out_dir) if world == 1 else Path(out_dir) / RANKS_DIR / f"rank{rank}"


def gather_counts(fabric, counts: dict[str, float]) -> np.ndarray:
    """float64 [world, len(COUNTS)]: every rank's counts, on every rank (an all-gather; no-op for one rank)."""
    import torch

    local = torch.tensor([float(counts[k]) for k in COUNTS], dtype=torch.float64, device=fabric.device)
    gathered = fabric.all_gather(local) if fabric.world_size > 1 else local
    return gathered.reshape(-1, len(COUNTS)).cpu().numpy()


def merge_errors(out_dir: Path, world: int) -> dict[str, str]:
    """Rank 0, after the barrier: every rank's errors into ``<out>/errors.csv`` (per-rank lists removed)."""
    errors: dict[str, str] = {}
    for rank in range(world):
        path = errors_dir(out_dir, rank, world) / ERRORS_CSV
        if path.is_file():
            with open(path, newline="") as fh:
                errors.update({row["slide"]: row["error"] for row in csv.DictReader(fh)})
    write_errors_csv(Path(out_dir) / ERRORS_CSV, errors)
    shutil.rmtree(Path(out_dir) / RANKS_DIR, ignore_errors=True)
    return errors


def summary(totals: np.ndarray, world: int) -> str:
    """One line from the gathered counts [world, len(COUNTS)] (seconds = the slowest rank)."""
    done, skipped, failed, patches = (int(totals[:, i].sum()) for i in range(4))
    seconds = float(totals[:, 4].max())
    rate = patches / seconds if seconds > 0 else 0.0
    ranks = f" over {world} ranks" if world > 1 else ""
    return (f"done {done}, skipped {skipped}, failed {failed}{ranks}; {patches} patches in {seconds:.1f} s "
            f"({rate:.1f} patches/s)")


def end_process_group() -> None:
    """Tear down the DDP process group (when one was made), so the processes exit cleanly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
