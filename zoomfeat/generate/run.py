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

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from zoomfeat.errors import CheckpointError, ConfigError, DataError
from zoomfeat.generate.guidance import Guidance
from zoomfeat.mags import Magnification
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


@dataclass(frozen=True)
class LargeConfig:
    """``zoomfeat generate-large``: one region (the patch at ``conditions.mag``), by ``method``."""

    zoomldm: ZoomLDMSource
    conditions: object
    out: Path
    method: str = "joint"
    steps: int = 20
    t_start: int = 1000
    guidance: Guidance = field(default_factory=lambda: Guidance(2.0, "large_image"))
    h: float = 0.005
    lr: float = 0.5
    inner_iterations: int = 10
    window_stride: int | None = None
    refine_t0: int = 0
    refine_stride: int = 100
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"bad --method {self.method!r}: use one of {', '.join(METHODS)}")
        if Magnification(self.conditions.mag).grid_width < 2:
            raise ConfigError(f"--mag {self.conditions.mag} covers one 20x patch: a large image needs a magnification "
                              "below 20x (10x gives 2x2 patches, 5x 4x4, 1.25x 16x16)")
        from zoomfeat.model.config import read_config

        timesteps = read_config(self.zoomldm.config).diffusion.timesteps
        if not 1 <= self.t_start <= timesteps:
            raise ConfigError(f"bad --t-start {self.t_start}: use 1..{timesteps} (1-based)")
        if not 1 <= self.steps <= self.t_start:
            raise ConfigError(f"bad --steps {self.steps}: use 1..{self.t_start} (the stride is t_start // steps)")
        if self.window_stride is not None and self.window_stride < 1:
            raise ConfigError(f"bad --window-stride {self.window_stride}: use 1 or more latent px")
        if self.refine_t0 < 0 or self.refine_stride < 1:
            raise ConfigError("bad --refine-t0/--refine-stride: t0 >= 0 (0 = no refinement), stride >= 1")
        if self.seed < 0:
            raise ConfigError(f"bad --seed {self.seed}: use a seed >= 0")
        self.joint_settings()  # validates h, lr, inner iterations
        _check_runtime(self.device, self.precision, self.batch_size)

    @property
    def stride(self) -> int:
        return self.t_start // self.steps

    def joint_settings(self):
        from zoomfeat.generate.joint import JointSettings

        return JointSettings(self.t_start, self.stride, self.guidance, self.h, self.lr, self.inner_iterations,
                             self.batch_size)

    def window_settings(self, t_start: int | None = None, stride: int | None = None):
        from zoomfeat.generate.windows import WindowSettings

        return WindowSettings(t_start or self.t_start, stride or self.stride, self.guidance, self.window_stride,
                              self.batch_size)


# ----- shared pieces ---------------------------------------------------------------------------------------
def _progress(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="patch-step", file=sys.stderr, disable=None, leave=False)
    return bar.update, bar.close


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
            "first_stage_resolution": model.first_stage_resolution}


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
    """Generate, write images + contact sheet + conditions + manifest; returns the manifest."""
    from zoomfeat.runtime import resolve_runtime
    from zoomfeat.generate.conditions import context_source
    from zoomfeat.generate.images import contact_sheet, save_png
    from zoomfeat.generate.manifest import write_manifest
    from zoomfeat.generate.samplers import network_evaluations

    _check_out(cfg.out)
    source = context_source(cfg.source)
    runtime = resolve_runtime(cfg.device, cfg.precision)
    model = _load(cfg.zoomldm, runtime)
    conds = source(model, cfg.conditions, runtime)
    n_patches = len(conds.contexts)
    contexts = conds.contexts.repeat_interleave(cfg.n, dim=0)
    seeds = [cfg.seed + k for k in range(len(contexts))]
    tick, close = _progress(len(contexts) * network_evaluations(cfg.sampler), "sampling")
    try:
        images = sample_images(model, contexts, seeds, cfg.sampler, cfg.batch_size, runtime, tick)
    finally:
        close()
    out = Path(cfg.out)
    entries = []
    for k, img in enumerate(images):
        p, v = divmod(k, cfg.n)
        path = save_png(out / "images" / f"p{p:03d}_v{v:03d}.png", img)
        entries.append({"file": str(path.relative_to(out)), "patch": p, "variation": v, "seed": seeds[k],
                        "sha256": file_sha256(path)})
    save_png(out / "contact_sheet.png", contact_sheet(list(images), columns=cfg.n))
    manifest = {"command": "sample", "model": _model_record(cfg.zoomldm, model),
                "conditions": _conditions_record(out, conds, n_patches), "sampling": _sampler_record(cfg.sampler),
                "variations_per_patch": cfg.n, "runtime": _runtime_record(runtime, cfg.batch_size),
                "images": entries}
    write_manifest(out, manifest)
    return manifest


