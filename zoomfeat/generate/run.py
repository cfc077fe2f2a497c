"""The two generation runs behind ``zoomfeat sample`` and ``zoomfeat generate-large``, and regeneration.

* :func:`run_sample`: N variations of each requested real patch at any magnification -> PNGs, a contact
  sheet, ``conditions.npz`` and ``manifest.json``.
* :func:`run_large`: the 20x image of the region one patch at M covers ((20/M) x R px a side, R the first
  stage's resolution), by ``grid`` (MultiDiffusion over the large latent, :mod:`~zoomfeat.generate.windows`)
  or ``joint`` (:mod:`~zoomfeat.generate.joint`), optionally refined, decoded by Gaussian-blended windows ->
  ``large.png`` (``large.tiff``, a pyramid, above 4096 px), ``guide.png`` (joint), conditions and manifest.
* :func:`regenerate`: the images of a manifest, from its saved grids, seeds and settings (bit-identical on
  the same machine, device and precision).

Configs are frozen dataclasses validated on construction, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from zoomfeat import hub
from zoomfeat.errors import CheckpointError, ConfigError, DataError
from zoomfeat.generate.guidance import Guidance
from zoomfeat.generate.manifest import (CONDITIONS_NAME, MANIFEST_NAME, load_conditions, read_manifest,
                                        save_conditions, write_manifest)
from zoomfeat.mags import Magnification
from zoomfeat.progress import progress
from zoomfeat.resolve import ZoomLDMSource, file_sha256

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
METHODS = ("grid", "joint")


def _check_runtime(device: str, precision: str, batch_size: int) -> None:
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise ConfigError(f"bad --device {device!r}: use one of {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"bad --precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if batch_size < 1:
        raise ConfigError(f"bad --batch-size {batch_size}: use 1 or more")


def _check_out(out: Path) -> None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder: give a new folder "
                          "(generation never overwrites earlier images)")


@dataclass(frozen=True)
class SampleConfig:
    """``zoomfeat sample``: ``n`` variations of each requested patch (seeds ``seed, seed+1, ...``)."""

    zoomldm: ZoomLDMSource
    conditions: object  # zoomfeat.generate.conditions.ConditionRequest
    out: Path
    n: int = 8
    sampler: object = None  # zoomfeat.generate.samplers.SamplerSettings (None: ddim, 50 steps, s = 2)
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"
    source: str = "grid"
    write_real: bool = False

    def __post_init__(self) -> None:
        from zoomfeat.generate.samplers import SamplerSettings

        if self.sampler is None:
            object.__setattr__(self, "sampler", SamplerSettings())
        if self.n < 1:
            raise ConfigError(f"bad --n {self.n}: use 1 or more variations per patch")
        from zoomfeat.model.config import read_config
        from zoomfeat.model.samplers import ddim_timesteps

        ddim_timesteps(read_config(self.zoomldm.config).diffusion.timesteps, self.sampler.steps)
        if self.seed < 0:
            raise ConfigError(f"bad --seed {self.seed}: use a seed >= 0")
        _check_runtime(self.device, self.precision, self.batch_size)


FAST_STEPS = 20  # the second-hand notebook copy's schedule (stride 50): ``--steps 20`` is the fast setting
DEFAULT_REFINE_T0, DEFAULT_REFINE_STRIDE = 300, 50  # refinement pass: the second-hand notebook copy's settings


@dataclass(frozen=True)
class LargeConfig:
    """``zoomfeat generate-large``: ``n`` regions (or one region and ``n`` seeds), by ``method``.

    Defaults: the supplement's 50 DDIM steps from t = 1000, Algorithm S2's J·e update (``joint_update="je"``,
    K = ``joint_iterations`` = 1, h = zeta = delta = 0.005, lr = lambda = 0.5), guidance w = 2 (standard scale 3)
    for patches and guide, then the refinement pass (t0 300, stride 50: the notebook copy's settings)."""

    zoomldm: ZoomLDMSource
    conditions: object
    out: Path
    method: str = "joint"
    steps: int = 50
    t_start: int = 1000
    guidance: Guidance = field(default_factory=lambda: Guidance(2.0, "large_image"))
    h: float = 0.005
    lr: float = 0.5
    joint_update: str = "je"
    joint_iterations: int = 1
    krylov: int = 10
    guide_guidance: Guidance | None = None
    window_stride: int | None = None
    refine_t0: int = DEFAULT_REFINE_T0
    refine_stride: int = DEFAULT_REFINE_STRIDE
    decode_stride: int | None = None
    seed: int = 0
    n: int = 1
    format: str = "auto"  # zoomfeat.generate.images.FORMATS
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"bad --method {self.method!r}: use one of {', '.join(METHODS)}")
        from zoomfeat.generate.images import large_suffix

        large_suffix(1, self.format)  # validates the format
        if Magnification(self.conditions.mag).grid_width < 2:
            raise ConfigError(f"--mag {self.conditions.mag} covers one 20x patch: a large image needs a magnification "
                              "below 20x (10x gives 2x2 patches, 5x 4x4, 1.25x 16x16)")
        from zoomfeat.model.config import read_config

        timesteps = read_config(self.zoomldm.config).diffusion.timesteps
        if not 1 <= self.t_start <= timesteps:
            raise ConfigError(f"bad --t-start {self.t_start}: use 1..{timesteps} (1-based)")
        if not 1 <= self.steps <= self.t_start:
            raise ConfigError(f"bad --steps {self.steps}: use 1..{self.t_start} (the stride is t_start // steps)")
        for name in ("window_stride", "decode_stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"bad --{name.replace('_', '-')} {value}: use 1 or more latent px")
        if not 0 <= self.refine_t0 <= timesteps or self.refine_stride < 1:
            raise ConfigError(f"bad --refine-t0 {self.refine_t0}/--refine-stride {self.refine_stride}: "
                              f"t0 in 0..{timesteps} (0 = no refinement), stride >= 1")
        if self.seed < 0:
            raise ConfigError(f"bad --seed {self.seed}: use a seed >= 0")
        if self.n < 1:
            raise ConfigError(f"bad --n {self.n}: use 1 or more images")
        self.joint_settings()  # validates h, lr, the update and its sizes
        _check_runtime(self.device, self.precision, self.batch_size)

    @property
    def stride(self) -> int:
        return self.t_start // self.steps

    def joint_settings(self):
        from zoomfeat.generate.joint import JointSettings

        return JointSettings(self.t_start, self.stride, self.guidance, self.h, self.lr, update=self.joint_update,
                             iterations=self.joint_iterations, krylov=self.krylov,
                             guide_guidance=self.guide_guidance, batch_size=self.batch_size)

    def window_settings(self, t_start: int | None = None, stride: int | None = None):
        from zoomfeat.generate.windows import WindowSettings

        return WindowSettings(t_start or self.t_start, stride or self.stride, self.guidance, self.window_stride,
                              self.batch_size)


# ----- shared pieces ---------------------------------------------------------------------------------------
def _progress(total: int, desc: str):
    return progress(total, desc, "patch-step")


RANDOM_INIT_SEED = 0  # a model without weights (``--zoomldm tiny``) is built after torch.manual_seed(0)


def _load(source: ZoomLDMSource, runtime):
    import torch

    from zoomfeat.model import load_zoomldm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return load_zoomldm(source.config, source.weights, use_ema=True, device=runtime.device).eval()


def _model_record(source: ZoomLDMSource, model) -> dict:
    return {"config": str(source.config), "config_sha256": file_sha256(source.config),
            "weights": str(source.weights) if source.weights else None,
            "checkpoint_sha256": file_sha256(source.weights), "use_ema": True,
            "random_init_seed": RANDOM_INIT_SEED if source.weights is None else None,
            "first_stage_resolution": model.first_stage_resolution,
            **hub.weights_sources(checkpoint=source.weights, config=source.config)}


def _require_finite(tensor, what: str) -> None:
    import torch

    if not bool(torch.isfinite(tensor).all()):
        raise DataError(f"{what} has non-finite values: use --precision fp32, fewer --steps or a lower --guidance")


def _autocast(runtime):
    return runtime.autocast() if runtime.precision != "fp32" else None


def _runtime_record(runtime, batch_size: int) -> dict:
    return {"device": runtime.device, "precision": runtime.precision, "batch_size": batch_size}


# ----- sample ----------------------------------------------------------------------------------------------
def sample_images(model, contexts, seeds, settings, batch_size, runtime, tick=None) -> np.ndarray:
    """uint8 [N, R, R, 3] images of contexts [N,65,D] with one seed each (sample, check, decode)."""
    from zoomfeat.generate.decode import decode_patches
    from zoomfeat.generate.samplers import sample_patches

    latents = sample_patches(model, contexts, seeds, settings, batch_size=batch_size, autocast=_autocast(runtime),
                             tick=tick)
    _require_finite(latents, "the sampled latents")
    return decode_patches(model, latents, batch_size=batch_size, autocast=_autocast(runtime))


def _sampler_record(settings) -> dict:
    return {"sampler": settings.sampler, "steps": settings.steps, "guidance": settings.guidance.value,
            "guidance_form": settings.guidance.form, "timesteps": "zero_based (CompVis: range(0, T, T//steps) + 1)",
            "noise": "torch.Generator().manual_seed(seed), CPU float32, one per image"}


def run_sample(cfg: SampleConfig) -> dict:
    """Generate, write images + contact sheet + conditions + manifest; returns the manifest.

    Manifest-first: the manifest lists every image as ``pending`` before any is sampled and marks each ``done``
    (with its sha256) when written, so a rerun with the same command and ``--out`` after any failure (a full
    disk, a killed job) resumes: finished images are kept, the rest are made (each image has its own seed, so
    they are the same images an uninterrupted run makes). ``write_real``: the real patch of each condition
    (read from its slide at the same magnification and size) goes to ``real/``, the samples to ``syn/``."""
    from zoomfeat.runtime import resolve_runtime
    from zoomfeat.generate.conditions import context_source
    from zoomfeat.generate.images import contact_sheet, save_png
    from zoomfeat.generate.samplers import network_evaluations

    _check_out_or_manifest(cfg.out)
    source = context_source(cfg.source)
    runtime = resolve_runtime(cfg.device, cfg.precision)
    model = _load(cfg.zoomldm, runtime)
    conds = source(model, cfg.conditions, runtime)
    if cfg.write_real and conds.coords_level0 is None:
        raise ConfigError("--write-real needs real conditions (a slide): drawn (CDM) contexts have no real patch")
    n_patches = len(conds.contexts)
    contexts = conds.contexts.repeat_interleave(cfg.n, dim=0)
    seeds = [cfg.seed + k for k in range(len(contexts))]
    out = Path(cfg.out)
    folder = "syn" if cfg.write_real else "images"
    entries = [{"file": f"{folder}/p{p:03d}_v{v:03d}.png", "patch": p, "variation": v, "seed": seeds[k],
                "status": "pending"} for k, (p, v) in enumerate(divmod(k, cfg.n) for k in range(len(contexts)))]
    if cfg.write_real:
        entries += [{"file": f"real/p{p:03d}.png", "patch": p, "role": "real", "status": "pending"}
                    for p in range(n_patches)]
    manifest = {"command": "sample", "model": _model_record(cfg.zoomldm, model),
                "conditions": _conditions_record(out, conds, n_patches), "sampling": _sampler_record(cfg.sampler),
                "variations_per_patch": cfg.n, "runtime": _runtime_record(runtime, cfg.batch_size),
                "images": entries}
    run = ManifestRun(out, manifest)
    if cfg.write_real:
        _write_real(run, cfg, conds, model.first_stage_resolution)
    todo = [k for k, e in enumerate(entries[:len(contexts)]) if e["status"] != "done"]
    tick, close = _progress(len(todo) * network_evaluations(cfg.sampler), "sampling")
    try:
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start:start + cfg.batch_size]
            images = sample_images(model, contexts[chunk], [seeds[k] for k in chunk], cfg.sampler, cfg.batch_size,
                                   runtime, tick)
            for k, img in zip(chunk, images):
                run.finish(k, save_png(out / entries[k]["file"], img))
    finally:
        close()
    from zoomfeat.generate.images import read_png

    syn = [read_png(out / e["file"]) for e in entries[:len(contexts)]]
    save_png(out / "contact_sheet.png", contact_sheet(syn, columns=cfg.n))
    return run.manifest


