"""The whole toolkit on a synthetic cohort, through the same public commands a user runs.

Every stage is a ``zoomfeat`` command line: the demo prints it, runs it in this process through
:func:`cli.main`, times it, and stops at the first stage that fails. The cohort (``synth --kind
arrangement``) carries a purely multi-scale class signal: two tissue types per 20x tile in the same
proportions in both classes, clustered in one class and intermixed in the other, so a bag of single 20x
tiles cannot separate the classes and a 5x view (4x4 tiles) can. A few steps are plain Python rather than
commands (they are printed as ``(python) ...``): writing the 5x input image of ``superres``, measuring how
much the trained model's features move with their conditioning, and the index page.

A stage whose outputs exist is skipped (the analysis commands resume by themselves; the generation commands,
which want a new folder, are skipped when their manifest exists), so rerunning after an interruption continues.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from zoomfeat.errors import ConfigError
from zoomfeat.mags import Magnification
from zoomfeat.synthetic import patient_slide_counts

# The ABMIL runs of the comparison: (run name, feature set directory, magnification spec); the first is the
# reference of the paired statistics.
FEATURE_SETS: tuple[tuple[str, str, str], ...] = (
    ("toy_20x", "toy", "20x"),
    ("toy_5x", "toy", "5x"),
    ("zoomldm_20x", "zoomldm", "20x"),
    ("zoomldm_5x", "zoomldm", "5x"),
    ("zoomldm_20x+5x", "zoomldm", "20x+5x"),
)
REFERENCE_RUN = "toy_20x"
FUSED_RUN = "zoomldm_20x+5x"


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``zoomfeat demo``; the defaults finish in minutes on a 2-core CPU."""

    out: Path = Path("demo_out")
    slides: int = 48
    seed: int = 0
    size: int = 3072  # level-0 side of each synthetic slide (20x, 0.5 um/px): 12x12 tiles, 3x3 5x patches
    slides_per_patient: tuple[int, ...] = (1, 2, 3)  # cycled over patients: some patients have several slides
    cluster: float = 2.0  # correlation length of the label-1 tissue clusters, in 20x tiles
    tile_signal: float = 0.0  # share of label-1 epithelium tiles with the cell-level grain cue (0: 5x only)
    train_slides: int = 8  # slides (first of each class, alternating) whose patches train the tiny ZoomLDM
    patches_per_mag: int = 24
    train_steps: int = 400  # tiny ZoomLDM training steps
    lr: float = 2e-3
    # the Summarizer's lr / the U-Net's. 0 (the default): kept at its seeded initialisation, a fixed projection of
    # the conditioning grid; trained jointly at this lr it collapses to nearly one context within 400 steps and
    # the features stop depending on it (measured, benchmarks/RESULTS.md)
    summarizer_lr_scale: float = 0.0
    timestep: int = 200  # diffusion timestep of the extracted features
    block: int = 8  # U-Net output block of the features (16x16 latent positions: 4x4 per 20x tile of a 5x patch)
    pooling: str = "meanmax"  # spatial mean and max of that block, concatenated
    first_stage_steps: int = 120  # fitting steps of the first-stage encoder (see fit_first_stage)
    folds: int = 5
    mil_epochs: int = 20
    generation: bool = True  # the generation wing (sample, generate-large, superres)
    gen_steps: int = 10
    cdm_steps: int = 300  # training steps of the generation wing's tiny CDM

    def __post_init__(self) -> None:
        # patient-level stratified folds need at least one patient of each of the two classes per fold
        patients = len(patient_slide_counts(self.slides, self.slides_per_patient))
        if patients // 2 < self.folds:
            needed = next(n for n in range(self.slides, 100 * self.folds)
                          if len(patient_slide_counts(n, self.slides_per_patient)) // 2 >= self.folds)
            raise ConfigError(f"--slides {self.slides} gives {patients} patients, too few for {self.folds}-fold "
                              f"patient-level CV of two classes: use at least {needed}")
        if self.size < 2048 or self.size % 1024:
            raise ConfigError(f"--size {self.size} must be a multiple of 1024 and at least 2048 px")
        if self.train_steps < 1 or self.mil_epochs < 1 or self.gen_steps < 2 or self.cdm_steps < 1:
            raise ConfigError("--train-steps, --mil-epochs and --cdm-steps must be at least 1, --gen-steps at least 2")
        if not 2 <= self.train_slides <= self.slides:
            raise ConfigError(f"--train-slides {self.train_slides} must lie in [2, --slides {self.slides}]")
        if not 0 < self.timestep < 1000:
            raise ConfigError(f"--timestep {self.timestep} must lie in 1..999")
        if self.pooling not in ("mean", "meanmax"):
            raise ConfigError(f"--pooling {self.pooling!r}: use mean or meanmax")
        if not (math.isfinite(self.summarizer_lr_scale) and self.summarizer_lr_scale >= 0):
            raise ConfigError(f"--summarizer-lr-scale {self.summarizer_lr_scale} must be a finite number >= 0 "
                              "(0: the Summarizer kept at its initialisation, 1: trained with the U-Net)")
        if self.first_stage_steps < 1:
            raise ConfigError(f"--first-stage-steps {self.first_stage_steps} must be at least 1")


@dataclass
class Stage:
    """One step of the demo: a ``zoomfeat`` command (``argv``) or a Python step (``python``).

    ``argv`` may be a callable when it depends on what an earlier stage wrote (e.g. the test slides of fold 0);
    ``done`` is a file whose existence means the stage has already run (generation commands want a new folder).
    """

    title: str
    argv: list[str] | Callable[[], list[str]] | None = None
    python: Callable[[], None] | None = None
    python_name: str = ""
    done: Path | None = None
    group: str = "analysis"

    def command(self) -> list[str]:
        argv = self.argv() if callable(self.argv) else self.argv
        return [str(a) for a in argv or []]


def tiny_model_config() -> Path:
    """The official-format config of the tiny ZoomLDM the demo trains (shipped with the package)."""
    return Path(str(resources.files("zoomfeat.train").joinpath("tiny_zoomldm.yaml")))


# ----- what the cohort holds -----------------------------------------------------------------------------------
def read_labels(labels_csv: Path) -> list[tuple[str, str, int]]:
    """(case_id, slide_id, label) rows of the cohort's labels.csv."""
    with open(labels_csv, newline="") as fh:
        return [(r["case_id"], r["slide_id"], int(r["label"])) for r in csv.DictReader(fh)]


def training_slides(slides_dir: Path, n: int) -> list[Path]:
    """The first ``n`` slides alternating between the classes (both classes train the generative model)."""
    rows = read_labels(slides_dir / "labels.csv")
    by_class = [[s for _, s, y in rows if y == c] for c in (0, 1)]
    picked = [s for pair in zip(*by_class) for s in pair][:n]
    return [slides_dir / f"{s}.svs" for s in picked]


def test_slides_of_fold(splits_dir: Path, labels_csv: Path, fold: int = 0) -> dict[int, str]:
    """One test slide of each class in fold ``fold`` (the heatmaps' slides): {label: slide_id}."""
    with open(splits_dir / f"splits_{fold}.csv", newline="") as fh:
        test = [r["test"] for r in csv.DictReader(fh) if r.get("test")]
    label = {s: y for _, s, y in read_labels(labels_csv)}
    picked: dict[int, str] = {}
    for s in test:
        picked.setdefault(label[s], s)
    return picked


def tissue_patch(types_json: Path, slide_id: str, mag: Magnification) -> tuple[int, int]:
    """Level-0 (x, y) of the 20x tile or 5x patch (4x4 tiles) with the most tissue tiles, nearest the centre."""
    import numpy as np

    from zoomfeat.synthetic import ARRANGEMENT_TILE

    types = np.asarray(json.loads(types_json.read_text())[slide_id])
    mag = Magnification(mag)
    width = mag.grid_width
    cells = types.shape[0] // width
    blocks = (types[: cells * width, : cells * width] > 0).reshape(cells, width, cells, width).sum(axis=(1, 3))
    if blocks.max() == 0:
        raise ConfigError(f"slide {slide_id} has no tissue {mag} patch")
    ys, xs = np.nonzero(blocks == blocks.max())
    centre = (cells - 1) / 2
    k = int(np.argmin((ys - centre) ** 2 + (xs - centre) ** 2))
    side = ARRANGEMENT_TILE * width
    return int(xs[k]) * side, int(ys[k]) * side


def write_superres_input(slide: Path, x: int, y: int, out_png: Path, side: int = 64) -> None:
    """The 5x patch at level-0 (x, y) (1024 level-0 px) as a ``side``-px PNG: the input of ``superres``."""
    import numpy as np
    import openslide
    from PIL import Image

    from zoomfeat.store import atomic_write

    with openslide.OpenSlide(str(slide)) as s:
        region = s.read_region((x, y), 0, (1024, 1024)).convert("RGB")
    image = region.resize((side, side), Image.Resampling.BOX)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_png) as tmp:
        Image.fromarray(np.asarray(image)).save(tmp, format="PNG")