def _conditions_record(out: Path, conds, n_patches: int) -> dict:
    from zoomfeat.generate.manifest import CONDITIONS_NAME, save_conditions

    record = dict(conds.record)
    record["patches"] = n_patches
    if conds.grids is not None:
        path = save_conditions(out, conds.mag, conds.grids, conds.coords_level0)
    else:  # drawn contexts (no grid to read them from): saved themselves
        path = save_conditions(out, conds.mag, contexts=conds.contexts.detach().float().cpu().numpy())
    record.update(file=CONDITIONS_NAME, sha256=file_sha256(path))
    return record


# ----- large images ----------------------------------------------------------------------------------------
def large_latent(model, cfg: LargeConfig, grid: np.ndarray, guide_context, runtime, tick=None, on_step=None):
    """(large latent [1,C,gH,gW], guide latent or None, per-step disagreement or None) of one region."""
    from zoomfeat.generate.conditions import tile_contexts_20x
    from zoomfeat.generate.joint import SampledGuide, joint_sample, stitch
    from zoomfeat.generate.windows import SeededNoise, grid_sample, refine

    noise = SeededNoise(cfg.seed, runtime.device)
    g = grid.shape[-1]
    guide, history = None, None
    if cfg.method == "grid":
        latent = grid_sample(model, grid, cfg.window_settings(), noise, tick=tick, autocast=_autocast(runtime))
    else:
        result = joint_sample(model, tile_contexts_20x(model, grid), SampledGuide(guide_context),
                              cfg.joint_settings(), noise, grid_hw=(g, g), tick=tick, on_step=on_step)
        latent, guide, history = stitch(result.latents, (g, g)).to(runtime.device), result.guide_latent, \
            result.disagreement
    if cfg.refine_t0:
        latent = refine(model, latent, grid, cfg.window_settings(cfg.refine_t0, cfg.refine_stride), noise,
                        tick=tick, autocast=_autocast(runtime))
    _require_finite(latent, "the generated latent")
    return latent, guide, history