def _write_real(run: ManifestRun, cfg: SampleConfig, conds, size: int) -> None:
    """The real patch under each condition -> ``real/p###.png`` (entries after the samples)."""
    from zoomfeat.generate.images import save_png
    from zoomfeat.slides import Slide

    request = cfg.conditions
    first = next(k for k, e in enumerate(run.manifest["images"]) if e.get("role") == "real")
    with Slide(request.slide, request.base_mag, request.mpp) as slide:
        for p, (x, y) in enumerate(np.asarray(conds.coords_level0)):
            k = first + p
            if run.manifest["images"][k]["status"] != "done":
                img = slide.read_patch(int(x), int(y), Magnification(conds.mag), size)
                run.finish(k, save_png(Path(cfg.out) / run.manifest["images"][k]["file"], img))


def _check_out_or_manifest(out: Path) -> None:
    """A new or empty folder, or one holding a generation manifest (a run to resume)."""

    if not (Path(out) / MANIFEST_NAME).is_file():
        _check_out(out)


_PLAN_KEYS = ("command", "model", "sampling", "variations_per_patch", "runtime")


def _plan(manifest: dict, image_keys: list[set[str]]) -> dict:
    """What must agree for a folder to be resumed: settings, model, conditions (less the file hash), items. Of
    each item only ``image_keys`` (the planned fields of a new manifest's entries) count: what ``finish`` adds to a
    done item (its hash, the joint sampler's statistics) is a result, not the plan."""
    plan = {k: manifest.get(k) for k in _PLAN_KEYS}
    plan["conditions"] = {k: v for k, v in manifest["conditions"].items() if k != "sha256"}
    images = manifest["images"]
    plan["images"] = ([{k: e.get(k) for k in sorted(keys)} for e, keys in zip(images, image_keys)]
                      if len(images) == len(image_keys) else None)
    return json_roundtrip(plan)


