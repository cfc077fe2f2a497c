"""The optimisers and LR schedules of the heads' recipes, on ``torch.optim``.

Adam (weight decay as an L2 term, as CLAM's, DSMIL's and ABMIL's code); ``radam_lookahead`` is TransMIL's
optimiser (its ``create_optimizer``, ``opt: lookahead_radam``): RAdam inside Lookahead (Zhang et al. 2019) with
timm's defaults (k = 6, alpha = 0.5); weight decay as there: decoupled and not applied to biases and 1-d
parameters (LayerNorm weights), which its factory puts in a no-decay group.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LOOKAHEAD_K, LOOKAHEAD_ALPHA = 6, 0.5


def lr_at(recipe, base_lr: float, epoch: int, epochs: int) -> float:
    """Learning rate of 0-based ``epoch``: constant; cosine annealing from ``base_lr`` to ``eta_min`` over
    ``epochs`` (CosineAnnealingLR stepped once per epoch); or ``gamma`` per milestone passed (milestones are
    fractions of ``epochs``). The engine passes the head's reference epoch count as ``epochs``: a run follows the
    reference's schedule epoch by epoch (stretching a 200-epoch cosine over 20 epochs would anneal to ~0 by
    epoch 10 and cost DSMIL ~0.15 AUC on the planted cohorts)."""
    if recipe.schedule == "cosine":
        return recipe.eta_min + (base_lr - recipe.eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2
    if recipe.schedule == "step":
        return base_lr * recipe.gamma ** sum(epoch >= round(m * epochs) for m in recipe.milestones)
    return base_lr


class Lookahead:
    """Lookahead around ``inner``: every ``k`` steps the slow weights (from the initial weights) move ``alpha`` of
    the way to the fast ones, and the fast weights restart from them."""

    def __init__(self, inner: torch.optim.Optimizer, k: int = LOOKAHEAD_K, alpha: float = LOOKAHEAD_ALPHA):
        self.inner, self.k, self.alpha, self.count = inner, k, alpha, 0
        self.param_groups = inner.param_groups
        self.slow = [p.detach().clone() for g in inner.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        self.count += 1
        if self.count % self.k:
            return
        for slow, fast in zip(self.slow, (p for g in self.param_groups for p in g["params"])):
            slow.add_(fast - slow, alpha=self.alpha)
            fast.copy_(slow)


def make_optimizer(model: nn.Module, recipe, lr: float, weight_decay: float):
    """The recipe's optimiser over ``model``'s parameters."""
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, betas=recipe.betas, eps=1e-8, weight_decay=weight_decay)
    params = list(model.named_parameters())
    decay = [p for n, p in params if not (n.endswith(".bias") or p.dim() <= 1)]
    rest = [p for n, p in params if n.endswith(".bias") or p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return Lookahead(torch.optim.RAdam(groups, lr=lr, betas=recipe.betas, eps=1e-8, decoupled_weight_decay=True))


def clip_groups(model: nn.Module, groups: dict[str, float]) -> None:
    """``clip_grad_norm_`` of each group of parameters (name prefix -> max norm)."""
    for prefix, max_norm in groups.items():
        params = [p for n, p in model.named_parameters() if n == prefix or n.startswith(prefix + ".")]
        if params:
            nn.utils.clip_grad_norm_(params, max_norm)
