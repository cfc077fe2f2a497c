"""Typed, frozen configs of ``zoomfeat prepare-cdm`` and ``zoomfeat train-cdm``, validated before any work.

``TrainCDMConfig`` has one section per argparse group of ``train-cdm`` (``data``, ``model``, ``optim``,
``trainer``), field names equal to the option destinations, and is saved with the run
(``OUT/train_cdm_config.json``); sampling rebuilds the DiT from its ``model`` section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from zoomfeat.errors import ConfigError
from zoomfeat.train.config import MAG_SAMPLING, PRECISIONS

RUNTIME_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class PrepareCDMConfig:
    """Settings of ``zoomfeat prepare-cdm``: Summarizer contexts of a prepare-train set."""

    data: Path                          # folder written by `zoomfeat prepare-train`
    zoomldm: str                        # tiny, a release folder or a config.yaml
    out: Path
    weights: Path | None = None         # ZoomLDM checkpoint (default: beside the config)
    labels: Path | None = None          # optional CSV slide_id,label -> one-hot external condition
    batch_size: int = 64
    workers: int = 2                    # DataLoader workers reading the set's shards
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        _check(Path(self.data).is_dir(), f"--data {self.data} is not a folder: pass a prepare-train output folder")
        _check(self.batch_size >= 1, f"--batch-size {self.batch_size} must be at least 1")
        _check(self.workers >= 0, f"--workers {self.workers} must be 0 or more")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"--device {self.device!r}: use auto, cpu or cuda")
        _check(self.precision in RUNTIME_PRECISIONS,
               f"--precision {self.precision!r}: use one of {', '.join(RUNTIME_PRECISIONS)}")
        from zoomfeat.resolve import resolve_zoomldm

        resolve_zoomldm(self.zoomldm, self.weights, require_weights=True)  # paths checked here, before work
        _check(self.labels is None or Path(self.labels).is_file(),
               f"--labels {self.labels} not found: pass a CSV with columns slide_id,label")


@dataclass(frozen=True)
class DataSection:
    path: Path = Path("contexts")       # folder written by `zoomfeat prepare-cdm`
    batch_size: int = 256               # per device (the official global batch is 256)
    workers: int = 2
    mag_sampling: str = "uniform"       # magnifications drawn uniformly per sample, as ZoomLDM training
    steps_per_epoch: int = 1000         # epochs only pace logging; batches depend on the global step
    seed: int = 0


@dataclass(frozen=True)
class ModelSection:
    size: str = "DiT-B"                 # official size: DiT-S, DiT-B, DiT-L, DiT-XL
    depth: int | None = None            # overrides of the size's depth / width / heads
    hidden_size: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.0     # label dropout; > 0 enables classifier-free guidance on magnification
    learn_sigma: bool = True            # learned-range variance + hybrid loss (official); false: x0-MSE only


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1.0e-4                  # AdamW, constant, as the official CDM
    weight_decay: float = 0.0
    ema_decay: float = 0.9999           # plain decay from the first step (the official update_ema)
    grad_clip: float | None = None


@dataclass(frozen=True)
class TrainerSection:
    out: Path = Path("runs/cdm")
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"             # bf16-mixed on GPU, 32-true on CPU
    max_steps: int = 400000
    every_n_steps: int = 50000          # step checkpoint + official export interval
    log_every_n_steps: int = 100
    resume: str = "auto"                # auto (OUT/checkpoints/last.ckpt when present), none, or a path


@dataclass(frozen=True)
class TrainCDMConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)

    def __post_init__(self) -> None:
        d, m, o, t = self.data, self.model, self.optim, self.trainer
        _check(d.batch_size >= 1, f"data.batch_size {d.batch_size} must be at least 1")
        _check(d.workers >= 0, f"data.workers {d.workers} must be 0 or more")
        _check(d.mag_sampling in MAG_SAMPLING, f"data.mag_sampling {d.mag_sampling!r}: use one of {MAG_SAMPLING}")
        _check(d.steps_per_epoch >= 1, f"data.steps_per_epoch {d.steps_per_epoch} must be at least 1")
        self.dit_overrides()  # size / heads / dropout checked by DiTConfig
        _check(o.lr > 0, f"optim.lr {o.lr} must be positive")
        _check(o.weight_decay >= 0, f"optim.weight_decay {o.weight_decay} must be 0 or more")
        _check(0.0 <= o.ema_decay < 1.0, f"optim.ema_decay {o.ema_decay} must be in [0, 1)")
        _check(o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip {o.grad_clip} must be positive")
        _check(t.precision in PRECISIONS, f"trainer.precision {t.precision!r}: use one of {PRECISIONS}")
        for name in ("max_steps", "every_n_steps", "log_every_n_steps", "num_nodes"):
            _check(getattr(t, name) >= 1, f"trainer.{name} {getattr(t, name)} must be at least 1")
        _check(t.resume in ("auto", "none") or Path(t.resume).is_file(),
               f"trainer.resume {t.resume!r}: use auto, none or an existing checkpoint file")

    def dit_overrides(self):
        """The DiT architecture for a context of any width (``in_channels`` etc. come from the data)."""
        from zoomfeat.cdm.dit import preset

        m = self.model
        given = {k: v for k, v in (("depth", m.depth), ("hidden_size", m.hidden_size), ("num_heads", m.num_heads))
                 if v is not None}
        return preset(m.size, mlp_ratio=m.mlp_ratio, class_dropout_prob=m.class_dropout_prob,
                      learn_sigma=m.learn_sigma, **given)