def json_roundtrip(value):
    import json

    return json.loads(json.dumps(value))


class ManifestRun:
    """A multi-file output written manifest-first (see :func:`run_sample`): ``finish(k, path)`` marks item k
    done with its sha256 and rewrites the manifest atomically."""

    def __init__(self, out: Path, manifest: dict):

        self.out = Path(out)
        self.manifest = manifest
        path = self.out / MANIFEST_NAME
        if path.is_file():
            old = read_manifest(path)
            planned = [set(e) - {"status", "sha256"} for e in manifest["images"]]
            if _plan(old, planned) != _plan(manifest, planned):
                raise ConfigError(f"--out {out} holds the manifest of a different run (other settings, model, "
                                  "conditions or images): give a new folder, or rerun the original command")
            for entry, before, keys in zip(manifest["images"], old["images"], planned):
                f = self.out / before["file"]
                if before.get("status") == "done" and f.is_file() and file_sha256(f) == before.get("sha256"):
                    # the item's results (status, hash, the joint sampler's statistics) are kept as finished
                    entry.update({k: v for k, v in before.items() if k not in keys})
            self.resumed = sum(e["status"] == "done" for e in manifest["images"])
        else:
            self.resumed = 0
        self._write()

    def _write(self) -> None:

        write_manifest(self.out, self.manifest)

    def finish(self, k: int, path: Path, **extra) -> None:
        self.manifest["images"][k].update(status="done", sha256=file_sha256(path), **extra)
        self._write()

    def note(self, **fields) -> None:
        """Add run-level fields (e.g. per-image statistics) and rewrite the manifest."""
        self.manifest.update(fields)
        self._write()


