"""A first stage that keeps the tissue colours: fitting a (tiny) ZoomLDM's autoencoder to a cohort's patches.

``zoomfeat fit-first-stage`` writes an official-format checkpoint of a ZoomLDM config whose U-Net and
Summarizer are at their seeded initialisation and whose first stage is fitted to the patches of some slides:

1. the encoder (with ``quant_conv``), ``steps`` Adam steps, maps each patch to its f x f-average colour
   standardised per channel over the patches (f the first stage's downsampling factor), so the latents have about
   unit variance as a trained first stage with its ``scale_factor`` gives. A randomly initialised encoder maps
   stroma and epithelium tiles to latents whose means differ by ~0.5 % of the latent spread, so nothing a U-Net
   denoises would depend on the tissue;
2. the codebook: k-means centres of the fitted latents (what the quantizer snaps decoded latents to);
3. the decoder (with ``post_quant_conv``), ``decoder_steps`` Adam steps on the reconstruction MSE of the patches
   from their quantized latents, the encoder frozen, so that decoded samples show the cohort's colours rather than
   a random decoder's noise (the same recipe as the test suite's fitted generation model).

This is a stand-in for the released VQ-f4 autoencoder on synthetic cohorts, not a way to train a real one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zoomfeat.errors import ConfigError
from zoomfeat.extract.zoomldm import to_model_input
from zoomfeat.mags import parse_mag
from zoomfeat.model import build_zoomldm
from zoomfeat.patches import TilePatchDataset
from zoomfeat.resolve import zoomldm_config_path
from zoomfeat.slides import Slide
from zoomfeat.store import slide_tile_grid, write_json_atomic
from zoomfeat.train.prepare import subsample_rows

PROGRESS_SECONDS = 5.0  # a progress line at least this often


def collect_patches(slides: list[Path], tiles_dir: Path, per_mag: int, seed: int):
    """uint8 [N, 3, 256, 256] of up to ``per_mag`` 20x tiles and 5x patches of each slide (the rows
    ``prepare-train`` would draw with the same seed)."""
    pixels = []
    for path in slides:
        with Slide(path) as slide:
            grid = slide_tile_grid(slide, [parse_mag("20x"), parse_mag("5x")], tiles_dir=tiles_dir)
            slide_id = slide.info.slide_id
        for mag in ("20x", "5x"):
            coords = np.asarray(grid.coords[mag], np.int64).reshape(-1, 2)
            coords = coords[subsample_rows(len(coords), per_mag, seed, slide_id, parse_mag(mag))]
            data = TilePatchDataset(path, coords, parse_mag(mag))
            try:
                pixels += [data[i][1] for i in range(len(data))]
            finally:
                data.close()
    return torch.stack(pixels) if pixels else torch.zeros(0, 3, 256, 256, dtype=torch.uint8)


def _kmeans(points, k: int, generator, iterations: int = 20):
    """k centres of ``points`` [N, D] by Lloyd's algorithm from a seeded random draw of the points."""
    start = torch.randperm(len(points), generator=generator)[:k]
    centres = points[start].clone()
    if len(centres) < k:  # fewer points than codes: repeat them (the surplus codes are never nearest)
        centres = centres.repeat((k + len(centres) - 1) // len(centres), 1)[:k]
    for _ in range(iterations):
        assign = torch.cdist(points, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).float()[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return centres


class _Progress:
    """Prints ``what: step i/n, loss x`` at most every PROGRESS_SECONDS, and the last step."""

    def __init__(self, what: str, total: int, say: Callable[[str], None]):
        self.what, self.total, self.say = what, total, say
        self.start = self.last = time.monotonic()

    def __call__(self, step: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS or step == self.total:
            self.last = now
            self.say(f"fit-first-stage: {self.what} step {step}/{self.total}, loss {loss:.4g} "
                     f"({now - self.start:.0f} s)")


def fit_first_stage(config: Path | str, slides: list[Path], tiles_dir: Path, out_ckpt: Path, *, seed: int,
                    steps: int, decoder_steps: int = 0, per_mag: int = 24, batch: int = 16, lr: float = 1e-3,
                    say: Callable[[str], None] = print) -> dict:
    """Fit the first stage as the module docstring says (``config``: a config.yaml, its folder or ``tiny``); write ``out_ckpt`` (official format) and its record
    ``out_ckpt.with_suffix(".json")``; return the record."""
    if steps < 1 or decoder_steps < 0 or per_mag < 1 or batch < 1 or not lr > 0:
        raise ConfigError("fit-first-stage: --steps and --per-mag must be >= 1, --decoder-steps >= 0, --lr > 0")
    torch.manual_seed(seed)
    model = build_zoomldm(zoomldm_config_path(config))
    fs = model.first_stage_model
    pixels = collect_patches(slides, tiles_dir, per_mag, seed)
    if len(pixels) < batch:
        raise ConfigError(f"only {len(pixels)} tissue patches in {len(slides)} slide(s) under {tiles_dir}: "
                          f"fit-first-stage needs at least --batch-size {batch}; give more slides")
    say(f"fit-first-stage: {len(pixels)} patches from {len(slides)} slides")
    images = to_model_input(pixels, model.first_stage_resolution)
    pooled = F.avg_pool2d(images, model.config.first_stage.downsample_factor)
    mean, std = pooled.mean(dim=(0, 2, 3), keepdim=True), pooled.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
    target = (pooled - mean) / std
    draws = np.random.default_rng([seed, 5])

    def train(params, loss_of, n: int, what: str) -> list[float]:
        optimiser = torch.optim.Adam(params, lr=lr)
        progress, losses = _Progress(what, n, say), []
        for step in range(1, n + 1):
            rows = torch.from_numpy(draws.integers(0, len(images), batch))
            loss = loss_of(rows)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            if not np.isfinite(losses[-1]):
                raise ConfigError(f"fit-first-stage: the {what} fit diverged at step {step} (loss "
                                  f"{losses[-1]}): rerun with a smaller --lr")
            progress(step, losses[-1])
        return losses

    fs.train()
    enc_losses = train(list(fs.encoder.parameters()) + list(fs.quant_conv.parameters()),
                       lambda rows: F.mse_loss(fs.encode(images[rows]), target[rows]), steps, "encoder")
    record = {"patches": len(images), "steps": steps, "first_loss": enc_losses[0], "last_loss": enc_losses[-1],
              "channel_mean": mean.flatten().tolist(), "channel_std": std.flatten().tolist(),
              "decoder_steps": decoder_steps}
    if decoder_steps:
        for p in list(fs.encoder.parameters()) + list(fs.quant_conv.parameters()):
            p.requires_grad_(False)
        with torch.no_grad():
            latents = torch.cat([fs.encode(images[i:i + 64]) for i in range(0, len(images), 64)])
            flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
            book = fs.quantize.embedding.weight
            book.copy_(_kmeans(flat, len(book), torch.Generator().manual_seed(seed)))
            quantized = fs.quantize(latents)
        dec_losses = train(list(fs.decoder.parameters()) + list(fs.post_quant_conv.parameters()),
                           lambda rows: F.mse_loss(fs.decoder(fs.post_quant_conv(quantized[rows])), images[rows]),
                           decoder_steps, "decoder")
        record.update(decoder_first_loss=dec_losses[0], decoder_last_loss=dec_losses[-1])
    fs.eval()
    out_ckpt = Path(out_ckpt)
    out_ckpt.parent.mkdir(parents=True, exist_ok=True)
    model.save_official(out_ckpt)
    write_json_atomic(out_ckpt.with_suffix(".json"), record)
    return record
