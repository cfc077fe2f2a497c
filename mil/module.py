"""The one thin LightningModule: wraps any registered head, Adam, bag loss (+ the head's extra loss).

Training loss: ``bag_weight * CE(logits, y) + (1 - bag_weight) * extra_loss`` when the head returns an extra
loss (CLAM 0.7 / 0.3, DSMIL 0.5 / 0.5), else ``CE``. Validation loss is the bag cross-entropy alone.
With ``selection`` = "val_loss" / "val_auc" the module keeps a copy of the weights of its best validation
epoch (``best_state``, ``best_epoch`` 1-based); :meth:`restore_best` loads them back.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from mil.metrics import auroc_or_none


def bag_loss(model: nn.Module, out, y: torch.Tensor) -> torch.Tensor:
    """Training loss of one bag (``y`` scalar long tensor)."""
    ce = F.cross_entropy(out.logits, y.view(1))
    if out.extra_loss is None:
        return ce
    if hasattr(model, "combine"):
        return model.combine(ce, out.extra_loss)
    w = float(getattr(model, "bag_weight", 1.0))
    return w * ce + (1.0 - w) * out.extra_loss


class MILModule(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float, weight_decay: float, n_classes: int,
                 selection: str = "last"):
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.n_classes = n_classes
        self.selection = selection
        self.best_state: dict | None = None
        self.best_epoch: int | None = None
        self._best_score = math.inf
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = bag_loss(self.model, self.model(x, y), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=1)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x).logits
        self._val.append((F.cross_entropy(logits, y.view(1)).detach(), torch.softmax(logits, 1)[0].detach(), y))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        losses, probs, ys = zip(*self._val)
        self._val.clear()
        val_loss = torch.stack(losses).mean()
        auc = auroc_or_none(torch.stack(probs), torch.stack(ys), self.n_classes)
        self.log("val_loss", val_loss, batch_size=1)
        self.log("val_auc", float("nan") if auc is None else auc, batch_size=1)
        if not self.trainer.sanity_checking:
            self._track_best(float(val_loss), auc)

    def _track_best(self, val_loss: float, auc: float | None) -> None:
        score = {"val_loss": val_loss, "val_auc": -auc if auc is not None else math.inf}.get(self.selection)
        if score is not None and score < self._best_score:
            self._best_score = score
            self.best_epoch = self.current_epoch + 1
            self.best_state = copy.deepcopy(self.model.state_dict())

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
