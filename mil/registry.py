"""The one registry of MIL heads: the base class every head derives from, its output type, ``register_model``.

A head is a plain ``nn.Module`` trained by autograd. Its forward takes a padded batch of bags ``x`` [B, N, D]
with ``mask`` [B, N] (True = a real instance; None: no padding), the torchmil convention, and optionally the
bags' labels [B], and returns a :class:`MILOutput`: ``logits`` [B, C]; ``attention`` [B, N], the per-instance
score drawn in heatmaps (0 at padded positions); ``extra_loss`` [B], the head's auxiliary loss per bag, computed
when labels are given (CLAM's instance clustering, DSMIL's max-instance loss, DTFD's first tier), or None. The
training loss of a bag is :meth:`MILHead.bag_losses`. Padding never changes a bag's numbers (tested per head).

Heads live one per module under :mod:`mil.heads`; that package's explicit list (``HEADS``) names them without
importing torch, and :func:`load_heads` imports them through it when called (importing the registry imports no head).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mil.heads import HEADS
from zoomfeat.errors import ConfigError

MIL_MODELS: dict[str, type[nn.Module]] = {}


class MILOutput(NamedTuple):
    logits: torch.Tensor  # [B, C]
    attention: torch.Tensor  # [B, N]
    extra_loss: torch.Tensor | None = None  # [B] per-bag auxiliary loss, or None
    extra_valid: torch.Tensor | None = None  # [B] bool: bags the auxiliary loss applies to (None: all)


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: add a head to :data:`MIL_MODELS` under ``name``, one of :data:`mil.heads.HEADS`."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MIL_MODELS:
            raise ValueError(f"MIL head {name!r} registered twice")
        if name not in HEADS:
            raise ValueError(f"MIL head {name!r} is not listed in mil.heads.HEADS")
        cls.registry_name = name
        MIL_MODELS[name] = cls
        return cls

    return add


def load_heads() -> dict[str, type[nn.Module]]:
    """Every head of :data:`mil.heads.HEADS`, imported (they register themselves); returns the registry."""
    for module in sorted({m for m, _ in HEADS.values()}):
        importlib.import_module(f"mil.heads.{module}")
    return MIL_MODELS


def build_model(name: str, in_dim: int, n_classes: int, **kwargs) -> nn.Module:
    """Instantiate a registered head; ConfigError for an unknown name or a bad keyword."""
    load_heads()
    if name not in MIL_MODELS:
        raise ConfigError(f"unknown MIL model {name!r}: use one of {', '.join(sorted(MIL_MODELS))}")
    params = inspect.signature(MIL_MODELS[name].__init__).parameters
    for key, value in kwargs.items():  # a JSON "false" string would otherwise switch a flag on
        if key in params and params[key].annotation in (bool, "bool") and not isinstance(value, bool):
            raise ConfigError(f"model argument {key}={value!r} of {name!r} must be true or false; "
                              "check --model-kwargs")
    try:
        return MIL_MODELS[name](in_dim=in_dim, n_classes=n_classes, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad model arguments for {name!r} ({exc}); check --model-kwargs") from exc


class MILHead(nn.Module):
    """Base of every head: ``forward(x [B, N, D], mask [B, N] | None, label [B] | None) -> MILOutput``."""

    bag_weight = 1.0  # share of the bag cross-entropy in the loss of a head with an auxiliary loss
    clip_groups: dict[str, float] = {}  # parameter-name prefix -> max gradient norm (DTFD's clipping)

    def combine(self, ce: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """Training loss from the bag cross-entropy and the auxiliary loss."""
        return self.bag_weight * ce + (1.0 - self.bag_weight) * extra

    def bag_losses(self, out: MILOutput, label: torch.Tensor) -> torch.Tensor:
        """Per-bag training loss [B]: cross-entropy, mixed with the auxiliary loss where it applies."""
        ce = F.cross_entropy(out.logits.float(), label, reduction="none")
        if out.extra_loss is None:
            return ce
        mixed = self.combine(ce, out.extra_loss.float())
        return mixed if out.extra_valid is None else torch.where(out.extra_valid, mixed, ce)


def one_by_one(forward_one, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None) -> MILOutput:
    """A padded batch through a head whose arithmetic mixes a bag's instances beyond a masked softmax
    (TransMIL's landmarks and token grid, DTFD's pseudo-bags): ``forward_one(bag [1, n, D], label [1] | None)``
    per bag on its real instances, attention zero-padded back to [B, N]."""
    if x.shape[0] == 1 and mask is None:
        return forward_one(x, label)
    sizes = [x.shape[1]] * x.shape[0] if mask is None else mask.sum(-1).tolist()  # real instances per bag
    outs = [forward_one(x[b:b + 1, :n], None if label is None else label[b:b + 1]) for b, n in enumerate(sizes)]
    attention = torch.stack([F.pad(o.attention[0], (0, x.shape[1] - o.attention.shape[1])) for o in outs])
    extra = None if outs[0].extra_loss is None else torch.cat([o.extra_loss for o in outs])
    return MILOutput(torch.cat([o.logits for o in outs]), attention, extra)
