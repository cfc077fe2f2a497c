"""Antialiased bicubic resizing (MATLAB ``imresize`` style), as the ``Resizer`` the official code ships.

Behaviour from the golden files' README (resizer.npz, ``tests/test_generate_golden.py``): a scalar scale applies to the last two
axes; output size ``ceil(in * scale)``; separable, ``out = M_H @ x @ M_W^T`` per channel. Row o (1-based
u = o + 1) of the 1-D operator M samples the input at ``x = u/s + (1 - 1/s)/2 - (out - in*s)/(2s)`` with the
Keys cubic (a = -0.5, support 2); when downscaling with antialiasing the kernel is ``s k(s d)`` (support 2/s);
taps outside the input are folded back by symmetric reflection (edge pixel repeated); each row sums to 1.
Upscaling never antialiases. The operators are plain matrices, so :meth:`Resizer.rows` / :meth:`Resizer.cols`
let a caller resize a large image piece by piece (the joint sampler accumulates a 20x mosaic's downsampled
image patch by patch without ever holding the mosaic).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from zoomfeat.errors import ConfigError


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = -0.5."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def resize_matrix(in_size: int, out_size: int, scale: float, antialiasing: bool = True) -> np.ndarray:
    """The 1-D operator [out_size, in_size] (float32) that resizes one axis by ``scale``."""
    aa = antialiasing and scale < 1
    width = 4.0 / scale if aa else 4.0
    u = np.arange(1, out_size + 1, dtype=np.float64)
    x = u / scale + 0.5 * (1 - 1 / scale) - (out_size - in_size * scale) / (2 * scale)
    left = np.floor(x - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # 1-based input pixels
    d = x[:, None] - idx
    w = scale * cubic(scale * d) if aa else cubic(d)
    w = w / w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_size), np.arange(in_size)[::-1]])
    cols = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_size)]
    m = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(m, (np.repeat(np.arange(out_size), taps), cols.reshape(-1)), w.reshape(-1))
    return m.astype(np.float32)


class Resizer:
    """``Resizer(in_shape, scale_factor, output_shape=None, antialiasing=True)(x)`` on [..., H, W] tensors."""

    def __init__(self, in_shape, scale_factor: float, output_shape=None, antialiasing: bool = True):
        in_h, in_w = int(in_shape[-2]), int(in_shape[-1])
        scale = float(scale_factor)
        if not scale > 0 or not math.isfinite(scale):
            raise ConfigError(f"resize scale must be a positive number, got {scale_factor!r}")
        if output_shape is None:
            out_h, out_w = int(math.ceil(in_h * scale)), int(math.ceil(in_w * scale))
        else:
            out_h, out_w = int(output_shape[-2]), int(output_shape[-1])
        self.scale, self.in_hw, self.out_hw = scale, (in_h, in_w), (out_h, out_w)
        self.m_h = torch.from_numpy(resize_matrix(in_h, out_h, scale, antialiasing))
        self.m_w = torch.from_numpy(resize_matrix(in_w, out_w, scale, antialiasing))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.in_hw:
            raise ConfigError(f"Resizer built for {self.in_hw} inputs got {tuple(x.shape[-2:])}")
        m_h, m_w = self.m_h.to(x.device, x.dtype), self.m_w.to(x.device, x.dtype)
        return m_h @ x @ m_w.T

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` of M_H: how input rows start..stop-1 reach every output row. [out_h, n]."""
        return self.m_h[:, start:stop]

    def cols(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` of M_W. [out_w, n]."""
        return self.m_w[:, start:stop]
