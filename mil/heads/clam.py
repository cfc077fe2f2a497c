"""CLAM-SB and CLAM-MB (Lu et al., Nature BME 2021, 'small' size D -> 512 -> 256); registry ids ``clam_sb``,
``clam_mb``.

Both embed instances with Linear(D, 512) + ReLU + Dropout(0.25) and score them with gated attention
(512 -> 256, dropout after each gate): one branch and a Linear(512, C) bag classifier (SB), or one branch and
one Linear(512, 1) classifier per class (MB). Instance clustering (Methods, "Instance-level clustering"): for
the bag's class, the ``k_sample`` most attended instances are pseudo-positive and the ``k_sample`` least
attended pseudo-negative for that class's Linear(512, 2) instance classifier. Only with ``subtyping``
(mutually exclusive classes, as in CLAM's code) are the most attended instances also pseudo-negative for every
other class's classifier, the summed loss then divided by the number of classes. Loss: smooth top-1 SVM
(:mod:`mil.losses`); k = min(k_sample, n // 2); a bag of fewer than 2 instances skips it. Training loss:
0.7 bag cross-entropy + 0.3 instance loss.

Attention for heatmaps: the softmax weights (SB), the weights of the predicted class's branch (MB).
"""

from __future__ import annotations

import torch
from torch import nn

from mil.layers import GatedAttention, embedding, gather_rows, masked_softmax
from mil.losses import smooth_top1_svm_rows
from mil.registry import MILHead, MILOutput, register_model


class _CLAMBase(MILHead):
    """Shared parts of CLAM-SB / CLAM-MB (see the module docstring)."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int, attn_dim: int, dropout: float,
                 k_sample: int, subtyping: bool, branches: int, bag_weight: float):
        super().__init__()
        self.embed = embedding(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, dropout, branches)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))
        self.k_sample, self.subtyping, self.n_classes = k_sample, subtyping, n_classes
        self.bag_weight = bag_weight

    def _attend(self, x, mask):
        """h [B, N, H] and attention [B, branches, N]."""
        h = self.embed(x)
        scores = self.attention(h).transpose(-1, -2)
        return h, masked_softmax(scores, None if mask is None else mask.unsqueeze(-2))

    def _svm(self, h, a, classifier, k, valid, mask, target: int, most: bool) -> torch.Tensor:
        """Summed smooth top-1 SVM loss [B] of the k most (or least) attended instances of each bag against
        ``target``, over the bag's ``valid`` [B, k] choices."""
        ranked = a if most else -a
        if mask is not None:
            ranked = ranked.masked_fill(~mask, float("-inf"))
        logits = classifier(gather_rows(h, torch.topk(ranked, k, dim=-1).indices))  # [B, k, 2]
        target_t = torch.full(logits.shape[:-1], target, dtype=torch.long, device=h.device)
        return (smooth_top1_svm_rows(logits, target_t) * valid).sum(-1)

    def _instance_loss(self, h, attn, label, mask):
        """Per-bag loss [B] and the bags it applies to [B]. As CLAM's code, a class's in-class clustering is
        computed for its own bags only and the out-of-class one (subtyping) for the other bags only."""
        sizes = torch.full(label.shape, h.shape[-2], device=h.device) if mask is None else mask.sum(-1)
        k_bag = torch.clamp(sizes // 2, max=self.k_sample)  # [B]
        k = int(min(self.k_sample, h.shape[-2] // 2))
        if k < 1:
            return None, None
        valid = (torch.arange(k, device=h.device) < k_bag.unsqueeze(-1)).to(h.dtype)  # [B, k]
        count = k_bag.to(h.dtype).clamp(min=1)
        total = torch.zeros(label.shape, dtype=h.dtype, device=h.device)
        for c, classifier in enumerate(self.instance_classifiers):
            own = label == c
            a = attn[:, c if attn.shape[-2] > 1 else 0, :]
            if bool(own.any()):
                in_class = (self._svm(h, a, classifier, k, valid, mask, 1, True)
                            + self._svm(h, a, classifier, k, valid, mask, 0, False)) / (2 * count)
                total = total + own.to(h.dtype) * in_class
            if self.subtyping and not bool(own.all()):
                out_class = self._svm(h, a, classifier, k, valid, mask, 0, True) / count
                total = total + (~own).to(h.dtype) * out_class
        if self.subtyping:
            total = total / self.n_classes
        return total, k_bag >= 1


@register_model("clam_sb")
class CLAMSB(_CLAMBase):
    """CLAM single-branch: one gated attention branch, Linear(512, C) bag classifier."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25, k_sample: int = 8, subtyping: bool = False, bag_weight: float = 0.7):
        super().__init__(in_dim, n_classes, hidden, attn_dim, dropout, k_sample, subtyping, 1, bag_weight)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x, mask=None, label=None) -> MILOutput:
        h, attn = self._attend(x, mask)  # attn [B, 1, N]
        logits = self.classifier((attn @ h).squeeze(-2))  # [B, C]
        extra, valid = self._instance_loss(h, attn, label, mask) if label is not None else (None, None)
        return MILOutput(logits, attn[:, 0, :], extra, valid)


@register_model("clam_mb")
class CLAMMB(_CLAMBase):
    """CLAM multi-branch: one attention branch and one Linear(512, 1) bag classifier per class."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25, k_sample: int = 8, subtyping: bool = False, bag_weight: float = 0.7):
        super().__init__(in_dim, n_classes, hidden, attn_dim, dropout, k_sample, subtyping, n_classes,
                         bag_weight)
        self.classifiers = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_classes))

    def forward(self, x, mask=None, label=None) -> MILOutput:
        h, attn = self._attend(x, mask)  # attn [B, C, N]
        pooled = attn @ h  # [B, C, H]
        logits = torch.cat([clf(pooled[:, c, :]) for c, clf in enumerate(self.classifiers)], dim=-1)
        chosen = attn.gather(-2, logits.argmax(-1)[:, None, None].expand(-1, 1, attn.shape[-1])).squeeze(-2)
        extra, valid = self._instance_loss(h, attn, label, mask) if label is not None else (None, None)
        return MILOutput(logits, chosen, extra, valid)
