"""Typed, frozen configs of ``zoomfeat prepare-train`` and ``zoomfeat train``.

``TrainConfig`` is one YAML file with a section per stage (``data``, ``model``, ``optim``, ``trainer``,
``validation``; see ``zoomfeat/train/example_train.yaml``), overridden by CLI flags given as dotted keys
(``{"optim.lr": 1e-4}``), validated before any work starts and saved with the run (``OUT/train_config.json``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoomfeat.encoders.specs import parse_conditioner
from zoomfeat.errors import ConfigError, one_line
from zoomfeat.mags import Magnification, parse_mags
from zoomfeat.slides import check_scale_overrides
from zoomfeat.tissue import TissueParams

MAG_SAMPLING = ("uniform", "proportional")
# zoomfeat's runtime vocabulary (auto/fp32/bf16/fp16, as extract) and Lightning's own precision strings
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


def resolve_zoomldm_config(path: str | Path) -> Path:
    """An official ``config.yaml``, given as the file, the folder that holds it, or ``tiny`` (the packaged one)."""
    if str(path) == "tiny":
        from zoomfeat.train import TINY_ZOOMLDM_YAML

        return TINY_ZOOMLDM_YAML
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"ZoomLDM config {path} not found: pass an official config.yaml or the folder holding it")
    return path


@dataclass(frozen=True)
class PrepareConfig:
    """Settings of ``zoomfeat prepare-train`` (one training set, written under ``out``)."""

    slides: tuple[Path, ...]
    out: Path
    conditioner: str                      # "toy" or "uni"
    conditioner_weights: Path | None      # local weight file for "uni"
    zoomldm: Path                         # official config.yaml (its first stage encodes the latents)
    zoomldm_weights: Path | None = None   # first-stage weights; None = the config's random init (tests, demo)
    mags: tuple[Magnification, ...] = parse_mags("all")
    max_patches_per_mag: int | None = None
    conditioner_dim: int | None = None    # toy conditioner width; defaults to the model's conditioning dim
    batch_size: int = 32
    workers: int = 0
    device: str = "cpu"
    seed: int = 0
    grid_pool_to: int = 8                 # grids wider than this are stored average-pooled to it
    base_mag: float | None = None         # overrides of the slides' metadata (slides without, or with bogus, mpp)
    mpp: float | None = None
    tissue: TissueParams = TissueParams()  # the tissue flags of `tile` / `extract` (one tile-grid function)

    def __post_init__(self) -> None:
        if not self.slides:
            raise ConfigError("no slide given: pass slide files or folders to prepare-train")
        object.__setattr__(self, "mags", parse_mags(self.mags))
        check_scale_overrides(self.base_mag, self.mpp)
        parse_conditioner(self.conditioner if self.conditioner_weights is None
                          else f"{self.conditioner}={self.conditioner_weights}")  # the one --conditioner rule
        if self.conditioner_weights is not None and not Path(self.conditioner_weights).is_file():
            raise ConfigError(f"conditioner weights {self.conditioner_weights} not found: pass an existing file")
        resolve_zoomldm_config(self.zoomldm)
        if self.zoomldm_weights is not None and not Path(self.zoomldm_weights).is_file():
            raise ConfigError(f"ZoomLDM weights {self.zoomldm_weights} not found: pass an existing weights.ckpt")
        if self.max_patches_per_mag is not None and self.max_patches_per_mag < 1:
            raise ConfigError(f"--max-patches-per-mag {self.max_patches_per_mag} must be at least 1")
        for name in ("batch_size", "grid_pool_to"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} = {getattr(self, name)} must be at least 1")
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers} must be 0 or more")


@dataclass(frozen=True)
class DataSection:
    path: Path = Path("trainset")         # a folder written by `zoomfeat prepare-train`
    batch_size: int = 8
    workers: int = 2
    mag_sampling: str = "uniform"         # "uniform" (official recipe) or "proportional" to patch counts
    steps_per_epoch: int = 1000           # epochs only pace logging; data order depends on the global step
    val_fraction: float = 0.02            # share of each magnification's patches held out for validation
    val_max_per_mag: int = 32
    seed: int = 0


@dataclass(frozen=True)
class ModelSection:
    zoomldm: Path | None = None           # official config.yaml (or folder) of the architecture
    init_from: Path | None = None         # official weights to fine-tune; None trains from scratch


@dataclass(frozen=True)
class OptimSection:
    lr: float = 2.0e-5
    weight_decay: float = 0.01
    warmup_steps: int = 1000              # linear warm-up from lr * warmup_start_factor, then constant
    warmup_start_factor: float = 1.0e-6
    p_uncond: float = 0.1                 # classifier-free dropout of the whole context (zeros)
    ema_decay: float = 0.9999             # effective decay min(ema_decay, (1 + n) / (10 + n))
    grad_clip: float | None = None
    summarizer_lr_scale: float = 1.0      # the Summarizer's lr / the U-Net's (official: 1, joint); 0 freezes it


@dataclass(frozen=True)
class TrainerSection:
    out: Path = Path("runs/zoomldm")
    devices: str = "auto"                 # "auto", a count ("4") or a list ("0,1")
    num_nodes: int = 1
    strategy: str = "auto"                # "auto", "ddp", ...
    accelerator: str = "auto"
    precision: str = "auto"               # "auto": bf16-mixed on GPU (16-mixed without bf16), 32-true on CPU
    max_steps: int = 10000
    every_n_steps: int = 1000             # checkpoint + official export + validation
    log_every_n_steps: int = 50
    resume: str = "auto"                  # "auto" (OUT/checkpoints/last.ckpt when present), "none" or a path


@dataclass(frozen=True)
class ValidationSection:
    enabled: bool = True
    samples: bool = True                  # save decoded DDIM sample grids per magnification as PNG
    sample_steps: int = 10
    samples_per_mag: int = 4
    guidance: float = 2.0
    max_batches: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    """The whole ``zoomfeat train`` configuration; build it with :func:`load_train_config`."""

    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    def __post_init__(self) -> None:
        _validate(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate(c: TrainConfig) -> None:
    d, o, t, v = c.data, c.optim, c.trainer, c.validation
    _check(c.model.zoomldm is not None, "model.zoomldm is not set: pass --zoomldm CONFIG_OR_DIR (or tiny)")
    resolve_zoomldm_config(c.model.zoomldm)
    _check(d.mag_sampling in MAG_SAMPLING, f"data.mag_sampling {d.mag_sampling!r}: use one of {MAG_SAMPLING}")
    _check(d.batch_size >= 1, f"data.batch_size {d.batch_size} must be at least 1")
    _check(d.workers >= 0, f"data.workers {d.workers} must be 0 or more")
    _check(d.steps_per_epoch >= 1, f"data.steps_per_epoch {d.steps_per_epoch} must be at least 1")
    _check(0.0 <= d.val_fraction < 1.0, f"data.val_fraction {d.val_fraction} must be in [0, 1)")
    _check(d.val_max_per_mag >= 0, f"data.val_max_per_mag {d.val_max_per_mag} must be 0 or more")
    _check(o.lr > 0, f"optim.lr {o.lr} must be positive")
    _check(o.weight_decay >= 0, f"optim.weight_decay {o.weight_decay} must be 0 or more")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps {o.warmup_steps} must be 0 or more")
    _check(0 < o.warmup_start_factor <= 1, f"optim.warmup_start_factor {o.warmup_start_factor} must be in (0, 1]")
    _check(0.0 <= o.p_uncond < 1.0, f"optim.p_uncond {o.p_uncond} must be in [0, 1)")
    _check(0.0 <= o.ema_decay < 1.0, f"optim.ema_decay {o.ema_decay} must be in [0, 1)")
    _check(o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip {o.grad_clip} must be positive or null")
    _check(math.isfinite(o.summarizer_lr_scale) and o.summarizer_lr_scale >= 0,
           f"optim.summarizer_lr_scale {o.summarizer_lr_scale} must be a finite number >= 0 "
           "(1: trained with the U-Net, as officially; 0: kept at its initialisation)")
    _check(t.precision in PRECISIONS, f"trainer.precision {t.precision!r}: use one of {PRECISIONS}")
    _check(t.max_steps >= 1, f"trainer.max_steps {t.max_steps} must be at least 1")
    _check(t.every_n_steps >= 1, f"trainer.every_n_steps {t.every_n_steps} must be at least 1")
    _check(t.log_every_n_steps >= 1, f"trainer.log_every_n_steps {t.log_every_n_steps} must be at least 1")
    _check(t.num_nodes >= 1, f"trainer.num_nodes {t.num_nodes} must be at least 1")
    _check(v.sample_steps >= 1, f"validation.sample_steps {v.sample_steps} must be at least 1")
    _check(v.samples_per_mag >= 1, f"validation.samples_per_mag {v.samples_per_mag} must be at least 1")
    resume = t.resume
    _check(resume in ("auto", "none") or Path(resume).is_file(),
           f"trainer.resume {resume!r}: use auto, none or an existing checkpoint file")
    if c.model.init_from is not None:
        _check(Path(c.model.init_from).is_file(),
               f"model.init_from {c.model.init_from} not found: pass an official weights.ckpt or null")


_SECTION_TYPES = {"data": DataSection, "model": ModelSection, "optim": OptimSection,
                  "trainer": TrainerSection, "validation": ValidationSection}


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the type of the field's default (paths, ints, floats, bools)."""
    if value is None:
        return None
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() in ("true", "yes", "1"):
                return True
            if value.lower() in ("false", "no", "0"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} = {value!r} is not a boolean: use true or false")
    try:
        if isinstance(default, Path) or where in ("model.zoomldm", "model.init_from"):
            return Path(str(value))
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float) or where == "optim.grad_clip":
            return float(value)
        if where == "validation.max_batches":
            return int(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where} = {value!r} is not a {type(default).__name__}") from e
    return str(value)


