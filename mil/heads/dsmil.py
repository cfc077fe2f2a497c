"""DSMIL: dual-stream MIL (Li, Li & Eliceiri, CVPR 2021); registry id ``dsmil``.

Instance stream: Linear(D, S) per instance, bag score = max over instances (eq. 1). Bag stream: queries
Q = q(x) with q = Linear(D, 128) + ReLU + Linear(128, 128) + Tanh; the critical instance of each stream (highest
instance score) gives q_max; U = softmax_N(Q q_max^T / sqrt(128)) [N, S] (eq. 2); B = U^T V [S, D] (eq. 3,
V = x, or Linear(D, D) + ReLU with ``passing_v``); logits = Conv1d(S, S, kernel D)(B) (eq. 4). Loss 0.5 bag +
0.5 max-instance: cross-entropy on the bag logits, and, as in DSMIL, per-stream binary cross-entropy of the max
instance logits against the one-hot label (a softmax over class maxima does not learn: the class-0 maximum has
no instance-level meaning).

``negative_stream=False`` (binary tasks only) is DSMIL's setting for a positive/negative task
(``--num_classes 1``, "the number of non-negative classes", as its Camelyon16 runs): one instance classifier,
one critical instance and one bag score s for class 1; the logits are (0, s), so the softmax cross-entropy is
DSMIL's binary cross-entropy of s. ``--task hrd`` sets it (``mil.config.effective_model_kwargs``); subtyping
keeps a stream per class, as DSMIL's TCGA runs.

``average=True`` (what ``train-mil`` builds): the prediction (eval mode) is the mean of the two streams'
probabilities, the bag score c(B) = (c_m(B) + c_b(B)) / 2 of the paper (eq. 5), ``0.5 sigmoid(max instance
logit) + 0.5 sigmoid(bag logit)`` in DSMIL's current train_tcga.py. With one positive stream that is the
probability of class 1; with a stream per class the instance stream's sigmoids are normalised over the classes
and averaged with the bag stream's softmax; ``logits`` are then the log of those probabilities; training is
unchanged. The class default ``False`` scores by the bag stream alone, as DSMIL's 2021 train_tcga.py did.

Attention for heatmaps: the predicted class's column of U (with one positive stream, class 1's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mil.layers import gather_rows, masked_softmax
from mil.registry import MILHead, MILOutput, register_model
from zoomfeat.errors import ConfigError


def two_stream_log_probs(bag_logits: torch.Tensor, max_logits: torch.Tensor, negative_stream: bool) -> torch.Tensor:
    """log of the mean of the two streams' class probabilities [B, C], from the bag logits [B, C] and the max
    instance logits [B, S], in log space (finite for any logits)."""
    half = math.log(2.0)
    if not negative_stream:  # bag logits (0, s): P(1) = (sigmoid(m) + sigmoid(s)) / 2, P(0) its complement
        s, m = bag_logits[..., 1], max_logits[..., 0]
        positive = torch.logaddexp(F.logsigmoid(s), F.logsigmoid(m))
        negative = torch.logaddexp(F.logsigmoid(-s), F.logsigmoid(-m))
        return torch.stack([negative, positive], dim=-1) - half
    instance = F.logsigmoid(max_logits)
    instance = instance - instance.logsumexp(-1, keepdim=True)
    return torch.logaddexp(bag_logits.log_softmax(-1), instance) - half


@register_model("dsmil")
class DSMIL(MILHead):
    """Dual-stream MIL (see the module docstring)."""

    bag_weight = 0.5

    def __init__(self, in_dim: int, n_classes: int = 2, query_dim: int = 128, passing_v: bool = False,
                 dropout_v: float = 0.0, negative_stream: bool = True, average: bool = False):
        super().__init__()
        if not negative_stream and n_classes != 2:
            raise ConfigError(f"dsmil: negative_stream=False needs a binary task, not {n_classes} classes; "
                              "drop it from --model-kwargs")
        streams = n_classes if negative_stream else 1
        self.instance_classifier = nn.Linear(in_dim, streams)
        self.query = nn.Sequential(nn.Linear(in_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim),
                                   nn.Tanh())
        self.value = (nn.Sequential(nn.Dropout(dropout_v), nn.Linear(in_dim, in_dim), nn.ReLU())
                      if passing_v else nn.Identity())
        self.head = nn.Conv1d(streams, streams, kernel_size=in_dim)
        self.query_dim, self.negative_stream, self.average = query_dim, negative_stream, average

    def forward(self, x, mask=None, label=None) -> MILOutput:
        inst = self.instance_classifier(x)  # [B, N, S]
        if mask is not None:
            inst = inst.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        q = self.query(x)  # [B, N, Q]
        critical = inst.argmax(dim=-2)  # [B, S]
        scores = q @ gather_rows(q, critical).transpose(-1, -2) / math.sqrt(self.query_dim)  # [B, N, S]
        a = masked_softmax(scores, None if mask is None else mask.unsqueeze(-1), dim=-2)
        logits = self.head(a.transpose(-1, -2) @ self.value(x)).squeeze(-1)  # [B, S]
        if not self.negative_stream:  # one positive stream: attention of class 1, logits (0, s)
            attention = a.squeeze(-1)
            logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
        else:
            attention = a.gather(-1, logits.argmax(-1)[:, None, None].expand(*a.shape[:-1], 1)).squeeze(-1)
        max_logits = inst.max(dim=-2).values  # [B, S]
        if self.average and not self.training:
            logits = two_stream_log_probs(logits, max_logits, self.negative_stream)
        extra = None
        if label is not None:
            if self.negative_stream:
                target = F.one_hot(label.long(), inst.shape[-1]).to(max_logits.dtype)
            else:
                target = label.to(max_logits.dtype).unsqueeze(-1)
            extra = F.binary_cross_entropy_with_logits(max_logits, target, reduction="none").mean(-1)
        return MILOutput(logits, attention, extra)
