"""The CDM as a context source of :mod:`zoomfeat.generate` (``zoomfeat sample --cdm DIR``): novel images
with no reference slide.

Importing this module registers the source ``"cdm"`` in :data:`zoomfeat.generate.conditions.CONTEXT_SOURCES`.
Its options travel in ``ConditionRequest.extra`` (:data:`OPTIONS`); ``request.n_patches`` contexts are drawn
at ``request.mag`` with :func:`zoomfeat.cdm.sample.sample_contexts`, and each becomes one "patch" whose
variations ZoomLDM samples. The manifest records the CDM file, its sha256 and the draw (steps, guidance,
seed, batch size); the drawn contexts themselves are saved in ``conditions.npz`` by the generation run, so
regeneration needs neither the CDM nor a slide.
"""

from __future__ import annotations

from pathlib import Path

from zoomfeat import hub
from zoomfeat.cdm.sample import DEFAULT_STEPS, LoadedCDM, check_cdm_fits, load_cdm, sample_contexts
from zoomfeat.errors import ConfigError
from zoomfeat.generate.conditions import Conditions, register_context_source
from zoomfeat.mags import parse_mag

SOURCE = "cdm"
# ConditionRequest.extra keys and their defaults (``cdm`` has none: the run folder or checkpoint file)
OPTIONS = {"cdm": None, "cdm_steps": DEFAULT_STEPS, "cdm_guidance": 1.0, "cdm_seed": 0}


def _options(extra: dict) -> dict:
    unknown = sorted(set(extra) - set(OPTIONS))
    if unknown or extra.get("cdm") is None:
        raise ConfigError(f"the cdm context source takes {', '.join(OPTIONS)} (cdm required), got {sorted(extra)}")
    return {**OPTIONS, **extra}


def load_checked(model, cdm_path, mag, device) -> LoadedCDM:
    """The CDM at ``cdm_path``, refused (ConfigError, one line) when it was trained on another ZoomLDM's contexts,
    never saw ``mag`` or draws contexts of another width than ``model`` takes."""
    cdm = load_cdm(Path(cdm_path), device=device)
    check_cdm_fits(cdm, getattr(model, "weights_path", None), mag)
    width = int(model.context_dim)
    if cdm.context_shape[1] != width:
        raise ConfigError(f"the CDM {cdm.weights} draws {cdm.context_shape[1]}-wide contexts but this ZoomLDM takes "
                          f"{width}: train the CDM on contexts of this checkpoint (prepare-cdm --zoomldm it)")
    return cdm


def _draw(model, mag, n: int, opts: dict, device, batch_size: int) -> Conditions:
    cdm = load_checked(model, opts["cdm"], mag, device)
    contexts = sample_contexts(cdm, mag, n, steps=int(opts["cdm_steps"]), guidance=float(opts["cdm_guidance"]),
                               seed=int(opts["cdm_seed"]), batch_size=batch_size)
    record = {"source": SOURCE, "mag": mag.name, "cdm": str(Path(opts["cdm"])), "cdm_weights": str(cdm.weights),
              "cdm_sha256": cdm.weights_sha256, "cdm_steps": int(opts["cdm_steps"]),
              "cdm_guidance": float(opts["cdm_guidance"]), "cdm_seed": int(opts["cdm_seed"]),
              "cdm_sampler": "DDIM eta 0, respaced; noise torch.Generator().manual_seed(cdm_seed) [n, D, 65]",
              "contexts_drawn": n, "cdm_batch_size": batch_size, "context_shape": list(cdm.context_shape),
              **hub.weights_sources(cdm=cdm.weights)}
    return Conditions(mag, contexts.to(device), None, None, record)


@register_context_source(SOURCE)
def cdm_source(model, request, runtime=None) -> Conditions:
    """``request.n_patches`` contexts drawn by the CDM at ``request.mag`` (no slide is read)."""
    opts = _options(dict(request.extra))
    device = runtime.device if runtime is not None else "cpu"
    return _draw(model, parse_mag(request.mag), int(request.n_patches), opts, device, int(request.batch_size))