def _section(name: str, values: Mapping[str, Any] | None) -> Any:
    cls = _SECTION_TYPES[name]
    values = dict(values or {})
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key {name}.{unknown[0]}: use one of {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, getattr(defaults, k), f"{name}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"training config {path} not found: pass --config train.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {one_line(e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping with sections {', '.join(_SECTION_TYPES)}")
    return data


def load_train_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read ``path`` (optional), apply ``overrides`` (``{"section.key": value}``, ``None`` = null)."""
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        for name, values in _read_yaml(Path(path)).items():
            if name not in _SECTION_TYPES:
                raise ConfigError(f"unknown section {name!r} in {path}: use {', '.join(_SECTION_TYPES)}")
            if values is not None and not isinstance(values, dict):
                raise ConfigError(f"section {name!r} in {path} must be a mapping")
            raw[name] = dict(values or {})
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in _SECTION_TYPES or not name:
            raise ConfigError(f"bad override {key!r}: use section.key with a section of {', '.join(_SECTION_TYPES)}")
        raw.setdefault(section, {})[name] = value
    return TrainConfig(**{name: _section(name, raw.get(name)) for name in _SECTION_TYPES})


def parse_set_options(items: list[str] | None) -> dict[str, str | None]:
    """``["optim.lr=1e-4", "model.init_from=null"]`` (``--set``) -> ``{"optim.lr": "1e-4", "model.init_from": None}``."""
    out: dict[str, str | None] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: use section.key=value")
        value = value.strip()
        out[key.strip()] = None if value.lower() in ("null", "none") else value
    return out