# ----- a first stage that keeps the tissue colours -------------------------------------------------------------
def fit_first_stage(config: Path, slides: list[Path], tiles_dir: Path, out_ckpt: Path, *, seed: int,
                    steps: int, per_mag: int = 24, batch: int = 16, lr: float = 1e-3) -> dict:
    """An official-format checkpoint of the tiny ZoomLDM (random U-Net and Summarizer, seeded) whose first-stage
    encoder is fitted, for ``steps`` Adam steps, to map each patch to its 4x4-average colour, standardised per
    channel over the patches (so the latents have about unit variance, as a real first stage with its
    ``scale_factor`` does). Patches: up to ``per_mag`` 20x tiles and 5x patches of each training slide
    (``subsample_rows``, as ``prepare-train`` draws them). Writes ``out_ckpt`` and returns the fit's record.

    Why: the randomly initialised encoder maps stroma and epithelium tiles to latents whose means differ by
    ~0.5 % of the latent std, so neither the image nor the conditioning matters to the denoiser. The decoder
    and codebook stay random (the generated images are not meant to look like tissue).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from zoomfeat.extract.zoomldm import to_model_input
    from zoomfeat.mags import parse_mag
    from zoomfeat.model import build_zoomldm
    from zoomfeat.patches import TilePatchDataset
    from zoomfeat.slides import Slide
    from zoomfeat.store import slide_tile_grid
    from zoomfeat.train.prepare import subsample_rows

    torch.manual_seed(seed)
    model = build_zoomldm(config)
    fs = model.first_stage_model
    pixels = []
    for path in slides:
        with Slide(path) as slide:
            grid = slide_tile_grid(slide, [parse_mag("20x"), parse_mag("5x")], tiles_dir=tiles_dir)
            slide_id = slide.info.slide_id
        for mag in ("20x", "5x"):
            coords = np.asarray(grid.coords[mag], np.int64).reshape(-1, 2)
            coords = coords[subsample_rows(len(coords), per_mag, seed, slide_id, parse_mag(mag))]
            data = TilePatchDataset(path, coords, parse_mag(mag))
            try:
                pixels += [data[i][1] for i in range(len(data))]
            finally:
                data.close()
    if len(pixels) < batch:
        raise ConfigError(f"only {len(pixels)} tissue patches in the training slides: use more --train-slides")
    images = to_model_input(torch.stack(pixels), model.first_stage_resolution)
    pooled = F.avg_pool2d(images, model.config.first_stage.downsample_factor)
    mean, std = pooled.mean(dim=(0, 2, 3), keepdim=True), pooled.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
    target = (pooled - mean) / std
    params = list(fs.encoder.parameters()) + list(fs.quant_conv.parameters())
    optimiser = torch.optim.Adam(params, lr=lr)
    draws = np.random.default_rng([seed, 5])
    losses = []
    fs.train()
    for _ in range(steps):
        rows = torch.from_numpy(draws.integers(0, len(images), batch))
        loss = F.mse_loss(fs.encode(images[rows]), target[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    fs.eval()
    if not np.isfinite(losses).all():
        raise ConfigError("the first-stage fit diverged (non-finite loss): rerun with fewer --first-stage-steps")
    from zoomfeat.store import write_json_atomic

    model.save_official(out_ckpt)
    record = {"patches": len(images), "steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
              "channel_mean": mean.flatten().tolist(), "channel_std": std.flatten().tolist()}
    write_json_atomic(out_ckpt.with_suffix(".json"), record)
    return record


# ----- how much the features move with the conditioning ------------------------------------------------------
def context_response(config: Path, weights: Path, trainset: Path, timesteps: tuple[int, ...], out_json: Path,
                     per_mag: int = 32, block: int = 3) -> dict:
    """Relative change of the pooled U-Net features when a patch's own context is replaced by another patch's
    (same magnification) or by the unconditional (zero) context, per magnification and timestep; and
    ``context_vs_other``, the same relative difference between the two Summarizer contexts themselves.

    ``||f(x_t, c_own) - f(x_t, c_other)|| / ||f(x_t, c_own)||``, averaged over up to ``per_mag`` training
    patches, with fixed noise; written to ``out_json`` and returned.
    """
    import numpy as np
    import torch

    from zoomfeat.store import write_json_atomic
    from zoomfeat.mags import MAGNIFICATIONS, mag_name
    from zoomfeat.model import load_zoomldm
    from zoomfeat.train.dataset import TrainingSet

    model = load_zoomldm(config, weights, use_ema=True)
    data = TrainingSet(trainset)
    result: dict = {"block": block, "patches_per_mag": per_mag, "by_mag": {}}
    gen = torch.Generator().manual_seed(0)
    for mag in np.flatnonzero(data.counts):
        rows = list(range(int(data.offsets[mag]), int(data.offsets[mag]) + min(per_mag, int(data.counts[mag]))))
        if len(rows) < 2:
            continue
        items = [data[k] for k in rows]
        z = torch.stack([it[0] for it in items]).float()
        mags = torch.full((len(items),), int(mag), dtype=torch.long)
        with torch.inference_mode():
            own = model.summarize([model.preprocess_ssl(it[1]) for it in items], mags)
            other = own.roll(1, dims=0)
            entry = {"context_vs_other": float(((own - other).flatten(1).norm(dim=1)
                                                / own.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())}
            for t in timesteps:
                tt = torch.full((len(z),), t, dtype=torch.long)
                x_t = model.q_sample(z, tt, torch.randn(z.shape, generator=gen))
                feats = {name: model.unet_features(x_t, tt, ctx, block=block).float().mean(dim=(2, 3))
                         for name, ctx in (("own", own), ("other", other), ("zero", torch.zeros_like(own)))}
                norm = feats["own"].norm(dim=1).clamp_min(1e-12)
                entry[str(t)] = {f"vs_{k}": float(((feats["own"] - feats[k]).norm(dim=1) / norm).mean())
                                 for k in ("other", "zero")}
        result["by_mag"][mag_name(MAGNIFICATIONS[int(mag)])] = entry
    write_json_atomic(out_json, result)
    return result


# ----- the plan ------------------------------------------------------------------------------------------------
def _mil_stage(cfg: DemoConfig, name: str, features: str, mags_text: str) -> Stage:
    d = cfg.out
    return Stage(f"ABMIL on {features}@{mags_text}",
                 ["train-mil", "--task", "custom", "--label-col", "label", "--labels", d / "slides" / "labels.csv",
                  "--splits", d / "splits", "--features", f"{d / 'features' / features}@{mags_text}",
                  "--model", "abmil", "--protocol", "hipt", "--epochs", cfg.mil_epochs, "--seed", cfg.seed,
                  "--out", d / "runs" / name])


def _model_args(cfg: DemoConfig) -> list:
    official = cfg.out / "zoomldm" / "official"
    return ["--zoomldm", official / "config.yaml", "--weights", official / "last.ckpt",
            "--conditioner", "toy", "--toy-seed", cfg.seed]


def _generation_stages(cfg: DemoConfig, model_args: list) -> list[Stage]:
    d, g = cfg.out, cfg.out / "generation"
    slides, types = d / "slides", d / "slides" / "tissue_types.json"

    def slide_of(label: int) -> str:
        return next(s for _, s, y in read_labels(slides / "labels.csv") if y == label)

    def at(label: int, mag: Magnification) -> list:
        x, y = tissue_patch(types, slide_of(label), mag)
        return ["--slide", slides / f"{slide_of(label)}.svs", "--mag", mag, "--x", x, "--y", y]

    small = ["--steps", cfg.gen_steps, "--seed", cfg.seed, "--device", "cpu"]
    out = []
    for mag in ("20x", "5x"):
        out.append(Stage(f"sample: 4 variations of a real {mag} patch of each class", group="generation",
                         argv=lambda mag=mag: ["sample", *model_args, *at(1, mag), "--n", 4, *small,
                                               "--out", g / f"sample_{mag}_clustered"],
                         done=g / f"sample_{mag}_clustered" / "manifest.json"))
        out.append(Stage(f"sample: the same for an intermixed slide at {mag}", group="generation",
                         argv=lambda mag=mag: ["sample", *model_args, *at(0, mag), "--n", 4, *small,
                                               "--out", g / f"sample_{mag}_intermixed"],
                         done=g / f"sample_{mag}_intermixed" / "manifest.json"))
    for method in ("grid", "joint"):
        extra = ["--inner-iterations", 2] if method == "joint" else []
        out.append(Stage(f"generate-large: the 20x image of a 5x patch ({method})", group="generation",
                         argv=lambda method=method, extra=extra: [
                             "generate-large", *model_args, *at(1, "5x"), "--method", method, *extra,
                             "--steps", max(2, cfg.gen_steps // 2), "--seed", cfg.seed, "--device", "cpu",
                             "--out", g / f"large_{method}"],
                         done=g / f"large_{method}" / "manifest.json"))
    sr_in = g / "superres_input_5x.png"

    def sr_coords() -> tuple[Path, int, int]:
        x, y = tissue_patch(types, slide_of(1), "5x")
        return slides / f"{slide_of(1)}.svs", x, y

    out.append(Stage("write a 5x patch as a 64-px PNG (the super-resolution input)", group="generation",
                     python=lambda: write_superres_input(*sr_coords(), sr_in),
                     python_name="zoomfeat.demo.write_superres_input", done=sr_in))
    out.append(Stage("superres: that 5x patch to 20x (inverted conditions + joint sampling)", group="generation",
                     argv=lambda: ["superres", sr_in, "--mag", "5x",
                                   "--zoomldm", d / "zoomldm" / "official" / "config.yaml",
                                   "--weights", d / "zoomldm" / "official" / "last.ckpt",
                                   "--rows", "inverted,bicubic", "--steps", max(2, cfg.gen_steps // 2),
                                   "--inner-iterations", 2, "--inversion-steps", 30, "--seed", cfg.seed,
                                   "--device", "cpu", "--out", g / "superres"],
                     done=g / "superres" / "inverted" / "superres_input_5x.png"))
    out += _cdm_stages(cfg, model_args)
    return out


def _cdm_stages(cfg: DemoConfig, model_args: list) -> list[Stage]:
    """Novel samples: the Summarizer contexts of the training set, a tiny CDM trained on them, and ``sample
    --cdm`` at both magnifications (no slide: the CDM draws the contexts)."""
    d, g = cfg.out, cfg.out / "generation"
    official = d / "zoomldm" / "official"
    contexts, cdm = g / "cdm_contexts", g / "cdm"
    out = [
        Stage("prepare-cdm: the Summarizer contexts of the ZoomLDM training patches", group="generation",
              argv=["prepare-cdm", "--data", d / "trainset", "--zoomldm", official / "config.yaml",
                    "--weights", official / "last.ckpt", "--out", contexts, "--workers", 0, "--device", "cpu"],
              done=contexts / "contexts.h5"),
        Stage(f"train-cdm: a tiny conditioning diffusion model on them ({cfg.cdm_steps} steps)", group="generation",
              argv=["train-cdm", "--data", contexts, "--out", cdm, "--size", "DiT-S", "--depth", 2,
                    "--hidden-size", 64, "--num-heads", 4, "--class-dropout-prob", 0.1, "--max-steps", cfg.cdm_steps,
                    "--every-n-steps", cfg.cdm_steps, "--batch-size", 32, "--workers", 0, "--accelerator", "cpu",
                    "--devices", 1, "--seed", cfg.seed],
              done=cdm / "official" / "last.ckpt"),
    ]
    for mag in ("20x", "5x"):
        out.append(Stage(f"sample --cdm: 4 novel {mag} patches from contexts the CDM draws (no slide)",
                         group="generation",
                         argv=["sample", *model_args, "--cdm", cdm, "--cdm-steps", 20, "--cdm-guidance", 1.5,
                               "--cdm-seed", cfg.seed, "--mag", mag, "--patches", 4, "--n", 1,
                               "--steps", cfg.gen_steps, "--seed", cfg.seed, "--device", "cpu",
                               "--out", g / f"cdm_{mag}"],
                         done=g / f"cdm_{mag}" / "manifest.json"))
    return out


def stages(cfg: DemoConfig) -> list[Stage]:
    """The demo's steps, in order."""
    d = cfg.out
    slides, labels = d / "slides", d / "slides" / "labels.csv"
    model_dir = d / "zoomldm"
    init = d / "zoomldm_init" / "init.ckpt"
    tiny = tiny_model_config()
    model_args = _model_args(cfg)
    plan = [
        Stage("synthesise a two-class cohort whose signal is the 5x arrangement of tissue types",
              ["synth", "--kind", "arrangement", "--out", slides, "--n", cfg.slides, "--size", cfg.size,
               "--seed", cfg.seed, "--slides-per-patient", ",".join(map(str, cfg.slides_per_patient)),
               "--cluster", cfg.cluster, "--tile-signal", cfg.tile_signal],
              done=labels),
        Stage("tile: tissue masks and aligned 20x/5x grids",
              ["tile", slides, "--out", d / "tiles", "--mags", "20x,5x", "--preview"]),
        Stage(f"fit the first-stage encoder to the patches' 4x4 mean colour ({cfg.first_stage_steps} steps)",
              python=lambda: fit_first_stage(tiny, training_slides(slides, cfg.train_slides), d / "tiles", init,
                                             seed=cfg.seed, steps=cfg.first_stage_steps,
                                             per_mag=cfg.patches_per_mag),
              python_name="zoomfeat.demo.fit_first_stage", done=init),
        Stage(f"prepare the ZoomLDM training set from {cfg.train_slides} slides (latents + conditioning grids)",
              lambda: ["prepare-train", *training_slides(slides, cfg.train_slides), "--out", d / "trainset",
                       "--conditioner", "toy", "--zoomldm", tiny, "--weights", init, "--mags", "20x,5x",
                       "--max-patches-per-mag", cfg.patches_per_mag, "--seed", cfg.seed]),
        Stage("train a tiny ZoomLDM on CPU" + (" (U-Net only; the Summarizer stays at its initialisation)"
                                              if cfg.summarizer_lr_scale == 0 else ""),
              ["train", "--data", d / "trainset", "--zoomldm", tiny, "--init-from", init, "--out", model_dir,
               "--max-steps", cfg.train_steps, "--batch-size", 8, "--lr", cfg.lr, "--warmup-steps", 20,
               "--every-n-steps", cfg.train_steps, "--seed", cfg.seed, "--workers", 0, "--no-val-samples",
               "--summarizer-lr-scale", cfg.summarizer_lr_scale]),
        Stage("measure how much the features move with their conditioning",
              python=lambda: context_response(model_dir / "official" / "config.yaml",
                                              model_dir / "official" / "last.ckpt", d / "trainset",
                                              (50, cfg.timestep), d / "context_response.json", block=cfg.block),
              python_name="zoomfeat.demo.context_response", done=d / "context_response.json"),
        Stage(f"extract ZoomLDM features at 20x and 5x (t={cfg.timestep}, block {cfg.block}, {cfg.pooling}; "
              "conditioned on the toy encoder)",
              ["extract", slides, "--tiles", d / "tiles", "--out", d / "features" / "zoomldm", "--encoder", "zoomldm",
               *model_args, "--timestep", cfg.timestep, "--block", cfg.block, "--pooling", cfg.pooling,
               "--conditioning-out", d / "features" / "toy_conditioning", "--mags", "20x,5x"]),
        Stage("extract the toy-encoder baseline at 20x and 5x",
              ["extract", slides, "--tiles", d / "tiles", "--out", d / "features" / "toy", "--encoder", "toy",
               "--toy-seed", cfg.seed, "--mags", "20x,5x"]),
        Stage(f"patient-level, stratified {cfg.folds}-fold splits",
              ["splits", "make", "--labels", labels, "--out", d / "splits", "--folds", cfg.folds, "--mode", "kfold",
               "--seed", cfg.seed]),
    ]
    plan += [_mil_stage(cfg, name, features, mags) for name, features, mags in FEATURE_SETS]
    plan += [Stage(f"report of {name}", ["report", d / "runs" / name]) for name, _, _ in FEATURE_SETS]
    plan.append(Stage("comparison table with paired statistics against toy@20x",
                      ["compare", *[d / "runs" / name for name, _, _ in FEATURE_SETS], "--out", d / "report",
                       "--reference", d / "runs" / REFERENCE_RUN]))
    for label, kind in ((1, "clustered"), (0, "intermixed")):
        plan.append(Stage(f"attention heatmap of {'an' if label == 0 else 'a'} {kind} test slide (fold 0, {FUSED_RUN})",
                          lambda label=label, kind=kind: [
                              "heatmap", d / "runs" / FUSED_RUN,
                              slides / f"{test_slides_of_fold(d / 'splits', labels)[label]}.svs", "--fold", 0,
                              "--top", 8, "--max-size", 768, "--out", d / "heatmaps" / f"{kind}.png"],
                          done=d / "heatmaps" / f"{kind}.png"))
    if cfg.generation:
        plan += _generation_stages(cfg, model_args)
    return plan


