"""Reading official weight files and loading them strictly.

Weight files are read with ``torch.load(weights_only=True)`` (no pickled code runs) or safetensors.
Every mismatch between a file and an architecture is a ``CheckpointError`` that lists the missing,
unexpected and mis-shaped keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from zoomfeat.errors import CheckpointError, ConfigError, one_line

_LISTED = 8  # keys named per category in an error message


def resolve_file(path: str | Path, names: Sequence[str], encoder: str) -> Path:
    """The weight file: ``path`` itself, or the first of ``names`` inside the folder ``path``.

    ConfigError naming the path and the expected file names when neither exists.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        inside = sorted(p.name for p in path.iterdir())[:5]
        raise ConfigError(f"{encoder}: folder {path} exists but holds no weight file: expected one of "
                          f"{', '.join(names)} inside it (found: {', '.join(inside) or 'nothing'}); pass the file "
                          "or a folder that holds it")
    raise ConfigError(f"{encoder}: weight path {path} does not exist: pass the official file "
                      f"({' or '.join(names)}) or a folder that holds it")


def read_state_dict(path: Path, container_key: str | None = None) -> dict[str, torch.Tensor]:
    """Flat name -> tensor mapping from a ``.safetensors`` or a torch file (``weights_only=True``).

    ``container_key`` (e.g. ``"model"``) unwraps a dict that holds the state_dict under that key; a file
    without it is taken as the state_dict itself.
    """
    from zoomfeat.model.checkpoint import check_checkpoint_file

    check_checkpoint_file(path, "a torch or .safetensors weight file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises KeyError/IndexError/EOFError ... on foreign bytes
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read weight file {path}: {reason}; "
                              "pass the official, unmodified file") from error
    if container_key is not None and isinstance(obj, Mapping) and isinstance(obj.get(container_key), Mapping):
        obj = obj[container_key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"weight file {path} does not hold a state_dict (name -> tensor)"
                              + (f" or a dict with one under {container_key!r}" if container_key else ""))
    return dict(obj)


def _names(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _LISTED} more)" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def key_problems(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and mis-shaped keys of ``state_dict`` against ``model.state_dict()``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {list(state_dict[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches (file vs model): {_names(shapes)}")
    return problems


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Path | str,
                what: str, *, assign: bool = False) -> nn.Module:
    """Copy ``state_dict`` into ``model`` strictly; CheckpointError listing every kind of mismatch.

    ``what`` names the expected layout in the message (e.g. "UNI ViT-L/16 (timm)"). ``assign=True``
    takes the file's tensors as the parameters (for a model built on the meta device: no init cost).
    """
    problems = key_problems(model, state_dict)
    if problems:
        raise CheckpointError(f"{source} does not match {what}: {'; '.join(problems)}; "
                              f"pass the official, unmodified weight file")
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model


def import_timm(encoder: str):
    """The ``timm`` module; ConfigError naming the encoder and the fix when it cannot be imported."""
    try:
        import timm
    except (ImportError, RuntimeError, OSError) as error:
        raise ConfigError(f"{encoder} needs timm (and a torchvision build matching torch), which failed "
                          f"to import: {one_line(error)}; reinstall torchvision for this torch") from error
    return timm


def build_on_meta(factory):
    """``factory()`` run on the meta device: the architecture without the cost of its random init.

    Only for models without buffers (their values would be lost); load weights with ``assign=True``.
    """
    with torch.device("meta"):
        model = factory()
    if any(True for _ in model.buffers()):
        raise RuntimeError("build_on_meta needs a model without buffers")
    return model


@torch.no_grad()
def fill_random(model: nn.Module, seed: int, pool_size: int = 1 << 20) -> nn.Module:
    """Materialise a meta-device model with seeded random weights (for checks, not for features).

    LayerNorm weights 1 and biases 0; every other parameter is filled, in ``named_parameters`` order,
    from one pool of ``pool_size`` values ``randn * 0.02`` (generator seeded with ``seed``), read
    cyclically: far cheaper than drawing 300M values for UNI, and the same in every process.
    """
    model.to_empty(device="cpu")
    pool = torch.randn(pool_size, generator=torch.Generator().manual_seed(seed)) * 0.02
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    offset = 0
    for name, parameter in model.named_parameters():
        if id(parameter) in norm_params:
            parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        flat = parameter.view(-1)
        start = 0
        while start < flat.numel():
            take = min(flat.numel() - start, pool_size - offset)
            flat[start:start + take] = pool[offset:offset + take]
            start, offset = start + take, (offset + take) % pool_size
        offset = (offset + 7919) % pool_size  # shift between parameters so equal shapes differ
    return model
