"""Decoding large latents by overlapping first-stage windows blended with a Gaussian window.

As the official ``decode_large_image`` (as recorded in the golden files of ``tests/test_generate_golden.py``): latent windows of the
first stage's own latent side ``w`` (64 for ZoomLDM, 16 for the tiny model) at row/column offsets
``0, s, ..., H - w`` (rows outer, columns inner; default stride ``s = w / 4``), each decoded with
``decode_first_stage`` to ``f w`` px (f = the first stage's downsampling factor), multiplied by
``gaussian_kernel(f w, sigma)`` and accumulated at ``(f row, f col)``; image = sum / kernel sum. Works for any
first-stage resolution. Unlike the official code, a last offset ``H - w`` is added when the stride does not
reach it, so no pixel is left as 0/0.

Memory: rows are streamed. Only a band of ``f w`` pixel rows is accumulated; rows no later window touches are
finished and handed to the sink, so a 4096^2 image never holds a float copy of itself (the uint8 output aside).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from zoomfeat.generate.windows import gaussian_kernel, window_offsets


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Float image [B,3,H,W] in [-1,1] -> uint8 [B,H,W,3]: ``clamp((x+1)/2, 0, 1) * 255`` truncated (official)."""
    x = torch.clamp((image.float() + 1.0) / 2.0, 0.0, 1.0) * 255.0
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _decode(model, z: torch.Tensor, autocast) -> torch.Tensor:
    with torch.no_grad(), (autocast() if autocast else torch.autocast("cpu", enabled=False)):
        return model.decode_first_stage(z).float()


def stream_decode(model, latent: torch.Tensor, sink: Callable[[int, torch.Tensor], None], *, stride: int | None = None,
                  sigma: float = 0.8, batch_size: int = 8, autocast=None, tick=None) -> None:
    """Decode ``latent`` [B,C,H,W] window by window; ``sink(row0, rows)`` receives finished pixel rows
    (float [B,3,n,f*W], in order, covering the image exactly once)."""
    window = int(model.config.diffusion.image_size)
    f = int(model.config.first_stage.downsample_factor)
    b, _, h, w = latent.shape
    stride = int(stride or max(1, window // 4))
    rows, cols = window_offsets(h, window, stride), window_offsets(w, window, stride)
    kernel = gaussian_kernel(f * window, sigma=sigma).to(latent.device)
    band = f * window
    num = torch.zeros(b, 3, band, f * w, device=latent.device)
    den = torch.zeros(1, 1, band, f * w, device=latent.device)
    base = 0  # pixel row of num[:, :, 0]
    for i, r in enumerate(rows):
        shift = f * r - base
        if shift:
            _emit(sink, num, den, base, shift)
            num, den = _roll(num, shift), _roll(den, shift)
            base = f * r
        for start in range(0, len(cols), batch_size):
            cs = cols[start:start + batch_size]
            crops = torch.cat([latent[:, :, r:r + window, c:c + window] for c in cs])
            images = _decode(model, crops, autocast)
            for k, c in enumerate(cs):
                num[:, :, :, f * c:f * (c + window)] += images[k * b:(k + 1) * b] * kernel
                den[:, :, :, f * c:f * (c + window)] += kernel
            if tick is not None:
                tick(len(cs))
    _emit(sink, num, den, base, band)


def _emit(sink, num: torch.Tensor, den: torch.Tensor, base: int, n: int) -> None:
    sink(base, num[:, :, :n] / den[:, :, :n])


def _roll(t: torch.Tensor, shift: int) -> torch.Tensor:
    out = torch.zeros_like(t)
    out[:, :, :-shift] = t[:, :, shift:]
    return out


def decode_large(model, latent: torch.Tensor, **kw) -> torch.Tensor:
    """Float image [B,3,fH,fW] (about [-1,1]) of a large latent [B,C,H,W]."""
    f = int(model.config.first_stage.downsample_factor)
    b, _, h, w = latent.shape
    out = torch.empty(b, 3, f * h, f * w)
    stream_decode(model, latent, lambda r0, rows: out[:, :, r0:r0 + rows.shape[2]].copy_(rows.cpu()), **kw)
    return out


def decode_large_uint8(model, latent: torch.Tensor, **kw) -> np.ndarray:
    """uint8 [B, fH, fW, 3] of a large latent, as the official ``decode_large_image`` returns it."""
    f = int(model.config.first_stage.downsample_factor)
    b, _, h, w = latent.shape
    out = np.empty((b, f * h, f * w, 3), dtype=np.uint8)

    def sink(r0: int, rows: torch.Tensor) -> None:
        out[:, r0:r0 + rows.shape[2]] = to_uint8(rows)

    stream_decode(model, latent, sink, **kw)
    return out


def decode_patches(model, latents: torch.Tensor, batch_size: int = 8, autocast=None) -> np.ndarray:
    """uint8 [N, R, R, 3] of patch latents [N, C, h, w], each decoded on its own (``decode_first_stage``)."""
    device = model.alphas_cumprod.device
    out = [to_uint8(_decode(model, latents[i:i + batch_size].to(device), autocast))
           for i in range(0, len(latents), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)
