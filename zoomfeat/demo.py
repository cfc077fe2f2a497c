"""The whole toolkit on a synthetic cohort, through the same public commands a user runs.

Every stage is a ``zoomfeat`` command line: the demo prints it, runs it in this process through
:func:`cli.main`, times it, and stops at the first stage that fails. The cohort (``synth --kind
arrangement``) carries a purely multi-scale class signal: two tissue types per 20x tile in the same
proportions in both classes, clustered in one class and intermixed in the other, so a bag of single 20x
tiles cannot separate the classes and a 5x view (4x4 tiles) can. Three steps are measurements with no command
of their own (writing the 5x input image of ``superres``, how much the trained model's features move with their
conditioning, how much generated patches resemble real ones); each is printed as ``zoomfeat demo ... --stage K``,
the command that reruns just that stage.

A stage whose outputs exist is skipped (the analysis commands resume by themselves; the generation commands,
which want a new folder, are skipped when their manifest exists), so rerunning after an interruption continues.
``--quick`` (:data:`QUICK`) is the smallest cohort and the fewest steps that still run every stage.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zoomfeat.demo_page import write_index
from zoomfeat.errors import ConfigError
from zoomfeat.log import quiet_third_party
from zoomfeat.mags import MAGNIFICATIONS, Magnification, mag_name, parse_mag
from zoomfeat.slides import Slide
from zoomfeat.store import atomic_write, slide_tile_grid, write_json_atomic
from zoomfeat.synthetic import ARRANGEMENT_TILE, patient_slide_counts

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
    first_stage_steps: int = 120  # fitting steps of the first-stage encoder (zoomfeat fit-first-stage)
    decoder_steps: int = 200  # fitting steps of its decoder: decoded samples show the cohort's colours
    first_stage_batch: int = 16  # patches per fitting step
    folds: int = 5
    mil_epochs: int = 20
    generation: bool = True  # the generation wing (sample, generate-large, superres)
    gen_steps: int = 10
    cdm_steps: int = 300  # training steps of the generation wing's tiny CDM
    resemblance_images: int = 16  # generated patches per magnification in the resemblance measurement
    rerun: tuple[str, ...] = field(default=("demo",), compare=False)  # the demo's own command (for --stage K)

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
        if self.first_stage_steps < 1 or self.decoder_steps < 0:
            raise ConfigError(f"--first-stage-steps {self.first_stage_steps} must be at least 1 and "
                              f"--decoder-steps {self.decoder_steps} at least 0")
        if self.resemblance_images < 2:
            raise ConfigError(f"--resemblance-images {self.resemblance_images} must be at least 2")


# ``zoomfeat demo --quick``: the smallest cohort (12 slides of 6 patients: 3 folds, one patient of each class per
# test fold) and the fewest steps that still run every stage; its numbers mean nothing, it shows the stages, their
# outputs and the page (183 CPU seconds, benchmarks/RESULTS.md).
QUICK: dict = {"slides": 12, "size": 2048, "folds": 3, "train_slides": 4, "patches_per_mag": 12,
               "train_steps": 40, "first_stage_steps": 30, "decoder_steps": 40, "first_stage_batch": 8,
               "mil_epochs": 4, "gen_steps": 4, "cdm_steps": 20, "resemblance_images": 8}


@dataclass
class Stage:
    """One step of the demo: a ``zoomfeat`` command (``argv``) or a measurement in Python (``python``).

    ``argv`` may be a callable when it depends on what an earlier stage wrote (e.g. the test slides of fold 0);
    ``done`` is a file whose existence means the stage has already run (generation commands want a new folder).
    """

    title: str
    argv: list | Callable[[], list] | None = None
    python: Callable[[], None] | None = None
    python_name: str = ""
    done: Path | None = None
    group: str = "analysis"

    def command(self) -> list[str]:
        argv = self.argv() if callable(self.argv) else self.argv
        return [shown_path(a) if isinstance(a, Path) else str(a) for a in argv or []]


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it (what the demo prints and runs)."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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

    with openslide.OpenSlide(str(slide)) as s:
        region = s.read_region((x, y), 0, (1024, 1024)).convert("RGB")
    image = region.resize((side, side), Image.Resampling.BOX)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_png) as tmp:
        Image.fromarray(np.asarray(image)).save(tmp, format="PNG")


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


# ----- how much generated patches resemble real ones -----------------------------------------------------------
def _real_patches(slides: list[Path], tiles_dir: Path, mag: Magnification, limit: int, seed: int):
    """uint8 [N, 3, 256, 256]: up to ``limit`` tissue patches at ``mag`` over ``slides``, a seeded subset."""
    import numpy as np
    import torch

    from zoomfeat.patches import TilePatchDataset

    rows = []
    for path in slides:
        with Slide(path) as slide:
            coords = np.asarray(slide_tile_grid(slide, [mag], tiles_dir=tiles_dir).coords[mag], np.int64)
        rows += [(path, xy) for xy in coords.reshape(-1, 2)]
    picked = np.random.default_rng([seed, 38]).permutation(len(rows))[:limit]
    pixels = []
    for path in sorted({rows[k][0] for k in picked}):
        coords = np.asarray([rows[k][1] for k in picked if rows[k][0] == path], np.int64)
        data = TilePatchDataset(path, coords, mag)
        try:
            pixels += [data[i][1] for i in range(len(data))]
        finally:
            data.close()
    return torch.stack(pixels)


def generation_resemblance(config: Path, weights: Path, sample_dirs: dict[str, list[Path]], slides: list[Path],
                           tiles_dir: Path, out_json: Path, *, images_per_mag: int, seed: int) -> dict:
    """How much generated patches resemble real ones: the Frechet distance between the toy encoder's features of
    real tissue patches and of patches the demo's model generates from the conditions of ``sample_dirs`` (per
    magnification: the ``sample`` output folders), decoded by its fitted decoder and, from the same latents, by the
    random first stage it started from (what the demo's decoder was before it was fitted); and, as the floor at
    this sample size, the same distance between two disjoint sets of real patches. Every distance is between two
    sets of ``images_per_mag`` patches (the distance's bias depends on the set sizes). The toy encoder (random,
    seeded) is read at a width below the number of images so that the covariances have full rank."""
    import numpy as np
    import torch

    from zoomfeat.encoders import load_encoder
    from zoomfeat.generate.conditions import conditions_from_saved
    from zoomfeat.generate.decode import decode_patches
    from zoomfeat.generate.guidance import Guidance
    from zoomfeat.generate.manifest import load_conditions, read_manifest
    from zoomfeat.generate.metrics.fid import feature_stats, frechet_distance
    from zoomfeat.generate.samplers import SamplerSettings, sample_patches
    from zoomfeat.model import build_zoomldm, load_zoomldm

    model = load_zoomldm(config, weights, use_ema=True).eval()
    torch.manual_seed(seed)  # the initial weights fit-first-stage started from (its --seed)
    random_first_stage = build_zoomldm(config).eval()
    dim = min(16, images_per_mag - 1)
    toy = load_encoder("toy", dim=dim, seed=seed).eval()

    def features(images_nchw) -> np.ndarray:
        with torch.no_grad():
            return toy(toy.preprocess(images_nchw)).double().numpy()

    def distance(a, b, what: str) -> float:
        return frechet_distance(feature_stats(a, what), feature_stats(b, what))

    result: dict = {"encoder": f"toy (dim {dim}, seed {seed})", "by_mag": {}}
    for mag, folders in sample_dirs.items():
        contexts, settings = [], None
        for folder in folders:
            man = read_manifest(folder)
            saved = load_conditions(folder / man["conditions"]["file"])
            contexts.append(conditions_from_saved(model, saved["grids"], saved["mag"], saved["coords_level0"]).contexts)
            s = man["sampling"]
            settings = SamplerSettings(s["sampler"], s["steps"], Guidance(s["guidance"], s["guidance_form"]))
        contexts = torch.cat(contexts)
        per = -(-images_per_mag // len(contexts))
        contexts = contexts.repeat_interleave(per, dim=0)[:images_per_mag]
        with torch.no_grad():
            latents = sample_patches(model, contexts, [seed * 100_000 + k for k in range(len(contexts))], settings)
            fitted = torch.from_numpy(decode_patches(model, latents)).permute(0, 3, 1, 2)
            randomly = torch.from_numpy(decode_patches(random_first_stage, latents)).permute(0, 3, 1, 2)
        n = len(contexts)
        real = _real_patches(slides, tiles_dir, parse_mag(mag), 2 * n, seed)
        if len(real) < 2 * n:
            raise ConfigError(f"only {len(real)} real {mag} patches for {n} generated ones: lower "
                              "--resemblance-images")
        f_real, f_fit, f_rand = features(real), features(fitted), features(randomly)
        result["by_mag"][mag] = {
            "images": n, "sampler": settings.sampler, "steps": settings.steps,
            "fd_fitted_decoder": distance(f_real[:n], f_fit, f"real vs generated {mag} patches"),
            "fd_random_decoder": distance(f_real[:n], f_rand, f"real vs random-decoder {mag} patches"),
            "fd_real_vs_real": distance(f_real[:n], f_real[n:], f"two sets of real {mag} patches"),
        }
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
    official = d / "zoomldm" / "official"
    out.append(Stage("measure how much generated patches resemble real ones (Frechet distance of toy-encoder "
                     "features; the fitted decoder against the random one it started from)", group="generation",
                     python=lambda: generation_resemblance(
                         official / "config.yaml", official / "last.ckpt",
                         {mag: [g / f"sample_{mag}_clustered", g / f"sample_{mag}_intermixed"] for mag in ("20x", "5x")},
                         sorted(slides.glob("*.svs")), d / "tiles", g / "resemblance.json",
                         images_per_mag=cfg.resemblance_images, seed=cfg.seed),
                     python_name="zoomfeat.demo.generation_resemblance", done=g / "resemblance.json"))
    for method in ("grid", "joint"):
        extra = ["--joint-iterations", 1] if method == "joint" else []
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
                                   "--joint-iterations", 1, "--inversion-steps", 30, "--seed", cfg.seed,
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
    model_args = _model_args(cfg)
    plan = [
        Stage("synthesise a two-class cohort whose signal is the 5x arrangement of tissue types",
              ["synth", "--kind", "arrangement", "--out", slides, "--n", cfg.slides, "--size", cfg.size,
               "--seed", cfg.seed, "--slides-per-patient", ",".join(map(str, cfg.slides_per_patient)),
               "--cluster", cfg.cluster, "--tile-signal", cfg.tile_signal],
              done=labels),
        Stage("tile: tissue masks and aligned 20x/5x grids",
              ["tile", slides, "--out", d / "tiles", "--mags", "20x,5x", "--preview"]),
        Stage(f"fit the first stage to {cfg.train_slides} slides' patches: encoder to their 4x4 mean colour "
              f"({cfg.first_stage_steps} steps), codebook and decoder to reconstruct them ({cfg.decoder_steps} steps)",
              lambda: ["fit-first-stage", *training_slides(slides, cfg.train_slides), "--tiles", d / "tiles",
                       "--zoomldm", "tiny", "--steps", cfg.first_stage_steps, "--decoder-steps", cfg.decoder_steps,
                       "--per-mag", cfg.patches_per_mag, "--batch-size", cfg.first_stage_batch, "--seed", cfg.seed,
                       "--out", init],
              done=init),
        Stage(f"prepare the ZoomLDM training set from {cfg.train_slides} slides (latents + conditioning grids)",
              lambda: ["prepare-train", *training_slides(slides, cfg.train_slides), "--out", d / "trainset",
                       "--conditioner", "toy", "--zoomldm", "tiny", "--weights", init, "--mags", "20x,5x",
                       "--max-patches-per-mag", cfg.patches_per_mag, "--seed", cfg.seed]),
        Stage("train a tiny ZoomLDM on CPU" + (" (U-Net only; the Summarizer stays at its initialisation)"
                                              if cfg.summarizer_lr_scale == 0 else ""),
              ["train", "--data", d / "trainset", "--zoomldm", "tiny", "--init-from", init, "--out", model_dir,
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
HEARTBEAT_SECONDS = 10.0  # a stage that has printed nothing for this long gets a "still running" line


class _Watched:
    """A text stream that remembers when it was last written to (everything else goes to the stream)."""

    def __init__(self, stream, watch: dict):
        self._stream, self._watch = stream, watch

    def write(self, text: str) -> int:
        self._watch["last"] = time.monotonic()
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _run_stage(stage: Stage, k: int) -> int:
    """Run one stage in this process; while it prints nothing, print a line every HEARTBEAT_SECONDS."""
    import threading

    import cli

    out, err = sys.stdout, sys.stderr
    watch = {"last": time.monotonic(), "start": time.monotonic()}
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(0.5):
            now = time.monotonic()
            if now - watch["last"] >= HEARTBEAT_SECONDS:
                watch["last"] = now
                out.write(f"    stage {k} still running ({now - watch['start']:.0f} s)\n")
                out.flush()

    sys.stdout, sys.stderr = _Watched(out, watch), _Watched(err, watch)
    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        if stage.python is not None:
            stage.python()
            return 0
        return cli.main(stage.command())
    finally:
        done.set()
        beat.join()
        sys.stdout, sys.stderr = out, err


def shown_command(cfg: DemoConfig, stage: Stage, k: int) -> str:
    """The command line that runs stage ``k`` on its own: the stage's ``zoomfeat`` command, or for a Python
    measurement the demo's own command with ``--stage k``."""
    if stage.python is not None:
        return f"$ zoomfeat {shlex.join([*cfg.rerun, '--stage', str(k)])}    # {stage.python_name}"
    return f"$ zoomfeat {shlex.join(stage.command())}"


def _run_and_record(cfg: DemoConfig, plan: list[Stage], i: int, stage: Stage, record: list[dict],
                    only_stage: int | None) -> int:
    """Print, run and time stage ``i`` (skipped when done, unless it is ``only_stage``); its exit code."""
    shown = shown_command(cfg, stage, i)
    print(f"\n[{i}/{len(plan)}] {stage.title}\n{shown}", flush=True)
    if only_stage is None and stage.done is not None and stage.done.exists():
        print("    already done", flush=True)
        record.append({"title": stage.title, "command": shown, "seconds": None, "group": stage.group})
        return 0
    t0, c0 = time.perf_counter(), time.process_time()
    code = _run_stage(stage, i)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if code not in (0, 130):
        print(f"demo: stage {i} failed with exit code {code}; rerun the command above to see why", file=sys.stderr)
    if code == 0:
        record.append({"title": stage.title, "command": shown, "seconds": round(seconds, 1),
                       "cpu_seconds": round(cpu, 1), "group": stage.group})
        print(f"    done in {seconds:.0f} s", flush=True)
    return code


def run_demo(cfg: DemoConfig, only_stage: int | None = None) -> int:
    """Run every stage (or only stage ``only_stage``, done or not); write the index page; return 0, 130 when
    interrupted, or the exit code of the first stage that failed."""
    quiet_third_party()
    plan = stages(cfg)
    if only_stage is not None and not 1 <= only_stage <= len(plan):
        raise ConfigError(f"--stage {only_stage}: the demo has stages 1 to {len(plan)}")
    print("zoomfeat demo: a SYNTHETIC cohort and a TINY model -- the numbers show what the pipeline measures, "
          "not how ZoomLDM performs on real slides.", flush=True)
    start = time.perf_counter()
    record: list[dict] = []
    current = 0
    try:
        for current, stage in enumerate(plan, 1):
            if only_stage is None or current == only_stage:
                code = _run_and_record(cfg, plan, current, stage, record, only_stage)
                if code != 0:
                    break
        else:
            code = 0
    except KeyboardInterrupt:
        code = 130
    if code == 130:
        print(f"demo: interrupted at stage {current}; rerun the same command to resume", file=sys.stderr, flush=True)
    if code != 0:
        return code
    if only_stage is not None:
        return 0
    total = time.perf_counter() - start
    _write_stage_times(cfg.out / "stages.json", record, total)
    index = write_index(cfg, record, total, page_inputs(cfg))
    print(f"\ndemo finished in {total:.0f} s: open {shown_path(index)}")
    return 0


def page_inputs(cfg: DemoConfig) -> dict:
    """What the index page needs from the demo (the page does not import this module)."""
    return {"labels": read_labels(cfg.out / "slides" / "labels.csv"), "feature_sets": FEATURE_SETS,
            "fused_run": FUSED_RUN, "settings": config_record(cfg)}


def _write_stage_times(path: Path, record: list[dict], total: float) -> None:
    """stages.json: every stage's title, command, wall and CPU seconds (None: already done) of this run."""
    write_json_atomic(path, {"total_seconds": round(total, 1), "stages": record})


def config_record(cfg: DemoConfig) -> dict:
    """The settings as JSON-ready values (for the page)."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(cfg).items() if k != "rerun"}


__all__ = ["DemoConfig", "FEATURE_SETS", "QUICK", "Stage", "stages", "run_demo", "context_response",
           "generation_resemblance"]
