"""Several devices or nodes for ``zoomfeat extract`` through Lightning Fabric (DDP), not a home-made launcher.

``Fabric(accelerator, devices, num_nodes, strategy="ddp")`` starts the processes (or joins the ones torchrun
or SLURM started); rank r of world w takes the slides ``sorted(slides)[i::n][r::w]`` (``--shard i/n`` first,
then the rank), works on ``fabric.device`` and keeps its failures in its own error record
(``<out>/.errors/<shard>.rank-<r>-of-<w>.csv``, merged into ``<out>/errors.csv`` under a folder lock, see
:mod:`zoomfeat.store.records`). After a barrier, rank 0 prints the combined summary from the per-rank counts
gathered over the process group.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zoomfeat.batch import shard_slides
from zoomfeat.runtime import Runtime

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
    return shard_slides(slides, shard)[rank::world]


def gather_counts(fabric, counts: dict[str, float]) -> np.ndarray:
    """float64 [world, len(COUNTS)]: every rank's counts, on every rank (an all-gather; no-op for one rank)."""
    import torch

    local = torch.tensor([float(counts[k]) for k in COUNTS], dtype=torch.float64, device=fabric.device)
    gathered = fabric.all_gather(local) if fabric.world_size > 1 else local
    return gathered.reshape(-1, len(COUNTS)).cpu().numpy()


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