def _conditions_record(out: Path, conds, n_patches: int) -> dict:
    """Save ``conditions.npz`` (kept as is when the folder already holds the same conditions) and its record."""

    record = dict(conds.record)
    record["patches"] = n_patches
    path = Path(out) / CONDITIONS_NAME
    arrays = ({"grids": np.asarray(conds.grids, np.float32)} if conds.grids is not None
              else {"contexts": conds.contexts.detach().float().cpu().numpy()})
    same = False
    if path.is_file():
        saved = load_conditions(path)
        same = all(k in saved and np.array_equal(saved[k], v) for k, v in arrays.items())
    if not same:
        Path(out).mkdir(parents=True, exist_ok=True)
        if conds.grids is not None:
            path = save_conditions(out, conds.mag, conds.grids, conds.coords_level0)
        else:  # drawn contexts (no grid to read them from): saved themselves
            path = save_conditions(out, conds.mag, contexts=arrays["contexts"])
    record.update(file=CONDITIONS_NAME, sha256=file_sha256(path))
    return record


# ----- large images ----------------------------------------------------------------------------------------
def large_latent(model, cfg: LargeConfig, grid: np.ndarray, guide_context, runtime, tick=None, on_step=None):
    """(large latent [1,C,gH,gW], guide latent or None, joint statistics or None) of one region, seed
    ``cfg.seed``; the statistics are the per-step disagreement and the guided denoiser evaluations."""
    from zoomfeat.generate.conditions import tile_contexts_20x
    from zoomfeat.generate.joint import SampledGuide, joint_sample, stitch
    from zoomfeat.generate.windows import SeededNoise, grid_sample, refine

    noise = SeededNoise(cfg.seed, runtime.device)
    g = grid.shape[-1]
    guide, stats = None, None
    if cfg.method == "grid":
        latent = grid_sample(model, grid, cfg.window_settings(), noise, tick=tick, autocast=_autocast(runtime))
    else:
        result = joint_sample(model, tile_contexts_20x(model, grid), SampledGuide(guide_context),
                              cfg.joint_settings(), noise, grid_hw=(g, g), tick=tick, on_step=on_step)
        latent, guide = stitch(result.latents, (g, g)).to(runtime.device), result.guide_latent
        stats = {"disagreement_per_step": result.disagreement, "joint_evaluations": result.evaluations}
    if cfg.refine_t0:
        latent = refine(model, latent, grid, cfg.window_settings(cfg.refine_t0, cfg.refine_stride), noise,
                        tick=tick, autocast=_autocast(runtime))
    _require_finite(latent, "the generated latent")
    return latent, guide, stats


