"""Training batches of a context store: ``ContextDataset`` and ``CDMDataModule``.

Batches come from :class:`zoomfeat.train.dataset.StepBatchSampler` (the one ZoomLDM training uses): batch
``s`` on rank ``r`` depends only on ``(seed, s, r)``, magnifications drawn uniformly per sample (or in
proportion to their counts), so a resumed run sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from zoomfeat.cdm.config import DataSection
from zoomfeat.store.contexts import ContextSet


class ContextDataset(torch.utils.data.Dataset):
    """Item ``k``: ``(context float32 [65, D], mag index, cond float32 [E] or an empty tensor)``."""

    def __init__(self, store: ContextSet):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, k: int):
        context, mag, cond = self.store.item(int(k))
        cond = torch.zeros(0) if cond is None else torch.from_numpy(cond)
        return torch.from_numpy(context), mag, cond


def collate(items) -> dict:
    """``contexts`` [B, 65, D], ``mags`` int64 [B], ``cond`` [B, E] (E = 0 without an external condition)."""
    return {"contexts": torch.stack([it[0] for it in items]),
            "mags": torch.tensor([it[1] for it in items], dtype=torch.int64),
            "cond": torch.stack([it[2] for it in items])}


class CDMDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataSection, store: ContextSet | None = None):
        super().__init__()
        self.cfg = cfg
        self.store = store

    def setup(self, stage: str | None = None) -> None:
        if self.store is None:
            self.store = ContextSet(self.cfg.path)

    def train_dataloader(self):
        from zoomfeat.train.dataset import StepBatchSampler, worker_seeder

        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        sampler = StepBatchSampler(
            [np.asarray(a) for a in self.store.by_mag()], self.cfg.batch_size, self.cfg.seed,
            sampling=self.cfg.mag_sampling, steps_per_epoch=self.cfg.steps_per_epoch, rank=rank,
            start_step=(lambda: trainer.global_step) if trainer is not None else (lambda: 0))
        return torch.utils.data.DataLoader(
            ContextDataset(self.store), batch_sampler=sampler, num_workers=self.cfg.workers, collate_fn=collate,
            worker_init_fn=worker_seeder(self.cfg.seed + rank), persistent_workers=self.cfg.workers > 0,
            pin_memory=torch.cuda.is_available())
