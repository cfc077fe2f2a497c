"""Exponential moving average of the U-Net weights, stored as the official ``LitEma`` stores it.

Buffers: ``decay`` (float32 scalar), ``num_updates`` (int32 scalar), and one shadow copy per trainable
parameter of the wrapped module, named by the parameter name without dots (``diffusion_modelout0weight``).
"""

from __future__ import annotations

import torch
from torch import nn


def shadow_name(param_name: str) -> str:
    return param_name.replace(".", "")


class LitEma(nn.Module):
    """Shadow weights of ``model``; ``update`` follows LitEma: decay = min(decay, (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int32))
        self.names: dict[str, str] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.names[name] = shadow_name(name)
                self.register_buffer(self.names[name], p.detach().clone())

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> float:
        """Move the shadows towards ``model``'s parameters; returns the decay used."""
        decay = float(self.decay) if decay is None else float(decay)
        if int(self.num_updates) >= 0:
            self.num_updates += 1
            n = int(self.num_updates)
            decay = min(decay, (1 + n) / (10 + n))
        for name, p in model.named_parameters():
            if name in self.names:
                shadow = getattr(self, self.names[name])
                shadow.sub_((1.0 - decay) * (shadow - p.detach().to(shadow.dtype)))
        return decay

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights into ``model``'s parameters."""
        for name, p in model.named_parameters():
            if name in self.names:
                p.copy_(getattr(self, self.names[name]))
