"""Test helper: rebuild the encoder goldens' weights from ``keys.json`` by "The weight rule".

See ``../shared/golden/encoders/README.md``: keys in sorted order, one generator seeded 0; norm weights
``1 + randn*0.02``, other parameters ``randn*0.02``, BatchNorm ``running_mean`` ``randn*0.1`` and
``running_var`` ``rand + 0.5``, ``num_batches_tracked`` 0 (no draw); CTransPath's
``relative_position_index`` and ``attn_mask`` buffers take the values the Swin reference constructs
(computed here from their definition, no draw). ``write_official`` saves them as the official files.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch

_NORM_WEIGHT = re.compile(r"(^|\.)(norm|norm1|norm2|layernorm|layernorm_before|layernorm_after)\.weight$")
WINDOW = 7
SHIFT = 3


def read_keys(folder: Path) -> dict:
    """The parsed ``keys.json`` of one encoder's golden folder."""
    return json.loads((folder / "keys.json").read_text())


def relative_position_index(window: int = WINDOW) -> torch.Tensor:
    """int64 [w*w, w*w]: index into the (2w-1)^2 bias table of each (query, key) pair in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(num_windows: int, window: int = WINDOW, shift: int = SHIFT) -> torch.Tensor:
    """float32 [nW, w*w, w*w]: 0 inside a shifted region, -100 across regions (square feature map)."""
    side = window * math.isqrt(num_windows)
    labels = torch.zeros(side, side)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in bounds for c in bounds):
        labels[rows, cols] = label
    grid = labels.view(side // window, window, side // window, window)
    windows = grid.permute(0, 2, 1, 3).reshape(-1, window * window)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


def rule_weights(keys: dict) -> dict[str, torch.Tensor]:
    """The rule's state_dict for the ``keys`` list of a parsed ``keys.json`` (sorted key order)."""
    entries = sorted(keys["keys"], key=lambda e: e["key"])
    names = {e["key"] for e in entries}
    generator = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        key, shape = entry["key"], tuple(entry["shape"])
        bn_weight = key.endswith(".weight") and key[: -len("weight")] + "running_mean" in names
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0, dtype=torch.int64)
        elif key.endswith("relative_position_index"):
            out[key] = relative_position_index()
        elif key.endswith("attn_mask"):
            out[key] = shifted_window_mask(shape[0])
        elif key.endswith("running_mean"):
            out[key] = torch.randn(shape, generator=generator) * 0.1
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=generator) + 0.5
        elif _NORM_WEIGHT.search(key) or bn_weight:
            out[key] = 1.0 + torch.randn(shape, generator=generator) * 0.02
        else:
            out[key] = torch.randn(shape, generator=generator) * 0.02
    return out


def check_mismatches(keys: dict, weights: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose dtype, shape or ``check`` (sum, abs_sum, first 4) disagree with ``keys.json``."""
    bad = []
    for entry in keys["keys"]:
        tensor = weights[entry["key"]]
        check = entry["check"]
        flat = tensor.reshape(-1).double()
        same = (str(tensor.dtype).removeprefix("torch.") == entry["dtype"]
                and list(tensor.shape) == entry["shape"]
                and math.isclose(flat.sum().item(), check["sum"], rel_tol=1e-6, abs_tol=1e-6)
                and math.isclose(flat.abs().sum().item(), check["abs_sum"], rel_tol=1e-6, abs_tol=1e-6)
                and torch.allclose(flat[:4], torch.tensor(check["first"], dtype=torch.float64),
                                   rtol=0, atol=1e-12))
        if not same:
            bad.append(entry["key"])
    return bad


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over each key (sorted) then its tensor's raw little-endian C-contiguous bytes."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_official(name: str, keys: dict, weights: dict[str, torch.Tensor], folder: Path) -> Path:
    """Write ``weights`` in ``name``'s official file format into ``folder``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if name == "uni":
        torch.save(weights, folder / "pytorch_model.bin")
    elif name == "phikon":
        from safetensors.torch import save_file

        (folder / "config.json").write_text(json.dumps(keys["config_json"], indent=2))
        save_file(weights, str(folder / "model.safetensors"))
    elif name == "ctranspath":
        torch.save({"model": weights}, folder / "ctranspath.pth")
    else:
        raise ValueError(f"no official format for {name!r}")
    return folder
