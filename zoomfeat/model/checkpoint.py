"""Reading and writing official-layout ZoomLDM weight files, with strict key checking."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from zoomfeat.errors import CheckpointError

SHOW = 5  # keys listed per kind of mismatch


def read_state_dict(path: str | Path, unsafe: bool = False) -> dict[str, torch.Tensor]:
    """Flat state_dict from ``path``: a flat dict of tensors, or a Lightning checkpoint with "state_dict".

    Loaded with ``weights_only=True`` (no code runs) unless ``unsafe`` is set for a trusted old pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path} not found: pass the released weights.ckpt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, OSError) as e:
        hint = "" if unsafe else " (a trusted pickle with custom objects needs unsafe=True / --unsafe-load)"
        raise CheckpointError(f"cannot read weights {path}: {str(e).splitlines()[0]}{hint}") from e
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
