"""MIL heads: plain ``nn.Module``s in one registry, filled by :func:`register_model`.

Every head maps one bag ``x`` [N, D] (float32) to a :class:`MILOutput`:
``logits`` [1, C]; ``attention`` [N], the per-instance score drawn in heatmaps; ``extra_loss``, a scalar
tensor or None. Heads with an auxiliary loss (CLAM's instance clustering, DSMIL's max-instance loss) compute
it when ``label`` is given; the training loss is then ``bag_weight * CE(logits) + (1 - bag_weight) * extra_loss``.

Attention per head: ABMIL / CLAM-SB, the softmax attention weights (sum 1); CLAM-MB, the softmax weights of
the branch of the predicted class; DSMIL, the softmax weights of the predicted class's column of the bag
classifier's attention (similarity to the critical instance); mean pooling, 1/N; max pooling, each instance's
logit for the predicted class.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mil.losses import SmoothTop1SVM
from zoomfeat.errors import ConfigError

MIL_MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: add a head to :data:`MIL_MODELS` under ``name`` (CLI choices come from it)."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MIL_MODELS:
            raise ValueError(f"MIL head {name!r} registered twice")
        cls.registry_name = name
        MIL_MODELS[name] = cls
        return cls

    return add


def build_model(name: str, in_dim: int, n_classes: int, **kwargs) -> nn.Module:
    """Instantiate a registered head; ConfigError for an unknown name or a bad keyword."""
    if name not in MIL_MODELS:
        raise ConfigError(f"unknown MIL model {name!r}: use one of {', '.join(sorted(MIL_MODELS))}")
    try:
        return MIL_MODELS[name](in_dim=in_dim, n_classes=n_classes, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad model arguments for {name!r} ({exc}); check --model-kwargs") from exc


class MILOutput(NamedTuple):
    logits: torch.Tensor  # [1, C]
    attention: torch.Tensor  # [N]
    extra_loss: torch.Tensor | None  # scalar or None


def _embed(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))


class GatedAttention(nn.Module):
    """Gated attention (Ilse et al. 2018): score = W (tanh(V h) * sigmoid(U h)); h [N, H] -> [N, branches]."""

    def __init__(self, hidden: int = 512, attn_dim: int = 256, dropout: float = 0.25, branches: int = 1):
        super().__init__()
        self.tanh_gate = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.sigmoid_gate = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.score = nn.Linear(attn_dim, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.score(self.tanh_gate(h) * self.sigmoid_gate(h))


@register_model("abmil")
class ABMIL(nn.Module):
    """Gated-attention MIL: Linear(D, 512) + ReLU + Dropout(0.25), attention 512 -> 256 -> 1, Linear(512, C)."""

    bag_weight = 1.0

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25):
        super().__init__()
        self.embed = _embed(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)  # [N, H]
        a = torch.softmax(self.attention(h).squeeze(1), dim=0)  # [N]
        return MILOutput(self.classifier(a @ h).unsqueeze(0), a, None)


class _CLAMBase(nn.Module):
    """Shared parts of CLAM-SB / CLAM-MB (Lu et al. 2021, 'small' size: D -> 512 -> 256).

    Instance clustering: for the bag's class, the ``k_sample`` most attended instances are pseudo-positive
    and the ``k_sample`` least attended pseudo-negative for that class's instance classifier. Only with
    ``subtyping`` (mutually exclusive classes, as in CLAM's reference code) are the most attended instances
    also pseudo-negative for every other class's classifier, and the summed loss is then divided by the
    number of classes; without it the other classes are skipped. Loss: smooth top-1 SVM. Bags with fewer
    than 2 instances skip it; k = min(k_sample, N // 2) otherwise.
    """

    bag_weight = 0.7

    def __init__(self, in_dim: int, n_classes: int, hidden: int, attn_dim: int, dropout: float,
                 k_sample: int, subtyping: bool, branches: int, bag_weight: float):
        super().__init__()
        self.embed = _embed(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, dropout, branches)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))
        self.instance_loss = SmoothTop1SVM(alpha=1.0, tau=1.0)
        self.k_sample = k_sample
        self.subtyping = subtyping
        self.n_classes = n_classes
        self.bag_weight = bag_weight

    def _cluster_loss(self, h: torch.Tensor, a: torch.Tensor, classifier: nn.Module, in_class: bool,
                      k: int) -> torch.Tensor:
        """Instance loss of one class; ``a`` [N] attention of the branch used for that class."""
        top = torch.topk(a, k).indices
        if in_class:
            idx = torch.cat([top, torch.topk(-a, k).indices])
            target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
        else:
            idx, target = top, torch.zeros(k, dtype=torch.long, device=h.device)
        return self.instance_loss(classifier(h[idx]), target)

    def _instance_loss(self, h: torch.Tensor, attn: torch.Tensor, label: torch.Tensor) -> torch.Tensor | None:
        """``attn`` [branches, N] softmax attention; SB uses its one branch for every class."""
        k = min(self.k_sample, h.shape[0] // 2)
        if k < 1:
            return None
        y = int(label)
        total = h.new_zeros(())
        for c, classifier in enumerate(self.instance_classifiers):
            if c != y and not self.subtyping:
                continue  # out-of-class clustering only for mutually exclusive subtypes
            a = attn[c if attn.shape[0] > 1 else 0]
            total = total + self._cluster_loss(h, a, classifier, c == y, k)
        if self.subtyping:
            total = total / self.n_classes
        return total


@register_model("clam_sb")
class CLAMSB(_CLAMBase):
    """CLAM single-branch: one gated attention branch, Linear(512, C) bag classifier."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25, k_sample: int = 8, subtyping: bool = False, bag_weight: float = 0.7):
        super().__init__(in_dim, n_classes, hidden, attn_dim, dropout, k_sample, subtyping, 1, bag_weight)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)
        attn = torch.softmax(self.attention(h).T, dim=1)  # [1, N]
        logits = self.classifier(attn @ h)  # [1, C]
        extra = self._instance_loss(h, attn, label) if label is not None else None
        return MILOutput(logits, attn[0], extra)


@register_model("clam_mb")
class CLAMMB(_CLAMBase):
    """CLAM multi-branch: one attention branch and one Linear(512, 1) bag classifier per class."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25, k_sample: int = 8, subtyping: bool = False, bag_weight: float = 0.7):
        super().__init__(in_dim, n_classes, hidden, attn_dim, dropout, k_sample, subtyping, n_classes,
                         bag_weight)
        self.classifiers = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_classes))

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)
        attn = torch.softmax(self.attention(h).T, dim=1)  # [C, N]
        pooled = attn @ h  # [C, H]
        logits = torch.cat([clf(pooled[c]) for c, clf in enumerate(self.classifiers)]).unsqueeze(0)
        extra = self._instance_loss(h, attn, label) if label is not None else None
        return MILOutput(logits, attn[int(logits.argmax())], extra)


@register_model("dsmil")
class DSMIL(nn.Module):
    """Dual-stream MIL (Li, Li & Eliceiri 2021).

    Instance stream: Linear(D, C) per instance, bag score = max over instances. Bag stream: queries
    Q = q(x) with q = Linear(D, 128) + ReLU + Linear(128, 128) + Tanh; the critical instance of each class
    (highest instance score) gives q_max; A = softmax_N(Q q_max^T / sqrt(128)) [N, C]; B = A^T V [C, D]
    (V = x, or Linear(D, D) + ReLU with ``passing_v``); logits = Conv1d(C, C, kernel D)(B). Loss 0.5 bag +
    0.5 max-instance: cross-entropy on the bag logits, and, as in DSMIL, per-class binary cross-entropy of
    the max instance logits against the one-hot label (a softmax over class maxima does not learn: the
    class-0 maximum has no instance-level meaning).
    """

    bag_weight = 0.5

    def __init__(self, in_dim: int, n_classes: int = 2, query_dim: int = 128, passing_v: bool = False,
                 dropout_v: float = 0.0):
        super().__init__()
        self.instance_classifier = nn.Linear(in_dim, n_classes)
        self.query = nn.Sequential(nn.Linear(in_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim),
                                   nn.Tanh())
        self.value = (nn.Sequential(nn.Dropout(dropout_v), nn.Linear(in_dim, in_dim), nn.ReLU())
                      if passing_v else nn.Identity())
        self.head = nn.Conv1d(n_classes, n_classes, kernel_size=in_dim)
        self.query_dim = query_dim

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        inst = self.instance_classifier(x)  # [N, C]
        q = self.query(x)  # [N, Q]
        critical = inst.argmax(dim=0)  # [C]
        q_max = self.query(x[critical])  # [C, Q]
        a = torch.softmax(q @ q_max.T / math.sqrt(self.query_dim), dim=0)  # [N, C]
        b = a.T @ self.value(x)  # [C, D]
        logits = self.head(b.unsqueeze(0)).squeeze(-1)  # [1, C]
        extra = None
        if label is not None:
            max_logits = inst.max(dim=0).values.unsqueeze(0)  # [1, C]
            target = F.one_hot(label.view(1).long(), inst.shape[1]).to(max_logits.dtype)
            extra = F.binary_cross_entropy_with_logits(max_logits, target)
        return MILOutput(logits, a[:, int(logits.argmax())], extra)


@register_model("mean")
class MeanPool(nn.Module):
    """Baseline: Linear(D, 512) + ReLU + Dropout(0.25), mean over instances, Linear(512, C)."""

    bag_weight = 1.0

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, dropout: float = 0.25):
        super().__init__()
        self.embed = _embed(in_dim, hidden, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)
        attn = torch.full((x.shape[0],), 1.0 / x.shape[0], device=x.device)
        return MILOutput(self.classifier(h.mean(dim=0, keepdim=True)), attn, None)


@register_model("max")
class MaxPool(nn.Module):
    """Baseline: Linear(D, 512) + ReLU + Dropout(0.25), instance logits Linear(512, C), max over instances."""

    bag_weight = 1.0

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512, dropout: float = 0.25):
        super().__init__()
        self.embed = _embed(in_dim, hidden, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> MILOutput:
        inst = self.classifier(self.embed(x))  # [N, C]
        logits = inst.max(dim=0).values.unsqueeze(0)
        return MILOutput(logits, inst[:, int(logits.argmax())], None)
