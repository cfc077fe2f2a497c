"""Bags of a run held as one contiguous tensor, so a training step is a view (one bag) or one gather (padded
bags), with no Dataset/DataLoader round trip.

:class:`BagCache` reads each bag once through :class:`mil.bags.BagStore` and concatenates them into
``data`` float32 [total instances, D] with ``offsets``; on a GPU the tensor is moved to the device once when it
fits in a quarter of the free memory, else kept in pinned host memory and copied per step (non-blocking).
:class:`LazyBags` (``--no-cache``) reads every bag from its file when it is needed.
"""

from __future__ import annotations

import torch

from mil.bags import BagStore


def pad_bags(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, N_max, D] zero-padded bags and their mask [B, N_max] (None for a single bag: no padding)."""
    if len(bags) == 1:
        return bags[0].unsqueeze(0), None
    longest = max(b.shape[0] for b in bags)
    x = bags[0].new_zeros((len(bags), longest, bags[0].shape[1]))
    mask = torch.zeros((len(bags), longest), dtype=torch.bool, device=bags[0].device)
    for i, b in enumerate(bags):
        x[i, :b.shape[0]] = b
        mask[i, :b.shape[0]] = True
    return x, mask


class LazyBags:
    """Bags read through the store on every access (the store's own cache decides what stays in memory)."""

    def __init__(self, store: BagStore, slide_ids: list[str], device: str = "cpu"):
        self.store, self.ids, self.device = store, list(slide_ids), device

    def bag(self, i: int) -> torch.Tensor:
        return self.store.get(self.ids[i]).features.to(self.device)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return pad_bags([self.bag(i) for i in indices])


class BagCache(LazyBags):
    """Every bag of ``slide_ids`` in one contiguous float32 tensor; ``bag(i)`` is a view."""

    def __init__(self, store: BagStore, slide_ids: list[str], device: str = "cpu"):
        super().__init__(store, slide_ids, device)
        feats = [store.get(s).features for s in self.ids]
        sizes = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
        self.offsets = [0, *torch.cumsum(sizes, 0).tolist()]
        data = torch.cat(feats).to(torch.float32).contiguous()
        if device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            data = data.to(device) if data.numel() * 4 < free / 4 else data.pin_memory()
        self.data = data

    def bag(self, i: int) -> torch.Tensor:
        view = self.data[self.offsets[i]:self.offsets[i + 1]]
        return view if view.device.type == torch.device(self.device).type else view.to(self.device,
                                                                                       non_blocking=True)
