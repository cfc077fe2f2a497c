"""Drawing Summarizer contexts from a trained CDM: ``load_cdm`` and ``sample_contexts``.

``sample_contexts(cdm, mag, n)`` runs DDIM (eta 0) on the 1000-step diffusion respaced to ``steps`` (200, as
the official evaluation), from seeded noise ``[n, D, 65]``, and returns contexts ``[n, 65, D]`` ready to
condition ZoomLDM. ``guidance`` is classifier-free guidance of the CDM on the magnification (and the external
condition), ``x0 = x0_u + guidance * (x0_c - x0_u)`` (equivalently on eps, which is affine in x0 given x_t); it
needs a CDM trained with label dropout (``model.class_dropout_prob > 0``). The official CDM has none and samples
with guidance 1 (no guidance); its evaluation's 1.75 is the guidance of the *ZoomLDM* image sampler.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from zoomfeat.cdm.dit import DiT, DiTConfig
from zoomfeat.errors import CheckpointError, ConfigError
from zoomfeat.mags import Magnification, parse_mag
from zoomfeat.resolve import file_sha256

DEFAULT_STEPS = 200


@dataclass
class LoadedCDM:
    """A CDM ready to sample: the network (EMA weights by default) and where it came from."""

    dit: DiT
    weights: Path
    weights_sha256: str
    cond_labels: list[str]
    zoomldm_sha256: str | None = None  # the ZoomLDM whose contexts it was trained on (a run folder records it)
    mags_seen: list[str] | None = None  # the magnifications of those contexts (recorded by train-cdm)

    @property
    def cfg(self) -> DiTConfig:
        return self.dit.cfg

    @property
    def context_shape(self) -> tuple[int, int]:
        return (self.cfg.num_tokens, self.cfg.in_channels)


def _run_folder_config(folder: Path) -> tuple[DiTConfig, Path, list[str]]:
    from zoomfeat.cdm.run import CONFIG_NAME, RECORD_SECTION

    record_path = folder / CONFIG_NAME
    weights = folder / "official" / "last.ckpt"
    if not record_path.is_file() or not weights.is_file():
        raise ConfigError(f"--cdm {folder} is not a finished train-cdm run (needs {CONFIG_NAME} and "
                          "official/last.ckpt): pass the run folder or an official CDM checkpoint file")
    record = json.loads(record_path.read_text())
    return DiTConfig(**record[RECORD_SECTION]["dit"]), weights, list(record.get("cond_labels", []))


def _run_folder_provenance(folder: Path) -> tuple[str | None, list[str] | None]:
    """(sha256 of the ZoomLDM weights the training contexts came from, magnifications seen) of a run folder."""
    from zoomfeat.cdm.run import CONFIG_NAME, RECORD_SECTION

    record = json.loads((folder / CONFIG_NAME).read_text())
    try:
        settings = json.loads(record[RECORD_SECTION].get("data_settings") or "{}")
    except (TypeError, ValueError):
        settings = {}
    seen = record.get("mags_seen")
    return settings.get("zoomldm_weights_sha256"), (list(seen) if isinstance(seen, list) else None)


def check_cdm_fits(cdm: LoadedCDM, zoomldm_weights: str | Path | None, mag: Magnification) -> None:
    """ConfigError when the CDM was trained on the contexts of another ZoomLDM (by weights sha256) or never saw
    ``mag``; what a CDM checkpoint file does not record is not checked."""
    if cdm.zoomldm_sha256 and zoomldm_weights is not None and Path(zoomldm_weights).is_file():
        if file_sha256(zoomldm_weights) != cdm.zoomldm_sha256:
            raise ConfigError(f"the CDM {cdm.weights} was trained on the contexts of another ZoomLDM (weights sha256 "
                              f"{cdm.zoomldm_sha256[:12]}..., not {Path(zoomldm_weights).name}'s): sample with that "
                              "ZoomLDM or train a CDM on this one's contexts (prepare-cdm --zoomldm it)")
    if cdm.mags_seen is not None and mag.name not in cdm.mags_seen:
        raise ConfigError(f"the CDM {cdm.weights} never saw {mag.name} contexts (trained on "
                          f"{', '.join(cdm.mags_seen)}): pass one of those with --mag")


def load_cdm(source: str | Path, device: str | torch.device = "cpu", use_ema: bool = True,
             num_heads: int | None = None) -> LoadedCDM:
    """A train-cdm run folder, or a checkpoint file: the official ``{"model","ema","opt","args"}`` (train-cdm's
    ``official/*.ckpt`` record the architecture in ``args``; for official files it is inferred from the shapes,
    ``num_heads`` for non-official sizes) or a flat DiT state_dict."""
    from zoomfeat.cdm.dit import infer_config, read_dit_checkpoint
    from zoomfeat.model.checkpoint import load_strict
    source = Path(source)
    if source.is_dir():
        cfg, weights, labels = _run_folder_config(source)
    elif source.is_file():
        weights, labels, cfg = source, [], None
    else:
        raise ConfigError(f"--cdm {source} not found: pass a train-cdm run folder or a CDM checkpoint file")
    state, recorded = read_dit_checkpoint(weights, "ema" if use_ema else "model")
    cfg = cfg or recorded or infer_config(state, num_heads)
    dit = DiT(cfg)
    load_strict(dit, state, str(weights))
    zoomldm_sha256, seen = _run_folder_provenance(source) if source.is_dir() else (None, None)
    return LoadedCDM(dit.to(device).eval(), weights, file_sha256(weights), labels, zoomldm_sha256, seen)


def _check_request(cdm: LoadedCDM, mag: Magnification, n: int, steps: int, guidance: float, cond) -> None:
    if n < 1:
        raise ConfigError(f"--n {n} must be at least 1")
    if not 2 <= steps <= 1000:  # one kept step has no posterior variance to learn a range over
        raise ConfigError(f"CDM steps {steps} must be in 2..1000")
    if guidance != 1.0 and not cdm.cfg.has_null_class:
        raise ConfigError(f"CDM guidance {guidance:g} needs a CDM trained with label dropout "
                          "(model.class_dropout_prob > 0); this one was not: use guidance 1")
    if mag.index >= cdm.cfg.num_classes:
        raise ConfigError(f"this CDM knows {cdm.cfg.num_classes} magnifications; {mag} is index {mag.index}")
    if cdm.cfg.cond_dim and cond is None:
        raise ConfigError(f"this CDM is conditioned on an external vector of width {cdm.cfg.cond_dim}"
                          f"{' (labels ' + ', '.join(cdm.cond_labels) + ')' if cdm.cond_labels else ''}: pass cond")


def _model_fn(dit: DiT, y: torch.Tensor, cond: torch.Tensor | None, guidance: float):
    if guidance == 1.0:
        return lambda x, t: dit(x, t, y, cond)

    def guided(x, t):
        b = len(x)
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
        both = dit(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]),
                   None if cond is None else torch.cat([cond, cond]), drop)
        c_out, u_out = both[:b], both[b:]
        c = x.shape[1]
        x0 = u_out[:, :c] + guidance * (c_out[:, :c] - u_out[:, :c])
        return torch.cat([x0, c_out[:, c:]], dim=1)  # the variance of the conditional half (unused by DDIM)
    return guided


def _cond_rows(cond, n: int, width: int, device) -> torch.Tensor | None:
    if cond is None:
        return None
    cond = torch.as_tensor(cond, dtype=torch.float32)
    cond = cond.expand(n, -1) if cond.dim() == 1 else cond
    if cond.shape != (n, width):
        raise ConfigError(f"external condition must be [{width}] or [{n}, {width}], got {list(cond.shape)}")
    return cond.to(device)


@torch.no_grad()
def sample_contexts(cdm: LoadedCDM, mag: Magnification | str | float, n: int, steps: int = DEFAULT_STEPS,
                    guidance: float = 1.0, seed: int = 0, cond=None, batch_size: int = 64) -> torch.Tensor:
    """``n`` contexts float32 [n, 65, D] (CPU) drawn at ``mag``; reproducible from ``seed`` for any batch size.

    ``cond``: the external conditioning vector ([E] for all, or [n, E]) of a CDM trained with one.
    """
    from zoomfeat.cdm.diffusion import create_diffusion

    mag = parse_mag(mag)
    _check_request(cdm, mag, n, steps, guidance, cond)
    device = next(cdm.dit.parameters()).device
    c, tokens = cdm.cfg.in_channels, cdm.cfg.num_tokens
    noise = torch.randn((n, c, tokens), generator=torch.Generator().manual_seed(int(seed)))
    cond = _cond_rows(cond, n, cdm.cfg.cond_dim, device) if cdm.cfg.cond_dim else None
    diffusion = create_diffusion(str(steps), learn_sigma=cdm.cfg.learn_sigma)
    out = []
    for i in range(0, n, batch_size):
        x = noise[i:i + batch_size].to(device)
        y = torch.full((len(x),), mag.index, dtype=torch.long, device=device)
        fn = _model_fn(cdm.dit, y, None if cond is None else cond[i:i + batch_size], float(guidance))
        out.append(diffusion.ddim_sample(fn, x).float().cpu())
    contexts = torch.cat(out).transpose(1, 2).contiguous()
    if not torch.isfinite(contexts).all():
        raise CheckpointError(f"the CDM {cdm.weights} produced non-finite contexts: check the checkpoint")
    return contexts
