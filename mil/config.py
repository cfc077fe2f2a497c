"""Typed, frozen configuration of a MIL cross-validation run, validated before any work starts.

A run's training plan (:func:`training_plan`) comes from two places. The protocol preset (:data:`PROTOCOLS`,
its reference in :data:`PRESET_SOURCES`) fixes the settings a published evaluation protocol prescribes; the
head's recipe (:data:`RECIPES`, its reference code in ``source``) brings what that code uses for everything the
protocol leaves open: the optimiser, its step size, betas and weight decay, the LR schedule, gradient clipping
and the loss weights (in the head). Every value can be overridden (``--epochs``, ``--lr`` ...), always as an
option the user gives; :func:`plan_rows` names, for every setting of the plan, the value and where it comes from
(the preset's reference, the head's recipe, or the option), and the run prints and records that table.

The presets (:data:`PRESET_SOURCES` names what each takes from its reference): ``hipt`` evaluates the last
epoch's model; ``simil`` the epoch of the best (validation AUC + accuracy) / 2, the latest of tied epochs
(:class:`mil.train.Selection`); ``clam`` stops early as CLAM's ``EarlyStopping(patience=20, stop_epoch=50)``
counts: after every epoch (0-based index e) a validation loss lower than or equal to the best so far resets the
counter and saves the weights, a higher one adds 1, and training stops once the counter is >= patience and
e > stop_epoch (``min_epochs``, 50: at least 52 epochs); the saved (best) weights are evaluated.

A recipe's LR schedule is its reference's, followed epoch by epoch (a 200-epoch schedule runs for as many epochs
as the protocol does, :func:`mil.optim.lr_at`); the reference's epochs are kept in the recipe for the record.
``MILConfig`` records the step size and weight decay actually used in its ``protocol``. All heads train on one
bag per optimiser step unless ``bags_per_step`` says otherwise (TransMIL and DTFD run a step's bags one by one).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mil.heads import HEADS
from zoomfeat.errors import ConfigError
from zoomfeat.features import FeatureSpec
from zoomfeat.serial import to_jsonable

SELECTIONS: tuple[str, ...] = ("last", "val_loss", "val_auc")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Protocol:
    """A training schedule: ``epochs`` is the maximum; ``patience`` None means no early stopping."""

    name: str
    lr: float | None  # None: the head's recipe (mil.config.RECIPES); MILConfig records the value used
    weight_decay: float | None
    epochs: int
    selection: str
    patience: int | None = None
    min_epochs: int = 1


PROTOCOLS: dict[str, Protocol] = {
    "hipt": Protocol("hipt", lr=None, weight_decay=None, epochs=20, selection="last"),
    "clam": Protocol("clam", lr=None, weight_decay=None, epochs=200, selection="val_loss", patience=20,
                     min_epochs=50),
    "simil": Protocol("simil", lr=None, weight_decay=None, epochs=40, selection="val_auc"),
}
# where each preset's settings come from (the reference code it is faithful to)
PRESET_SOURCES: dict[str, str] = {
    "hipt": "HIPT (Chen et al. 2022) weakly-supervised subtyping: --max_epochs 20, the last epoch's model",
    "clam": "CLAM main.py (Lu et al. 2021): --max_epochs 200 --early_stopping, EarlyStopping(patience=20, "
            "stop_epoch=50) on the validation loss, the saved best model",
    "simil": "SI-MIL train.py (Kapse et al. 2024): 40 epochs, the epoch of the best (val AUC + accuracy) / 2",
}


@dataclass(frozen=True)
class MILConfig:
    """Everything a ``train-mil`` run depends on; saved as ``RUN_DIR/config.json``."""

    features: FeatureSpec  # a DIR@MAGS text is parsed on construction
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
    seed: int = 0  # the init seed of one cross-validation pass (mil.train reads it); the first of ``seeds``
    seeds: tuple[int, ...] | None = None  # every init seed of the run (``--seeds``); None: (seed,)
    folds: tuple[int, ...] | None = None
    accelerator: str = "cpu"
    devices: str = "1"
    cache: bool = True
    bags_per_step: int | None = None  # None: the head's recipe (1)
    precision: str = "auto"  # auto (bf16 autocast on a GPU, fp32 on the CPU), fp32, bf16
    augment: str | None = None  # folder of synthetic copies (zoomfeat feature-copies): added to training folds only
    train_fraction: float = 1.0  # of each fold's training patients (stratified, seeded, nested); mil.augment
    instance_sample: float = 1.0  # share of each training bag's instances drawn per step (1: all; mil.train)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", FeatureSpec.parse(self.features))  # parsed once, here
        seeds = (self.seed,) if self.seeds is None else tuple(self.seeds)
        object.__setattr__(self, "seeds", seeds)
        if seeds and self.seed not in seeds:
            object.__setattr__(self, "seed", seeds[0])
        p = self.protocol
        if isinstance(p, Protocol) and (p.lr is None or p.weight_decay is None):
            ref = RECIPES.get(self.model, DEFAULT_RECIPE).reference
            lr = ref["lr"] if p.lr is None else p.lr
            wd = ref["weight_decay"] if p.weight_decay is None else p.weight_decay
            object.__setattr__(self, "protocol", replace(p, lr=lr, weight_decay=wd))  # the values used
        validate(self)

    def to_json(self) -> dict:
        """The config as JSON values, the feature set in its text form (``DIR@20x+5x``)."""
        return {**to_jsonable(self), "features": str(self.features)}

    def for_seed(self, seed: int) -> MILConfig:
        """This config for one cross-validation pass: ``seed`` is the init seed mil.train reads."""
        return replace(self, seed=seed)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: MILConfig) -> None:
    """ConfigError naming the first bad value and the fix."""
    from mil.tasks import TASKS

    _check(len(cfg.seeds) >= 1, "--seeds names no seed: give e.g. --seeds 0,1,2")
    _check(len(set(cfg.seeds)) == len(cfg.seeds), f"--seeds {','.join(map(str, cfg.seeds))} repeats a seed")
    _check(all(0 <= s < 2**63 for s in cfg.seeds), f"--seeds must be in [0, 2^63), got {cfg.seeds}")
    _check(cfg.task in TASKS, f"unknown task {cfg.task!r}: use one of {', '.join(TASKS)}")
    _check(cfg.model in HEADS, f"unknown model {cfg.model!r}: use one of {', '.join(sorted(HEADS))}")
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
    _check(isinstance(cfg.train_fraction, (int, float)) and 0.0 < float(cfg.train_fraction) <= 1.0,
           f"--train-fraction must be in (0, 1], got {cfg.train_fraction}")
    _check(isinstance(cfg.instance_sample, (int, float)) and 0.0 < float(cfg.instance_sample) <= 1.0,
           f"--instance-sample must be in (0, 1], got {cfg.instance_sample}")
    _check(cfg.bags_per_step is None or cfg.bags_per_step >= 1,
           f"--bags-per-step must be >= 1, got {cfg.bags_per_step}")
    _check(cfg.precision in PRECISIONS, f"unknown --precision {cfg.precision!r}: use one of {', '.join(PRECISIONS)}")


def make_protocol(name: str, **overrides) -> Protocol:
    """Preset ``name`` with every non-None override applied (``epochs=5, lr=1e-3`` ...)."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}: use one of {', '.join(PROTOCOLS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("min_epochs") is None and "epochs" in given:
        given["min_epochs"] = min(PROTOCOLS[name].min_epochs, given["epochs"])
    return replace(PROTOCOLS[name], **given)


