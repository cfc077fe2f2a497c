"""The Lightning callbacks and plugins zoomfeat adds to every Trainer (built by :mod:`zoomfeat.fitting`).

They are module-level classes, not classes made inside a function: a ``ddp_spawn`` run pickles the Trainer's
callbacks and plugins into each rank's process, and a local class cannot be pickled.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from lightning.pytorch.plugins.io import TorchCheckpointIO

from zoomfeat.store import save_torch


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar without its empty first lines: the training bar is shown once it has a total (it is
    created before the epoch's length is known and would print "Training: 0/?" twice)."""

    def init_train_tqdm(self):
        return Tqdm(desc=self.train_description, position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT,
                    delay=1e-9)

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        bar.set_description(f"Epoch {trainer.current_epoch}", refresh=False)
        bar.reset(convert_inf(self.total_train_batches))
        bar.initial = 0


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin whose files appear complete or not at all (through the one torch writer)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        save_torch(checkpoint, path)
