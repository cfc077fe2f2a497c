"""Reading a ``prepare-train`` set: ``TrainingSet`` (samples), ``StepBatchSampler`` and ``ZoomLDMDataModule``.

A sample is one patch at one magnification: ``(latent float32 [z, h, w], raw grid float32 [C, g, g], mag index)``.
Training batches are drawn by :class:`StepBatchSampler`: the batch of global step ``s`` on rank ``r`` depends
only on ``(seed, s, r)``, so a resumed run sees exactly the data an uninterrupted run would have seen.
Magnifications are drawn uniformly per sample (the official recipe) or in proportion to their patch counts;
a small per-magnification validation split is held out by a seeded permutation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch

from zoomfeat.errors import DataError
from zoomfeat.mags import MAGNIFICATIONS, mag_name
from zoomfeat.store.trainset import INDEX_NAME, ShardReader, read_index


class TrainingSet(torch.utils.data.Dataset):
    """All patches of a training set; item ``k`` of the flat, magnification-major order.

    Shard files are opened lazily per process (safe with DataLoader workers) and kept open
    (:class:`zoomfeat.store.trainset.ShardReader`).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = read_index(self.root)
        self.shards = list(index.shards)
        self.latent_shape = index.latent_shape
        self.grid_channels = index.grid_channels
        self.first_stage_digest = index.first_stage_digest
        self.shard_of, self.row_of, self.mag_of = index.shard_of, index.row_of, index.mag_of
        self.counts = np.bincount(self.mag_of, minlength=len(MAGNIFICATIONS))
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        if len(self.mag_of) == 0:
            raise DataError(f"{self.root / INDEX_NAME} lists no patch: check the slides and --mags given to "
                            "prepare-train")
        self._reader = ShardReader(self.root, index.shards)

    def __len__(self) -> int:
        return len(self.mag_of)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        mag = int(self.mag_of[k])
        latent, grid = self._reader.sample(int(self.shard_of[k]), mag_name(MAGNIFICATIONS[mag]), int(self.row_of[k]))
        return torch.from_numpy(latent), torch.from_numpy(grid), mag


def collate(items: list[tuple[torch.Tensor, torch.Tensor, int]]) -> dict:
    """Batch: ``latents`` float32 [B, z, h, w], ``grids`` list of raw float32 [C, g, g], ``mags`` int64 [B]."""
    return {"latents": torch.stack([it[0] for it in items]),
            "grids": [it[1] for it in items],
            "mags": torch.tensor([it[2] for it in items], dtype=torch.int64)}


def split_rows(counts: np.ndarray, offsets: np.ndarray, val_fraction: float, val_max: int,
               seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per magnification, flat item indices for (train, val); a mag keeps at least one training item."""
    rng = np.random.default_rng([seed, 17])
    train, val = [], []
    for m, n in enumerate(counts):
        perm = offsets[m] + rng.permutation(int(n))
        n_val = min(int(np.floor(val_fraction * n)), val_max, max(int(n) - 1, 0))
        val.append(np.sort(perm[:n_val]))
        train.append(np.sort(perm[n_val:]))
    return train, val


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches keyed by the global step: batch ``s`` = ``batch_size`` items drawn with ``rng(seed, s, rank)``.

    ``start_step()`` is read at the start of each epoch (the trainer's global step), and an epoch ends at the
    next multiple of ``steps_per_epoch``. ``by_mag`` lists the training items of each magnification.
    """

    def __init__(self, by_mag: list[np.ndarray], batch_size: int, seed: int, *, sampling: str = "uniform",
                 steps_per_epoch: int = 1000, rank: int = 0, start_step: Callable[[], int] = lambda: 0):
        self.by_mag = [np.asarray(a, dtype=np.int64) for a in by_mag]
        sizes = np.array([len(a) for a in self.by_mag], dtype=np.float64)
        if sizes.sum() == 0:
            raise DataError("the training split is empty: lower data.val_fraction or add slides")
        weights = (sizes > 0).astype(np.float64) if sampling == "uniform" else sizes
        self.mag_p = weights / weights.sum()
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.steps_per_epoch, self.start_step = steps_per_epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batch(self, step: int) -> list[int]:
        rng = np.random.default_rng([self.seed, step, self.rank])
        mags = rng.choice(len(self.by_mag), size=self.batch_size, p=self.mag_p)
        return [int(self.by_mag[m][rng.integers(len(self.by_mag[m]))]) for m in mags]

    def __iter__(self) -> Iterator[list[int]]:
        start = int(self.start_step())
        end = (start // self.steps_per_epoch + 1) * self.steps_per_epoch
        for step in range(start, end):
            yield self.batch(step)


def val_batches(by_mag: list[np.ndarray], batch_size: int) -> list[list[int]]:
    """Validation batches in a fixed order, each from one magnification (so losses group by mag)."""
    return [a[i:i + batch_size].tolist() for a in by_mag for i in range(0, len(a), batch_size)]


def worker_seeder(base_seed: int):
    """A DataLoader ``worker_init_fn`` seeding numpy and torch in each worker from ``base_seed`` and its id."""

    def init(worker_id: int) -> None:
        seed = (base_seed * 1000 + worker_id) % 2**32
        np.random.seed(seed)
        torch.manual_seed(seed)
    return init


class ZoomLDMDataModule(L.LightningDataModule):
    """Train/val loaders over a :class:`TrainingSet` (see the module docstring for the sampling)."""

    def __init__(self, data_cfg):
        super().__init__()
        self.cfg = data_cfg
        self.dataset: TrainingSet | None = None
        self.train_by_mag: list[np.ndarray] = []
        self.val_by_mag: list[np.ndarray] = []

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        self.dataset = TrainingSet(self.cfg.path)
        self.train_by_mag, self.val_by_mag = split_rows(
            self.dataset.counts, self.dataset.offsets, self.cfg.val_fraction, self.cfg.val_max_per_mag,
            self.cfg.seed)

    def _loader(self, batch_sampler, rank: int):
        gen = torch.Generator().manual_seed(self.cfg.seed + rank)
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batch_sampler, num_workers=self.cfg.workers, collate_fn=collate,
            worker_init_fn=worker_seeder(self.cfg.seed + rank), generator=gen,
            persistent_workers=self.cfg.workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        sampler = StepBatchSampler(
            self.train_by_mag, self.cfg.batch_size, self.cfg.seed, sampling=self.cfg.mag_sampling,
            steps_per_epoch=self.cfg.steps_per_epoch, rank=rank,
            start_step=(lambda: trainer.global_step) if trainer is not None else (lambda: 0))
        return self._loader(sampler, rank)

    def val_dataloader(self):
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batches = val_batches(self.val_by_mag, self.cfg.batch_size)[rank::world]
        return self._loader(batches, rank)