def effective_model_kwargs(cfg: MILConfig) -> dict:
    """``model_kwargs`` plus what the task implies for a head, unless given explicitly: CLAM's
    ``subtyping=True`` for ``--task subtyping`` (mutually exclusive classes: the most attended instances are also
    negatives for the other classes' instance classifiers, as in CLAM's code); DSMIL's single positive stream
    for ``--task hrd`` (its ``--num_classes 1``) and, whatever the task, its prediction as the mean of its two
    streams (``average=True``, its train_tcga.py's ``--average`` default and the paper's bag score); TransMIL's
    class token left out of the value convolution (``class_token_residual=False``; why: mil.heads.transmil)."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.model in ("clam_sb", "clam_mb") and cfg.task == "subtyping":
        kwargs.setdefault("subtyping", True)
    if cfg.model == "dsmil":
        kwargs.setdefault("average", True)
        if cfg.task == "hrd":
            kwargs.setdefault("negative_stream", False)
    if cfg.model == "transmil":
        kwargs.setdefault("class_token_residual", False)
    return kwargs


@dataclass(frozen=True)
class Recipe:
    """What a head brings to a protocol (see the module docstring); ``reference`` keeps its reference
    code's own step size, weight decay and epochs for the record."""

    source: str
    optimizer: str = "adam"  # "adam" | "radam_lookahead"
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"  # "constant" | "cosine" | "step"
    eta_min: float = 0.0  # cosine: final LR
    milestones: tuple[float, ...] = ()  # step: fractions of the reference's epochs
    gamma: float = 0.1  # step: LR factor per milestone
    bags_per_step: int = 1
    reference: dict = field(default_factory=dict)
    loss: str = "bag cross-entropy"  # the training loss, as the head computes it (mil.heads)


