"""ZoomLDM: the official LatentDiffusion state_dict layout around our U-Net, first stage and Summarizer.

Submodules carry the official prefixes: ``model.diffusion_model`` (U-Net), ``model_ema`` (LitEma shadows),
``first_stage_model`` (VQ-f4), ``cond_stage_model`` (Summarizer), plus the 12 schedule buffers, so
``state_dict()`` keys are exactly the official ones and :meth:`ZoomLDM.save_official` writes a file the
official code loads strictly. Training optimises ``m.model.diffusion_model`` and ``m.cond_stage_model``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from zoomfeat.errors import CheckpointError, ConfigError
from zoomfeat.model import samplers
from zoomfeat.model.config import ZoomLDMConfig, read_config
from zoomfeat.model.checkpoint import load_strict, read_state_dict, save_state_dict
from zoomfeat.model.ema import LitEma
from zoomfeat.model.first_stage import VQModel
from zoomfeat.model.schedule import linear_schedule, q_sample
from zoomfeat.model.summarizer import Summarizer, preprocess_ssl
from zoomfeat.model.unet import UNetModel
from zoomfeat.resolve import zoomldm_config_path


class DiffusionWrapper(nn.Module):
    """Holds the U-Net under the official name ``diffusion_model``."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class ZoomLDM(nn.Module):
    """The released model: conditioning, first stage, forward process, U-Net (eps / features) and samplers."""

    def __init__(self, config: ZoomLDMConfig):
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(UNetModel(config.unet))
        if config.diffusion.use_ema:
            self.model_ema = LitEma(self.model)
        self.first_stage_model = VQModel(config.first_stage)
        self.cond_stage_model = Summarizer(config.summarizer)
        d = config.diffusion
        for name, value in linear_schedule(d.timesteps, d.linear_start, d.linear_end).items():
            self.register_buffer(name, value)
        self.ema_in_unet = False  # True while the EMA weights sit in the U-Net (see ema_swap)

    # ----- sizes other modules need -------------------------------------------------------------------
    @property
    def first_stage_resolution(self) -> int:
        """Image side (px) the first stage was built for (``ddconfig.resolution``)."""
        return self.config.first_stage.resolution

    @property
    def conditioning_dim(self) -> int:
        """Channels of a conditioning grid (UNI: 1024)."""
        return self.config.summarizer.input_channels

    @property
    def context_dim(self) -> int:
        return self.config.unet.context_dim

    @property
    def num_timesteps(self) -> int:
        return self.config.diffusion.timesteps

    @property
    def mag_levels(self) -> int:
        return self.config.summarizer.mag_levels

    @property
    def latent_channels(self) -> int:
        return self.config.unet.in_channels

    @property
    def unet_model(self) -> UNetModel:
        return self.model.diffusion_model

    def feature_dim(self, block: int = 3) -> int:
        """Channels of ``output_blocks[block]``."""
        chans = self.unet_model.output_channels
        if not 0 <= block < len(chans):
            raise ConfigError(f"block {block} out of range: this U-Net has output blocks 0..{len(chans) - 1}")
        return chans[block]

    # ----- conditioning ------------------------------------------------------------------------------
    def preprocess_ssl(self, grid: torch.Tensor) -> torch.Tensor:
        """Raw conditioning grid [C,h,w] (or [B,C,h,w]) -> pooled to at most 8x8, standardised per location."""
        return preprocess_ssl(grid, self.config.summarizer.grid_side)

    def summarize(self, grids, mags: torch.Tensor) -> torch.Tensor:
        """Preprocessed grids (list of [C,h,w]) + magnification indices [B] -> context [B, 65, D]."""
        return self.cond_stage_model(grids, mags)

    # ----- first stage and forward process ------------------------------------------------------------
    def encode_first_stage(self, img: torch.Tensor) -> torch.Tensor:
        """Image [B,3,R,R] in [-1,1] -> pre-quantization latent [B,embed_dim,R/4,R/4] (times scale_factor)."""
        return self.first_stage_model.encode(img) * self.config.diffusion.scale_factor

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> quantize -> decode -> image in about [-1, 1]."""
        return self.first_stage_model.decode(z / self.config.diffusion.scale_factor)

    def q_sample(self, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noisy latent x_t for integer timesteps t [B]; ``noise`` defaults to standard normal."""
        noise = torch.randn_like(z) if noise is None else noise
        return q_sample(self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod, z, t, noise)

    # ----- U-Net --------------------------------------------------------------------------------------
    def unet(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Predicted noise eps [B,C,h,w] for x_t [B,C,h,w], t [B], context [B,65,D]."""
        return self.unet_model(x_t, t, context)

    def unet_features(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      block: int | None = 3) -> torch.Tensor:
        """Activation of ``output_blocks[block]`` [B, feature_dim(block), h', w'] (``None``: middle block);
        the blocks after it are not computed."""
        return self.unet_model.features(x_t, t, context, block)

    # ----- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, context: torch.Tensor, x_T: torch.Tensor | None = None, steps: int = 50,
               guidance: float = 2.0, sampler: str = "ddim") -> torch.Tensor:
        """Clean latent [B,C,h,w] from x_T (standard normal when None), DDIM or PLMS, zeros as the
        unconditional context, the official timestep spacing."""
        if sampler not in samplers.SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r}: use one of {', '.join(sorted(samplers.SAMPLERS))}")
        if x_T is None:
            side = self.config.diffusion.image_size
            x_T = torch.randn(len(context), self.latent_channels, side, side, device=context.device)
        fn = samplers.SAMPLERS[sampler]
        return fn(self.unet, self.alphas_cumprod, x_T, context, torch.zeros_like(context), steps, guidance)

    # ----- EMA ----------------------------------------------------------------------------------------
    def _require_ema(self) -> LitEma:
        if not hasattr(self, "model_ema"):
            raise ConfigError("this model has no EMA weights (model.params.use_ema is false in its config)")
        return self.model_ema

    def _swap_ema(self) -> None:
        """Exchange the U-Net parameters with the EMA shadows (no copy: the storages trade places)."""
        ema = self._require_ema()
        for name, p in self.model.named_parameters():
            shadow = getattr(ema, ema.names[name])
            p.data, shadow.data = shadow.data, p.data
        self.ema_in_unet = not self.ema_in_unet

    @contextmanager
    def ema_swap(self):
        """Run the body with the EMA weights in the U-Net (no-op when they are already there)."""
        if self.ema_in_unet:
            yield self
            return
        self._swap_ema()
        try:
            yield self
        finally:
            self._swap_ema()

    def use_ema_weights(self, enabled: bool = True) -> None:
        """Put the EMA weights into the U-Net (or back the raw ones) until told otherwise."""
        if enabled != self.ema_in_unet:
            self._swap_ema()

    @torch.no_grad()
    def update_ema(self, decay: float | None = None) -> float:
        """One LitEma step towards the current U-Net weights; returns the decay used."""
        ema = self._require_ema()
        if self.ema_in_unet:
            raise ConfigError("the EMA weights are in the U-Net: load with use_ema=False to train")
        return ema.update(self.model, decay)

    # ----- files --------------------------------------------------------------------------------------
    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """Flat state_dict in the official layout, raw weights under ``model.*`` whatever is swapped in."""
        state = self.state_dict()
        if self.ema_in_unet:
            ema = self.model_ema
            for name in ema.names:
                raw_key, ema_key = f"model.{name}", f"model_ema.{ema.names[name]}"
                state[raw_key], state[ema_key] = state[ema_key], state[raw_key]
        return state

    def save_official(self, path: str | Path) -> Path:
        """Write a flat state_dict that the official LatentDiffusion loads strictly."""
        return save_state_dict(self.official_state_dict(), path)


def build_zoomldm(config, device: str | torch.device | None = None) -> ZoomLDM:
    """Randomly initialised ZoomLDM from an official config (path, folder, mapping or parsed config).

    ``device="meta"`` builds shapes only (no memory), e.g. to check the layout of the full-size model.
    """
    cfg = read_config(config)
    if device is None:
        return ZoomLDM(cfg)
    with torch.device(device):
        return ZoomLDM(cfg)


def _weights_path(config, weights) -> Path | None:
    if weights is not None:
        return Path(weights)
    if isinstance(config, (str, Path)) and Path(config).is_dir():
        return Path(config) / "weights.ckpt"
    return None


def load_zoomldm(config, weights=None, use_ema: bool = True, device: str | torch.device = "cpu",
                 unsafe: bool = False) -> ZoomLDM:
    """Build from the official config.yaml (or its folder) and load the weights strictly, in eval mode.

    ``weights``: a flat official state_dict or a Lightning checkpoint with "state_dict"; defaults to
    ``<folder>/weights.ckpt`` when ``config`` is a folder; ``None`` otherwise gives random weights.
    With ``use_ema`` the EMA weights go into the U-Net. ``unsafe`` allows full unpickling (trusted files).
    """
    if isinstance(config, (str, Path)):
        zoomldm_config_path(config)  # fail early, naming the file
    model = build_zoomldm(config)
    path = _weights_path(config, weights)
    if path is not None:
        load_strict(model, read_state_dict(path, unsafe=unsafe), str(path))
    model.weights_path = path  # what it was loaded from (artifacts made with it check their provenance by hash)
    if use_ema:
        if not hasattr(model, "model_ema"):
            raise CheckpointError("use_ema=True but the config has no EMA (model.params.use_ema false): pass use_ema=False")
        model.use_ema_weights(True)
    return model.to(device).eval()
