"""Run-time checks of MIL training: finite bags, finite losses (no NaN ever becomes a reported number).

- :class:`CheckedBagStore` wraps a :class:`mil.bags.BagStore`: every bag, as it is loaded, must be finite
  (a DataError names the slide and its feature file otherwise);
- :class:`FiniteLossCheck` is the Lightning callback that stops training at the first non-finite training
  loss, naming the fold, epoch and step (a diverging optimiser, e.g. ``--weight-decay inf``);
- predictions are checked by :func:`mil.metrics.check_finite` before any metric is computed.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from zoomfeat.errors import DataError


class CheckedBagStore:
    """A bag store whose bags are checked for NaN/Inf once per slide (the first time each is loaded)."""

    def __init__(self, store):
        self.store = store
        self.spec = store.spec
        self._checked: set[str] = set()

    def get(self, slide_id: str):
        bag = self.store.get(slide_id)
        if slide_id not in self._checked:
            bad = int(bag.features.numel() - torch.isfinite(bag.features).sum())
            if bad:
                raise DataError(f"slide {slide_id}: {self.spec.path(slide_id)} has {bad} non-finite (NaN/Inf) "
                                "feature values; re-extract it or drop the slide from the split")
            if getattr(self.store, "cache", True):
                self._checked.add(slide_id)
        return bag


class FiniteLossCheck(L.Callback):
    """Raise a DataError at the first training step whose loss is NaN or Inf."""

    def __init__(self, fold: int | str):
        self.fold = fold

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        if not math.isfinite(value):
            raise DataError(f"fold {self.fold}: training loss is {value} at epoch {trainer.current_epoch + 1}, "
                            f"step {trainer.global_step}: the optimiser diverged (lower --lr, check "
                            "--weight-decay) or the features are not finite")
