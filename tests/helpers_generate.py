"""Test helpers of the generation wing: a very small *fitted* ZoomLDM for measuring sampler properties.

Why a fitted model: the joint sampler moves latents by ``J_E`` (the encoder's Jacobian) applied to an
image-space residual, which only reduces that residual when decode(encode(x)) ~ x, and it needs clean
estimates that stay in the range of the data. The packaged tiny model's random first stage (and the golden
small model's) are random maps, and a random U-Net's estimates explode (the golden README notes |x| ~ 200), so
no constraint could pass an agreement test on them. Fitting takes about 90 s on one CPU thread, so it is done
once per machine: :func:`fitted_model_dir` fits it into a cache folder (``$ZOOMFEAT_TEST_CACHE``, default
``~/.cache/zoomfeat-tests``) named after this file's contents and the torch version, and the ``generate_tiny``
fixture (conftest.py) builds it for the tests that use it (official-format ``config.yaml`` + flat
``weights.ckpt``, loaded with ``zoomfeat.model.load_zoomldm`` like any checkpoint). Fits on different machines
can differ in their last bits; the tests assert properties every fit of this recipe has (two independent fits
pass them), not its exact weights.

The model: 16-px images, VQ first stage with f = 2 (3x8x8 latents, 256 codes), a 32/64-wide U-Net, a 1-layer
Summarizer on 32-d embeddings. Fitting: the autoencoder by Adam on reconstruction MSE of smooth random colour
images (bicubic-upsampled noise), codebook = k-means centres of its latents; then the U-Net and Summarizer by
the eps objective on those latents with random contexts (30 % zeros, the classifier-free dropout).
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

def _cache_key() -> str:
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes() + torch.__version__.encode()).hexdigest()[:12]


CACHE = Path(os.environ.get("ZOOMFEAT_TEST_CACHE", Path.home() / ".cache" / "zoomfeat-tests"))
DATA = CACHE / f"generate_tiny-{_cache_key()}"  # built by fitted_model_dir() (the ``generate_tiny`` fixture)

TINY_GEN_CONFIG = {"model": {"params": {
    "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 8, "channels": 3,
    "conditioning_key": "crossattn", "use_ema": True, "cond_stage_key": "hybrid", "first_stage_key": "image",
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
        "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 1,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 64}},
    "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
        "embed_dim": 3, "n_embed": 256, "ddconfig": {
            "double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.EmbeddingViT2_5", "params": {
        "feat_key": "ssl_feat", "mag_key": "mag",
        "num_layers": 1, "input_channels": 32, "hidden_channels": 64, "vit_mlp_dim": 64, "p_uncond": 0.0,
        "output_channels": 64, "num_heads": 4, "mag_levels": 8}},
}, "target": "ldm.models.diffusion.ddpm.LatentDiffusion"}}


def smooth_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random smooth colour images in [-1, 1]: bicubic-upsampled 3x3 noise plus a finer 6x6 layer."""
    coarse = torch.randn(n, 3, 3, 3, generator=generator)
    fine = torch.randn(n, 3, 6, 6, generator=generator) * 0.4
    x = (F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
         + F.interpolate(fine, size=size, mode="bicubic", align_corners=False))
    return torch.tanh(0.7 * x)


def _fit_first_stage(model, g: torch.Generator, steps: int) -> None:
    fs = model.first_stage_model
    opt = torch.optim.Adam(fs.parameters(), lr=2e-3)
    res = model.first_stage_resolution
    for step in range(steps):
        x = smooth_images(32, res, g)
        y = fs.decoder(fs.post_quant_conv(fs.quant_conv(fs.encoder(x))))
        loss = F.mse_loss(y, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"first stage step {step}: mse {loss.item():.5f}", flush=True)
    with torch.no_grad():  # codebook: k-means centres of the latents
        lat = model.encode_first_stage(smooth_images(256, res, g)).permute(0, 2, 3, 1).reshape(-1, 3)
        book = fs.quantize.embedding.weight
        centres = lat[torch.randperm(len(lat), generator=g)[: len(book)]].clone()
        for _ in range(20):
            assign = torch.cdist(lat, centres).argmin(1)
            sums = torch.zeros_like(centres).index_add_(0, assign, lat)
            counts = torch.bincount(assign, minlength=len(centres)).float()[:, None]
            centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        book.copy_(centres)


def _fit_unet(model, g: torch.Generator, steps: int) -> None:
    params = list(model.model.parameters()) + list(model.cond_stage_model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    res, dim = model.first_stage_resolution, model.conditioning_dim
    for step in range(steps):
        with torch.no_grad():
            z0 = model.encode_first_stage(smooth_images(32, res, g))
        n = len(z0)
        t = torch.randint(0, model.num_timesteps, (n,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        grids = [model.preprocess_ssl(torch.randn(dim, 1, 1, generator=g)) for _ in range(n)]
        ctx = model.summarize(grids, torch.randint(0, 8, (n,), generator=g))
        ctx = ctx * (torch.rand(n, 1, 1, generator=g) > 0.3)
        loss = F.mse_loss(model.unet(model.q_sample(z0, t, noise), t, ctx), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"unet step {step}: eps mse {loss.item():.5f}", flush=True)


def fit_tiny_generation_model(out: Path = DATA, seed: int = 0, ae_steps: int = 300, unet_steps: int = 400) -> Path:
    """Fit the model described above and write ``out/config.yaml`` + ``out/weights.ckpt`` (EMA = raw)."""
    import yaml

    from zoomfeat.model import build_zoomldm

    torch.manual_seed(seed)
    model = build_zoomldm(copy.deepcopy(TINY_GEN_CONFIG))
    g = torch.Generator().manual_seed(seed)
    _fit_first_stage(model, g, ae_steps)
    for p in model.first_stage_model.parameters():
        p.requires_grad_(False)
    _fit_unet(model, g, unet_steps)
    with torch.no_grad():
        for name, p in model.model.named_parameters():  # EMA shadows = the fitted weights
            getattr(model.model_ema, model.model_ema.names[name]).copy_(p)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(TINY_GEN_CONFIG, sort_keys=False))
    state = model.official_state_dict()  # network weights stored as float16 (half the file; loaded into fp32)
    nets = ("model", "model_ema", "first_stage_model", "cond_stage_model")
    torch.save({k: v.half() if v.is_floating_point() and k.split(".")[0] in nets else v for k, v in state.items()},
               out / "weights.ckpt")
    return out


def fitted_model_dir() -> Path:
    """:data:`DATA`, fitted on first use (one thread, ~90 s), then reused: written to a temporary folder and
    renamed into place, so an interrupted fit leaves nothing that looks finished."""
    if (DATA / "weights.ckpt").exists():
        return DATA
    tmp = DATA.with_name(f"{DATA.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit_tiny_generation_model(tmp)
    finally:
        torch.set_num_threads(threads)
    try:
        tmp.rename(DATA)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return DATA


if __name__ == "__main__":
    print(fitted_model_dir())
