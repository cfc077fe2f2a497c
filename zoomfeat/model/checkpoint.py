"""Reading and writing official-layout ZoomLDM weight files, with strict key checking."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from zoomfeat.errors import CheckpointError
from zoomfeat.torch_files import load_torch_file

SHOW = 5  # keys listed per kind of mismatch


def read_state_dict(path: str | Path, unsafe: bool = False) -> dict[str, torch.Tensor]:
    """Flat state_dict from ``path``: a flat dict of tensors, or a Lightning checkpoint with "state_dict".

    Loaded weights-only (:func:`zoomfeat.torch_files.load_torch_file`: no code runs) unless ``unsafe`` is set
    for a trusted old pickle of your own (never for a file from the hub cache).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"weight path {path} is a folder: pass the checkpoint file inside it "
                              "(e.g. weights.ckpt)")
    hint = "" if unsafe else " (a trusted pickle with custom objects needs unsafe=True / --unsafe-load)"
    obj = load_torch_file(path, "weight file", fix="pass the released weights.ckpt" + hint, unsafe=unsafe)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state_dict of tensors (nor a Lightning checkpoint with one)")
    return dict(obj)


def _listing(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOW} more)" if len(keys) > SHOW else ""
    return ", ".join(keys[:SHOW]) + more


def check_keys(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` listing missing / unexpected / mis-shaped keys (first few + counts)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if shapes:
        detail = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]
        parts.append(f"{len(shapes)} with other shapes: {_listing(detail)}")
    raise CheckpointError(
        f"{source} does not match the model built from the config ({'; '.join(parts)}): "
        "pass the config.yaml that was released with these weights"
    )


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    check_keys(module, state, source)
    module.load_state_dict(state, strict=True)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a flat state_dict atomically (temp file in the same folder, fsync, rename)."""
    from zoomfeat.store import save_torch

    return save_torch({k: v.detach().cpu().contiguous() for k, v in state.items()}, Path(path))
