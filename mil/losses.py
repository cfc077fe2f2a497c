"""Smooth top-1 multiclass SVM loss (Berrada, Zisserman & Kumar, ICLR 2018), CLAM's instance loss.

For scores ``s`` [B, C] and labels ``y`` [B], with margin ``alpha`` and temperature ``tau``:

    loss = tau * log sum_j exp((alpha * [j != y] + s_j - s_y) / tau)

It is a smooth upper bound of the hinge ``max_j(alpha * [j != y] + s_j) - s_y``; tau -> 0 gives the hinge.
CLAM uses C = 2, alpha = 1, tau = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def smooth_top1_svm_rows(scores: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
                         tau: float = 1.0) -> torch.Tensor:
    """Smooth top-1 SVM loss of every row: ``scores`` [..., C], integer ``target`` [...] -> [...]."""
    onehot = F.one_hot(target.long(), scores.shape[-1]).to(scores.dtype)
    true_score = (scores * onehot).sum(-1, keepdim=True)
    return tau * torch.logsumexp((scores + alpha * (1.0 - onehot) - true_score) / tau, dim=-1)


def bag_loss(model: nn.Module, out, y: torch.Tensor) -> torch.Tensor:
    """Training loss of one bag (``out`` of a batch of one bag, ``y`` a scalar long tensor), as the references'
    per-bag loops compute it: the head's ``combine`` of the cross-entropy and its extra loss when it returns
    one for the bag (CLAM 0.7 / 0.3, DSMIL 0.5 / 0.5, DTFD the sum), else the cross-entropy. The plain loops of
    the benchmark and the tests use it."""
    ce = F.cross_entropy(out.logits, y.view(1))
    if out.extra_loss is None or (out.extra_valid is not None and not bool(out.extra_valid[0])):
        return ce
    return model.combine(ce, out.extra_loss.reshape(()))