_CLAM_LOSS = "0.7 bag cross-entropy + 0.3 instance clustering (smooth top-1 SVM, 8 top/bottom instances)"
RECIPES: dict[str, Recipe] = {
    "abmil": Recipe("Ilse et al. 2018 (AttentionDeepMIL main.py)",
                    reference={"lr": 5e-4, "weight_decay": 1e-4, "epochs": 20}),
    "clam_sb": Recipe("Lu et al. 2021 (CLAM main.py / README)",
                      reference={"lr": 2e-4, "weight_decay": 1e-5, "epochs": 200}, loss=_CLAM_LOSS),
    "clam_mb": Recipe("Lu et al. 2021 (CLAM main.py / README)",
                      reference={"lr": 2e-4, "weight_decay": 1e-5, "epochs": 200}, loss=_CLAM_LOSS),
    "dsmil": Recipe("Li et al. 2021 (dsmil-wsi train_tcga.py)", betas=(0.5, 0.9), schedule="cosine",
                    eta_min=5e-6, reference={"lr": 2e-4, "weight_decay": 5e-3, "epochs": 200},
                    loss="0.5 bag cross-entropy + 0.5 max-instance binary cross-entropy"),
    "transmil": Recipe("Shao et al. 2021 (TransMIL config: lookahead_radam)", optimizer="radam_lookahead",
                       reference={"lr": 2e-4, "weight_decay": 1e-5, "epochs": 200}),
    "dtfd": Recipe("Zhang et al. 2022 (DTFD-MIL Main_DTFD_MIL.py)", schedule="step", milestones=(0.5,),
                   gamma=0.2, reference={"lr": 1e-4, "weight_decay": 1e-4, "epochs": 200},
                   loss="tier-2 cross-entropy + mean tier-1 cross-entropy over 4 random pseudo-bags (AFS)"),
    "mean": Recipe("baseline (ABMIL's optimiser)", reference={"lr": 5e-4, "weight_decay": 1e-4, "epochs": 20}),
    "max": Recipe("baseline (ABMIL's optimiser)", reference={"lr": 5e-4, "weight_decay": 1e-4, "epochs": 20}),
}
DEFAULT_RECIPE = Recipe("a head without a recipe (Adam 2e-4, weight decay 1e-5)",
                        reference={"lr": 2e-4, "weight_decay": 1e-5, "epochs": 20})


@dataclass(frozen=True)
class TrainingPlan:
    """The settings one run trains with: the protocol's, the head's recipe, the user's overrides."""

    model: str
    protocol: Protocol
    recipe: Recipe
    bags_per_step: int
    clip_groups: dict
    precision: str  # "fp32" | "bf16"
    model_kwargs: dict = field(default_factory=dict)  # the head's arguments beyond its defaults
    instance_sample: float = 1.0  # share of a training bag's instances in each step


def training_plan(cfg: MILConfig, device: str = "cpu") -> TrainingPlan:
    """Combine protocol, recipe and overrides; bf16 autocast only on a GPU (``precision`` auto)."""
    from mil.registry import load_heads

    recipe = RECIPES.get(cfg.model, DEFAULT_RECIPE)
    cls = load_heads()[cfg.model]
    bags = cfg.bags_per_step or recipe.bags_per_step
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    return TrainingPlan(cfg.model, cfg.protocol, recipe, bags, dict(getattr(cls, "clip_groups", {})), precision,
                        effective_model_kwargs(cfg), float(cfg.instance_sample))