def _large_total(model, cfg: LargeConfig, g: int) -> int:
    from zoomfeat.generate.windows import window_grid

    side = int(model.config.diffusion.image_size)
    if cfg.method == "grid":
        windows = len(window_grid(g * side, g * side, side, cfg.window_stride or side // 4))
        return cfg.steps * windows
    return cfg.steps * (1 + g * g * (1 + cfg.inner_iterations))


def _large_record(cfg: LargeConfig) -> dict:
    rec = {"method": cfg.method, "steps": cfg.steps, "t_start": cfg.t_start, "stride": cfg.stride,
           "timesteps": "one_based (range(t_start, 0, -stride))", "guidance": cfg.guidance.value,
           "guidance_form": cfg.guidance.form, "seed": cfg.seed,
           "noise": "one torch.Generator().manual_seed(seed), CPU float32, draws in sampler order",
           "refine_t0": cfg.refine_t0, "refine_stride": cfg.refine_stride, "window_stride": cfg.window_stride}
    if cfg.method == "joint":
        rec.update(h=cfg.h, lr=cfg.lr, inner_iterations=cfg.inner_iterations)
    return rec


def large_images(model, cfg: LargeConfig, grid, guide_context, runtime, tick=None):
    """(uint8 large image [gR, gR, 3], uint8 guide image or None, disagreement history or None)."""
    from zoomfeat.generate.decode import decode_large_uint8, decode_patches

    latent, guide, history = large_latent(model, cfg, grid, guide_context, runtime, tick)
    image = decode_large_uint8(model, latent, batch_size=cfg.batch_size, autocast=_autocast(runtime))[0]
    guide_img = decode_patches(model, guide, batch_size=1)[0] if guide is not None else None
    return image, guide_img, history


def run_large(cfg: LargeConfig) -> dict:
    """Generate one large image, write it (PNG or pyramidal TIFF), the guide, conditions and manifest."""
    from zoomfeat.runtime import resolve_runtime
    from zoomfeat.generate.conditions import grid_source
    from zoomfeat.generate.images import save_large, save_png
    from zoomfeat.generate.manifest import write_manifest

    _check_out(cfg.out)
    runtime = resolve_runtime(cfg.device, cfg.precision)
    model = _load(cfg.zoomldm, runtime)
    conds = grid_source(model, replace(cfg.conditions, n_patches=1), runtime)
    grid = conds.grids[0]
    tick, close = _progress(_large_total(model, cfg, grid.shape[-1]), f"{cfg.method} sampling")
    try:
        image, guide_img, history = large_images(model, cfg, grid, conds.contexts[:1], runtime, tick)
    finally:
        close()
    out = Path(cfg.out)
    path = save_large(out / "large", image)
    entries = [{"file": path.name, "seed": cfg.seed, "sha256": file_sha256(path), "size_px": list(image.shape[:2])}]
    if guide_img is not None:
        gpath = save_png(out / "guide.png", guide_img)
        entries.append({"file": gpath.name, "role": "guide", "sha256": file_sha256(gpath)})
    manifest = {"command": "generate-large", "model": _model_record(cfg.zoomldm, model),
                "conditions": _conditions_record(out, conds, 1), "sampling": _large_record(cfg),
                "runtime": _runtime_record(runtime, cfg.batch_size), "images": entries,
                "disagreement_per_step": history}
    write_manifest(out, manifest)
    return manifest


# ----- regeneration ----------------------------------------------------------------------------------------
def _check_sha(path, expected: str | None, what: str) -> None:
    if expected is not None and file_sha256(path) != expected:
        raise CheckpointError(f"{path}: sha256 differs from the manifest's {what}: regenerate with the original file")


def regenerate(manifest_path, device: str | None = None) -> list[np.ndarray]:
    """The images of a manifest (same order as ``manifest["images"]``), regenerated from its records."""
    import torch

    from zoomfeat.runtime import resolve_runtime
    from zoomfeat.generate.conditions import conditions_from_saved
    from zoomfeat.generate.manifest import load_conditions, read_manifest
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
        seeds = [e["seed"] for e in man["images"]]
        settings = SamplerSettings(srec["sampler"], srec["steps"], guidance)
        return list(sample_images(model, contexts, seeds, settings, rrec["batch_size"], runtime))
    from zoomfeat.generate.conditions import ConditionRequest

    cfg = LargeConfig(source, ConditionRequest(mag=Magnification(mag)), folder, srec["method"], srec["steps"],
                      srec["t_start"], guidance, srec.get("h", 0.005), srec.get("lr", 0.5),
                      srec.get("inner_iterations", 10), srec["window_stride"], srec["refine_t0"],
                      srec["refine_stride"], srec["seed"], rrec["batch_size"], runtime.device, runtime.precision)
    context = conditions_from_saved(model, grids, mag).contexts[:1]
    image, guide_img, _ = large_images(model, cfg, grids[0], context, runtime)
    return [image] + ([guide_img] if guide_img is not None else [])
