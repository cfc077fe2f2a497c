"""Load the networks of an extraction run and describe them in ``extractor_config`` (with weight sha256s)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zoomfeat import __version__
from zoomfeat.errors import ConfigError
from zoomfeat.extract.config import ExtractConfig
from zoomfeat.runtime import Runtime
from zoomfeat.resolve import WEIGHT_NAMES, file_sha256, resolve_zoomldm  # noqa: F401 (re-exported)


def resolve_zoomldm_paths(zoomldm: str | Path, weights: str | Path | None) -> tuple[Path, Path]:
    """(config.yaml, checkpoint) from ``--zoomldm CONFIG_OR_DIR`` and an optional ``--weights CKPT``."""
    source = resolve_zoomldm(zoomldm, weights)
    return source.config, source.weights


@dataclass
class Networks:
    """What one run computes with: ``featurizer`` (a :class:`zoomfeat.extract.featurizer.Featurizer`),
    ``conditioner`` (20x encoder or None); ``extractor_config`` is the featurizer's provenance."""

    featurizer: object
    conditioner: object | None
    extractor: str
    extractor_config: dict
    conditioning_config: dict | None


def _conditioner_config(cfg: ExtractConfig, dim: int) -> dict:
    return {
        "role": "zoomldm conditioning (20x tile embeddings)",
        "encoder": cfg.conditioner,
        "weights_sha256": file_sha256(cfg.conditioner_weights),
        "dim": dim,
        "seed": cfg.toy_seed if cfg.conditioner == "toy" else None,
        "code_version": __version__,
    }


def load_networks(cfg: ExtractConfig, runtime: Runtime) -> Networks:
    """Build the featurizer (ZoomLDM or baseline encoder) on ``runtime.device`` and its provenance."""
    if cfg.is_zoomldm:
        return _load_zoomldm(cfg, runtime)
    return _load_baseline(cfg, runtime)


def _load_baseline(cfg: ExtractConfig, runtime: Runtime) -> Networks:
    from zoomfeat.encoders import load_encoder
    from zoomfeat.extract.baseline import EncoderFeaturizer

    encoder = load_encoder(cfg.encoder, cfg.weights, seed=cfg.toy_seed).to(runtime.device)
    config = {
        "encoder": cfg.encoder, "checkpoint_sha256": file_sha256(cfg.weights), "dim": encoder.spec.dim,
        "seed": cfg.toy_seed if cfg.encoder == "toy" else None,  # the toy encoder's weights come from its seed
        "input_size": encoder.spec.input_size, "patch_size": 256, "precision": runtime.precision,
        "mags": list(cfg.mag_names), "code_version": __version__,
    }
    featurizer = EncoderFeaturizer(encoder, runtime.device, runtime.autocast(), provenance=config)
    return Networks(featurizer, None, cfg.encoder, config, None)


def _load_zoomldm(cfg: ExtractConfig, runtime: Runtime) -> Networks:
    import torch

    from zoomfeat.extract.zoomldm import ZoomLDMFeaturizer
    from zoomfeat.model import load_zoomldm

    model = load_zoomldm(cfg.zoomldm_config, cfg.weights, use_ema=True, device=runtime.device).eval()
    if not 0 <= cfg.timestep < model.num_timesteps:
        raise ConfigError(f"bad --timestep {cfg.timestep}: the model has {model.num_timesteps} steps "
                          f"(0..{model.num_timesteps - 1})")
    model.feature_dim(cfg.block)  # ConfigError naming the valid blocks
    if runtime.is_cuda:
        model = model.to(memory_format=torch.channels_last)
    featurizer = ZoomLDMFeaturizer(model, cfg.timestep, cfg.block, cfg.pooling, cfg.noise, runtime.device,
                                   runtime.autocast(), channels_last=runtime.is_cuda)
    conditioner, cond_config = None, None
    if cfg.conditioning_dir is None:
        conditioner = load_conditioner(cfg, model.conditioning_dim).to(runtime.device)
        cond_config = _conditioner_config(cfg, model.conditioning_dim)
    config = {
        "checkpoint_sha256": file_sha256(cfg.weights),
        "config_sha256": file_sha256(cfg.zoomldm_config),
        "timestep": cfg.timestep, "block": cfg.block, "pooling": cfg.pooling, "noise": cfg.noise,
        "noise_seed": "sha256(slide_id|mag|x|y)" if cfg.noise == "seeded" else None,
        "conditioner": cfg.conditioner,
        "conditioner_weights_sha256": file_sha256(cfg.conditioner_weights),
        "conditioning_dir": str(cfg.conditioning_dir) if cfg.conditioning_dir else None,
        "first_stage_resolution": model.first_stage_resolution, "precision": runtime.precision,
        "use_ema": True, "mags": list(cfg.mag_names), "dim": featurizer.dim, "code_version": __version__,
    }
    featurizer.provenance = config
    return Networks(featurizer, conditioner, "zoomldm", config, cond_config)


def load_conditioner(cfg: ExtractConfig, dim: int):
    """The conditioner encoder of ``cfg`` (``toy`` or a registered one); ConfigError unless it gives ``dim``-d
    embeddings. Also used by the generation wing to encode reference patches."""
    from zoomfeat.encoders import load_encoder

    if cfg.conditioner == "toy":
        encoder = load_encoder("toy", dim=dim, seed=cfg.toy_seed)
    else:
        encoder = load_encoder(cfg.conditioner, cfg.conditioner_weights)
    if encoder.spec.dim != dim:
        raise ConfigError(f"conditioner {cfg.conditioner} gives {encoder.spec.dim}-d embeddings but the ZoomLDM "
                          f"Summarizer takes {dim}-d: use the conditioner the checkpoint was trained with")
    return encoder
