"""Conditions at window positions: slerp between 20x embeddings, re-standardised, summarised at 20x.

The large-image helpers of the official ZoomLDM code (``large_image_gen/postprocess.py``) condition a latent
window whose top-left corner sits at latent pixel (i, j) on the 20x embedding grid interpolated at that point:
the grid ``E [D, h, w]`` is replicate-padded by one row (bottom) and one column (right); with
``r, c = i // p, j // p`` and ``ty, tx = i / p - r, j / p - c`` (``p`` = latent pixels per 20x tile),
``top = slerp(tx, E[r, c], E[r, c+1])``, ``bot = slerp(tx, E[r+1, c], E[r+1, c+1])``, ``e = slerp(ty, top, bot)``
(horizontal first: slerp is not separable), then ``e = (e - mean) / std`` over the D channels (unbiased std, no
epsilon) and the context is the Summarizer output for the grid ``e [D, 1, 1]`` at magnification 20x.
Behaviour as stated in the golden files' README (``tests/test_generate_golden.py``); written from that description.
"""

from __future__ import annotations

import numpy as np
import torch

DOT_THRESHOLD = 0.9995  # |cos| above it: linear interpolation (the official default)


def slerp(t, v0, v1, dot_threshold: float = DOT_THRESHOLD):
    """Spherical interpolation of raw (unnormalised) vectors, batched over leading axes.

    ``v0``, ``v1``: arrays or tensors [..., D]; ``t``: a float or an array broadcastable to [...].
    ``|cos| > dot_threshold`` takes ``(1-t) v0 + t v1`` (nearly parallel and nearly anti-parallel pairs).
    Computed in numpy at the input precision; returns the input type (a tensor on the input device/dtype).
    """
    is_torch = isinstance(v0, torch.Tensor)
    like = v0 if is_torch else None
    a = v0.detach().cpu().numpy() if is_torch else np.asarray(v0)
    b = v1.detach().cpu().numpy() if isinstance(v1, torch.Tensor) else np.asarray(v1, dtype=a.dtype)
    tt = np.asarray(t, dtype=np.float64)
    dtype = a.dtype.type
    cos = np.sum(a * b / (np.linalg.norm(a, axis=-1, keepdims=True) * np.linalg.norm(b, axis=-1, keepdims=True)),
                 axis=-1)
    linear = np.abs(cos) > dot_threshold
    theta = np.arccos(np.clip(cos, -1, 1))
    sin_theta = np.sin(theta)
    tt = np.broadcast_to(tt, cos.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        s0 = np.sin(theta - theta * tt.astype(a.dtype)) / sin_theta
        s1 = np.sin(theta * tt.astype(a.dtype)) / sin_theta
    s0 = np.where(linear, 1 - tt, s0).astype(a.dtype)[..., None]
    s1 = np.where(linear, tt, s1).astype(a.dtype)[..., None]
    out = (s0 * a + s1 * b).astype(dtype)
    if is_torch:
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=like.device, dtype=like.dtype)
    return out


def embeddings_at(grid: np.ndarray | torch.Tensor, positions: np.ndarray, patch_size: int) -> np.ndarray:
    """Interpolated, standardised embeddings at window corners. float32 [N, D].

    ``grid``: raw 20x embeddings [D, h, w] (channel first); ``positions``: int [N, 2] of (row i, column j)
    in latent pixels; ``patch_size``: latent pixels per 20x tile (the model's latent side, 64 for ZoomLDM).
    """
    g = grid.detach().cpu().numpy() if isinstance(grid, torch.Tensor) else np.asarray(grid)
    g = np.ascontiguousarray(g.astype(np.float32).transpose(1, 2, 0))  # [h, w, D]
    padded = np.pad(g, ((0, 1), (0, 1), (0, 0)), mode="edge")
    pos = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
    r, c = pos[:, 0] // patch_size, pos[:, 1] // patch_size
    ty = pos[:, 0] / patch_size - r
    tx = pos[:, 1] / patch_size - c
    top = slerp(tx, padded[r, c], padded[r, c + 1])
    bot = slerp(tx, padded[r + 1, c], padded[r + 1, c + 1])
    e = torch.from_numpy(slerp(ty, top, bot))
    return standardise(e).numpy()


def standardise(e: torch.Tensor) -> torch.Tensor:
    """(e - mean) / std over the last axis, unbiased std, no epsilon (as the official helper)."""
    return (e - e.mean(dim=-1, keepdim=True)) / e.std(dim=-1, keepdim=True)


def contexts_20x(model, embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Summarizer contexts [N, 65, D_ctx] of standardised 20x embeddings [N, D], each fed as a [D, 1, 1] grid."""
    device = model.pad_device if hasattr(model, "pad_device") else next(model.parameters()).device
    e = torch.as_tensor(np.asarray(embeddings, dtype=np.float32) if not isinstance(embeddings, torch.Tensor)
                        else embeddings).to(device)
    mags = torch.zeros(len(e), dtype=torch.long, device=device)
    return model.summarize(list(e[:, :, None, None]), mags)


def window_contexts(model, grid, positions: np.ndarray, patch_size: int) -> torch.Tensor:
    """``get_conditioning`` for many windows: contexts [N, 65, D_ctx] at ``positions`` (row, col) of ``grid``."""
    return contexts_20x(model, embeddings_at(grid, positions, patch_size))
