"""Typed, frozen configuration of a MIL cross-validation run, validated before any work starts.

Protocol presets fix the training schedule; every value can be overridden (``--epochs``, ``--lr`` ...):

- ``hipt``: Adam lr 2e-4, weight decay 1e-5, 20 epochs, the model of the last epoch is evaluated
  (HIPT's weakly-supervised subtyping protocol).
- ``clam``: Adam lr 2e-4, weight decay 1e-5, early stopping on validation loss with patience 20, never
  before epoch 50, at most 200 epochs; the best-validation-loss weights are restored (CLAM).
- ``simil``: Adam lr 2e-4, weight decay 1e-5, 50 epochs; the epoch with the best validation AUC is kept
  and evaluated on the fixed held-out test set (SI-MIL style model selection; the epoch count is ours).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from zoomfeat.errors import ConfigError

SELECTIONS: tuple[str, ...] = ("last", "val_loss", "val_auc")


@dataclass(frozen=True)
class Protocol:
    """A training schedule: ``epochs`` is the maximum; ``patience`` None means no early stopping."""

    name: str
    lr: float
    weight_decay: float
    epochs: int
    selection: str
    patience: int | None = None
    min_epochs: int = 1


PROTOCOLS: dict[str, Protocol] = {
    "hipt": Protocol("hipt", lr=2e-4, weight_decay=1e-5, epochs=20, selection="last"),
    "clam": Protocol("clam", lr=2e-4, weight_decay=1e-5, epochs=200, selection="val_loss", patience=20,
                     min_epochs=50),
    "simil": Protocol("simil", lr=2e-4, weight_decay=1e-5, epochs=50, selection="val_auc"),
}


@dataclass(frozen=True)
class MILConfig:
    """Everything a ``train-mil`` run depends on; saved as ``RUN_DIR/config.json``."""

    features: str
    labels: str
    splits: str
    out: str
    task: str = "subtyping"
    label_col: str = "label"
    hrd_threshold: float | None = None
    classes: tuple[str, ...] | None = None
    model: str = "abmil"
    model_kwargs: dict = field(default_factory=dict)
    protocol: Protocol = PROTOCOLS["hipt"]
    balanced: bool = False
    seed: int = 0
    folds: tuple[int, ...] | None = None
    accelerator: str = "cpu"
    devices: str = "1"
    cache: bool = True

    def __post_init__(self) -> None:
        validate(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: MILConfig) -> None:
    """ConfigError naming the first bad value and the fix."""
    from mil.bags import FeatureSpec
    from mil.models import MIL_MODELS
    from mil.tasks import TASKS

    FeatureSpec.parse(cfg.features)
    _check(cfg.task in TASKS, f"unknown task {cfg.task!r}: use one of {', '.join(TASKS)}")
    _check(cfg.model in MIL_MODELS, f"unknown model {cfg.model!r}: use one of {', '.join(sorted(MIL_MODELS))}")
    p = cfg.protocol
    _check(p.lr > 0, f"--lr must be > 0, got {p.lr}")
    _check(p.weight_decay >= 0, f"--weight-decay must be >= 0, got {p.weight_decay}")
    _check(p.epochs >= 1, f"--epochs must be >= 1, got {p.epochs}")
    _check(p.selection in SELECTIONS, f"unknown model selection {p.selection!r}: use one of {SELECTIONS}")
    _check(p.patience is None or p.patience >= 1, f"--patience must be >= 1, got {p.patience}")
    _check(1 <= p.min_epochs, f"--min-epochs must be >= 1, got {p.min_epochs}")
    _check(cfg.hrd_threshold is None or cfg.task == "hrd", "--hrd-threshold only applies to --task hrd")
    _check(cfg.classes is None or cfg.task == "custom", "--classes only applies to --task custom")
    _check(cfg.folds is None or all(k >= 0 for k in cfg.folds), f"--folds must be >= 0, got {cfg.folds}")
    _check(cfg.accelerator in ("cpu", "gpu", "cuda", "mps", "auto"),
           f"unknown --accelerator {cfg.accelerator!r}: use cpu, gpu, mps or auto")
    _check(isinstance(cfg.model_kwargs, dict), "--model-kwargs must be a JSON object")


def make_protocol(name: str, **overrides) -> Protocol:
    """Preset ``name`` with every non-None override applied (``epochs=5, lr=1e-3`` ...)."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}: use one of {', '.join(PROTOCOLS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("min_epochs") is None and "epochs" in given:
        given["min_epochs"] = min(PROTOCOLS[name].min_epochs, given["epochs"])
    return replace(PROTOCOLS[name], **given)


def effective_model_kwargs(cfg: MILConfig) -> dict:
    """``model_kwargs`` plus CLAM's ``subtyping=True`` for ``--task subtyping`` unless given explicitly
    (subtypes are mutually exclusive: the most attended instances are also negatives for the other
    classes' instance classifiers, as in CLAM's reference code)."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.model in ("clam_sb", "clam_mb") and cfg.task == "subtyping":
        kwargs.setdefault("subtyping", True)
    return kwargs