# ----- running it ----------------------------------------------------------------------------------------------
def _run_stage(stage: Stage) -> int:
    import cli

    if stage.python is not None:
        stage.python()
        return 0
    return cli.main(stage.command())


def run_demo(cfg: DemoConfig) -> int:
    """Run every stage; write the index page; return 0, or the exit code of the first stage that failed."""
    from zoomfeat.demo_page import write_index
    from zoomfeat.log import quiet_third_party

    quiet_third_party()
    print("zoomfeat demo: a SYNTHETIC cohort and a TINY model -- the numbers show what the pipeline measures, "
          "not how ZoomLDM performs on real slides.", flush=True)
    start = time.perf_counter()
    plan = stages(cfg)
    record: list[dict] = []
    for i, stage in enumerate(plan, 1):
        shown = f"(python) {stage.python_name}" if stage.python else f"$ zoomfeat {shlex.join(stage.command())}"
        print(f"\n[{i}/{len(plan)}] {stage.title}\n{shown}", flush=True)
        if stage.done is not None and stage.done.exists():
            print("    already done", flush=True)
            record.append({"title": stage.title, "command": shown, "seconds": None, "group": stage.group})
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        code = _run_stage(stage)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if code != 0:
            print(f"demo: stage {i} failed with exit code {code}; rerun the command above to see why",
                  file=sys.stderr)
            return code
        record.append({"title": stage.title, "command": shown, "seconds": round(seconds, 1),
                       "cpu_seconds": round(cpu, 1), "group": stage.group})
        print(f"    done in {seconds:.0f} s", flush=True)
    total = time.perf_counter() - start
    _write_stage_times(cfg.out / "stages.json", record, total)
    index = write_index(cfg, record, total)
    print(f"\ndemo finished in {total:.0f} s: open {index}")
    return 0


def _write_stage_times(path: Path, record: list[dict], total: float) -> None:
    """stages.json: every stage's title, command, wall and CPU seconds (None: already done) of this run."""
    from zoomfeat.store import write_json_atomic

    write_json_atomic(path, {"total_seconds": round(total, 1), "stages": record})


def config_record(cfg: DemoConfig) -> dict:
    """The settings as JSON-ready values (for the page)."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(cfg).items()}


__all__ = ["DemoConfig", "FEATURE_SETS", "Stage", "stages", "run_demo", "context_response"]