def plan_rows(cfg: MILConfig, device: str = "cpu") -> list[tuple[str, str, str]]:
    """(setting, value, source) for every setting of the run's plan: the preset's reference for what the preset
    fixes, the head's recipe for what it brings, ``--option`` for every departure the user gave."""
    plan = training_plan(cfg, device)
    p, r, preset = plan.protocol, plan.recipe, PROTOCOLS[cfg.protocol.name]
    preset_src = f"preset {p.name}: {PRESET_SOURCES[p.name]}"
    recipe_src = f"{cfg.model} recipe: {r.source}"

    def source(name: str, option: str, default_src: str) -> str:
        fixed = getattr(preset, name)
        if fixed is None:  # the preset leaves it to the head's recipe
            return recipe_src if getattr(p, name) == r.reference.get(name) else f"{option} (recipe: {r.reference.get(name)})"
        return default_src if getattr(p, name) == fixed else f"{option} (departs from preset {p.name}: {fixed})"

    selection = {"last": "the last epoch's model", "val_loss": "the best validation-loss model",
                 "val_auc": "the best (val AUC + accuracy) / 2, latest among ties"}[p.selection]
    stopping = _stopping(p)
    horizon = r.reference.get("epochs", 200)
    schedule = {"constant": "constant", "cosine": f"cosine to {r.eta_min:g} over {horizon} epochs",
                "step": f"x {r.gamma:g} from epoch {', '.join(str(round(m * horizon)) for m in r.milestones)}"}
    optimizer = "RAdam + Lookahead (k 6, alpha 0.5)" if r.optimizer == "radam_lookahead" else "Adam"
    given = cfg.bags_per_step is not None and cfg.bags_per_step != r.bags_per_step
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted(plan.model_kwargs.items())) or "the head's defaults"
    return [
        ("epochs (max)", str(p.epochs), source("epochs", "--epochs", preset_src)),
        ("model evaluated", selection, source("selection", "--selection", preset_src)),
        ("early stopping", stopping, preset_src if (p.patience, p.min_epochs) == (preset.patience, preset.min_epochs)
         else f"--patience/--min-epochs/--epochs (departs from preset {p.name}: {_stopping(preset)})"),
        ("optimiser", f"{optimizer}, betas {r.betas[0]:g}/{r.betas[1]:g}", recipe_src),
        ("learning rate", f"{p.lr:g}", source("lr", "--lr", recipe_src)),
        ("weight decay", f"{p.weight_decay:g}", source("weight_decay", "--weight-decay", recipe_src)),
        ("LR schedule", schedule[r.schedule], recipe_src),
        ("gradient clipping", f"norm {max(plan.clip_groups.values()):g} per part" if plan.clip_groups else "none",
         recipe_src),
        ("loss", r.loss, recipe_src),
        ("head arguments", kwargs, "--model-kwargs and the task (mil.config.effective_model_kwargs)"
         if plan.model_kwargs else recipe_src),
        ("bags per step", str(plan.bags_per_step), "--bags-per-step" if given else recipe_src),
        ("instances per step", "all" if plan.instance_sample >= 1 else f"a random {plan.instance_sample:.0%}",
         "--instance-sample (departs from every reference: all instances)" if plan.instance_sample < 1
         else "every reference (whole bags)"),
        ("bag order", "class-balanced draws with replacement" if cfg.balanced else "a seeded shuffle per epoch",
         "--balanced" if cfg.balanced else "every reference (a shuffled loader)"),
        ("init seeds", ",".join(map(str, cfg.seeds)), "--seeds" if cfg.seeds != (0,) else "default (one seed, 0)"),
        ("precision", plan.precision,
         "--precision" if cfg.precision != "auto" else "default (fp32 on a CPU, bf16 on a GPU)"),
    ]


def _stopping(p: Protocol) -> str:
    # CLAM stops once the counter reaches patience after 0-based epoch stop_epoch: 1-based epoch stop_epoch + 2
    return "none" if p.patience is None else f"patience {p.patience}, not before epoch {p.min_epochs + 2}"


def describe_plan_rows(rows: list[tuple[str, str, str]], model: str, protocol: str) -> str:
    """The plan table as printed at the start of a run (one setting a line)."""
    width = max(len(k) for k, _, _ in rows)
    lines = [f"training plan: {model} under preset {protocol}"]
    lines += [f"  {k:<{width}}  {v}  [{src}]" for k, v, src in rows]
    return "\n".join(lines)