def _large_total(model, cfg: LargeConfig, g: int) -> int:
    """Progress units (patch or window evaluations) of one large image."""
    from zoomfeat.generate.windows import large_image_timesteps, window_grid

    side = int(model.config.diffusion.image_size)
    windows = len(window_grid(g * side, g * side, side, cfg.window_stride or side // 4))
    refine = len(large_image_timesteps(cfg.refine_t0, cfg.refine_stride, 10 ** 9)) * windows if cfg.refine_t0 else 0
    if cfg.method == "grid":
        return cfg.steps * windows + refine
    return cfg.steps * cfg.joint_settings().evaluations_per_step(g * g) + refine


def _large_record(cfg: LargeConfig) -> dict:
    rec = {"method": cfg.method, "steps": cfg.steps, "t_start": cfg.t_start, "stride": cfg.stride,
           "timesteps": "one_based (range(t_start, 0, -stride))", "guidance": cfg.guidance.value,
           "guidance_form": cfg.guidance.form, "guidance_standard_scale": cfg.guidance.standard_scale,
           "seed": cfg.seed, "n": cfg.n,
           "noise": "one torch.Generator().manual_seed(seed), CPU float32, draws in sampler order",
           "refine_t0": cfg.refine_t0, "refine_stride": cfg.refine_stride, "window_stride": cfg.window_stride,
           "decode_stride": cfg.decode_stride}
    if cfg.method == "joint":
        gg = cfg.joint_settings().guide_scale
        rec.update(joint_update=cfg.joint_update, h=cfg.h, lr=cfg.lr, guide_guidance=gg.value,
                   guide_guidance_form=gg.form)
        rec.update(joint_iterations=cfg.joint_iterations) if cfg.joint_update == "je" else rec.update(krylov=cfg.krylov)
    return rec


def _large_config_of(source, mag, folder, srec: dict, rrec: dict, runtime) -> LargeConfig:
    """The LargeConfig a manifest's sampling record describes."""
    from zoomfeat.generate.conditions import ConditionRequest

    guide = srec.get("guide_guidance")
    return LargeConfig(source, ConditionRequest(mag=Magnification(mag)), folder, srec["method"], srec["steps"],
                       srec["t_start"], Guidance(srec["guidance"], srec["guidance_form"]), srec.get("h", 0.005),
                       srec.get("lr", 0.5), joint_update=srec.get("joint_update", "gmres"),
                       joint_iterations=srec.get("joint_iterations", 1),
                       krylov=srec.get("krylov", srec.get("inner_iterations", 10)),
                       guide_guidance=None if guide is None else Guidance(guide, srec["guide_guidance_form"]),
                       window_stride=srec["window_stride"], refine_t0=srec["refine_t0"],
                       refine_stride=srec["refine_stride"], decode_stride=srec.get("decode_stride"),
                       seed=srec["seed"], n=srec.get("n", 1), batch_size=rrec["batch_size"], device=runtime.device,
                       precision=runtime.precision)


def large_images(model, cfg: LargeConfig, grid, guide_context, runtime, tick=None):
    """(uint8 large image [gR, gR, 3], uint8 guide image or None, joint statistics or None)."""
    from zoomfeat.generate.decode import decode_large_uint8, decode_patches

    latent, guide, stats = large_latent(model, cfg, grid, guide_context, runtime, tick)
    image = decode_large_uint8(model, latent, stride=cfg.decode_stride, batch_size=cfg.batch_size,
                               autocast=_autocast(runtime))[0]
    guide_img = decode_patches(model, guide, batch_size=1)[0] if guide is not None else None
    return image, guide_img, stats


def _large_items(cfg: LargeConfig, conds) -> list[tuple[int, int]]:
    """(region index, seed) of each of the ``cfg.n`` images: K regions when the conditions give K, else one
    region and seeds ``seed, seed+1, ...``."""
    regions = len(conds.contexts)
    if regions >= cfg.n:
        return [(k, cfg.seed) for k in range(cfg.n)]
    if regions == 1:
        return [(0, cfg.seed + k) for k in range(cfg.n)]
    raise ConfigError(f"--n {cfg.n}: the slide gave only {regions} regions at {conds.mag}; ask for fewer, or give "
                      "--x/--y for one region and --n seeds")


def run_large(cfg: LargeConfig) -> dict:
    """Generate ``cfg.n`` large images from one model load, written manifest-first (resumable, as
    :func:`run_sample`): ``large.png`` / ``guide.png`` for one image, ``large_###`` / ``guide_###`` for several."""
    from zoomfeat.runtime import resolve_runtime
    from zoomfeat.generate.conditions import grid_source
    from zoomfeat.generate.images import large_suffix, save_large, save_png

    _check_out_or_manifest(cfg.out)
    runtime = resolve_runtime(cfg.device, cfg.precision)
    model = _load(cfg.zoomldm, runtime)
    regions = cfg.n if cfg.conditions.coords is None else 1
    conds = grid_source(model, replace(cfg.conditions, n_patches=regions), runtime)
    items = _large_items(cfg, conds)
    conds = replace(conds, contexts=conds.contexts[:max(r for r, _ in items) + 1],
                    grids=conds.grids[:max(r for r, _ in items) + 1],
                    coords_level0=None if conds.coords_level0 is None else
                    conds.coords_level0[:max(r for r, _ in items) + 1])
    g = conds.grids.shape[-1]
    side = g * model.first_stage_resolution
    suffix = large_suffix(side, cfg.format)
    out = Path(cfg.out)
    name = (lambda stem, k: stem) if cfg.n == 1 else (lambda stem, k: f"{stem}_{k:03d}")
    entries = []
    for k, (r, seed) in enumerate(items):
        entries.append({"file": name("large", k) + suffix, "item": k, "region": r, "seed": seed,
                        "size_px": [side, side], "status": "pending"})
        if cfg.method == "joint":
            entries.append({"file": name("guide", k) + ".png", "item": k, "role": "guide", "status": "pending"})
    manifest = {"command": "generate-large", "model": _model_record(cfg.zoomldm, model),
                "conditions": _conditions_record(out, conds, len(conds.contexts)), "sampling": _large_record(cfg),
                "runtime": _runtime_record(runtime, cfg.batch_size), "images": entries}
    run = ManifestRun(out, manifest)
    todo = [k for k in range(len(items)) if any(e["item"] == k and e["status"] != "done" for e in entries)]
    tick, close = _progress(len(todo) * _large_total(model, cfg, g), f"{cfg.method} sampling")
    try:
        for k in todo:
            r, seed = items[k]
            image, guide_img, stats = large_images(model, replace(cfg, seed=seed), conds.grids[r],
                                                   conds.contexts[r:r + 1], runtime, tick)
            idx = [i for i, e in enumerate(entries) if e["item"] == k]
            text = {"seed": str(seed), "model_sha256": manifest["model"]["checkpoint_sha256"] or "random-init",
                    "config_sha256": manifest["model"]["config_sha256"], "generator": "zoomfeat generate-large"}
            written = save_large(out / Path(entries[idx[0]]["file"]).stem, image, fmt=cfg.format, text=text)
            run.finish(idx[0], written, **(stats or {}))
            if guide_img is not None:
                run.finish(idx[1], save_png(out / entries[idx[1]]["file"], guide_img))
    finally:
        close()
    return run.manifest


# ----- regeneration ----------------------------------------------------------------------------------------
def _check_sha(path, expected: str | None, what: str) -> None:
    if expected is not None and file_sha256(path) != expected:
        raise CheckpointError(f"{path}: sha256 differs from the manifest's {what}: regenerate with the original file")


def regenerate(manifest_path, device: str | None = None) -> list[np.ndarray]:
    """The images of a manifest (same order as ``manifest["images"]``), regenerated from its records."""
    import torch

    from zoomfeat.runtime import resolve_runtime
    from zoomfeat.generate.conditions import conditions_from_saved
    from zoomfeat.generate.samplers import SamplerSettings

    man = read_manifest(manifest_path)
    folder = Path(man["_folder"])
    mrec, crec, srec, rrec = man["model"], man["conditions"], man["sampling"], man["runtime"]
    source = ZoomLDMSource(Path(mrec["config"]), Path(mrec["weights"]) if mrec["weights"] else None)
    _check_sha(source.config, mrec["config_sha256"], "config_sha256")
    if source.weights is not None:
        _check_sha(source.weights, mrec["checkpoint_sha256"], "checkpoint_sha256")
    cpath = folder / crec["file"]
    _check_sha(cpath, crec["sha256"], "conditions sha256")
    saved = load_conditions(cpath)
    grids, mag = saved.get("grids"), saved["mag"]
    runtime = resolve_runtime(device or rrec["device"], rrec["precision"])
    model = _load(source, runtime)
    guidance = Guidance(srec["guidance"], srec["guidance_form"])
    if man["command"] == "sample":
        if grids is not None:
            contexts = conditions_from_saved(model, grids, mag, saved["coords_level0"]).contexts
        else:
            contexts = torch.from_numpy(saved["contexts"]).to(runtime.device)
        contexts = contexts.repeat_interleave(man["variations_per_patch"], dim=0)
        seeds = [e["seed"] for e in man["images"] if e.get("role") != "real"]
        settings = SamplerSettings(srec["sampler"], srec["steps"], guidance)
        return list(sample_images(model, contexts, seeds, settings, rrec["batch_size"], runtime))
    cfg = _large_config_of(source, mag, folder, srec, rrec, runtime)
    contexts = conditions_from_saved(model, grids, mag).contexts
    images = []
    for e in man["images"]:
        if e.get("role") == "guide":
            continue
        image, guide_img, _ = large_images(model, replace(cfg, seed=e["seed"]), grids[e.get("region", 0)],
                                           contexts[e.get("region", 0):e.get("region", 0) + 1], runtime)
        images += [image] + ([guide_img] if guide_img is not None else [])
    return images
