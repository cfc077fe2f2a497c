"""The whole pipeline on a synthetic cohort, through the same public commands a user runs.

Every stage is a ``zoomfeat`` command line: the demo prints it, runs it in this process through
:func:`cli.main`, and stops at the first stage that fails. A stage whose outputs exist is skipped by the
command itself (every command resumes), so rerunning the demo after an interruption continues it.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from zoomfeat.errors import ConfigError
from zoomfeat.synthetic import patient_slide_counts

# The four ABMIL runs of the comparison: (run name, feature set directory, magnification spec)
FEATURE_SETS: tuple[tuple[str, str, str], ...] = (
    ("zoomldm_20x", "zoomldm", "20x"),
    ("zoomldm_5x", "zoomldm", "5x"),
    ("zoomldm_20x+5x", "zoomldm", "20x+5x"),
    ("toy_20x", "toy", "20x"),
)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``zoomfeat demo``; the defaults finish in a few minutes on a 2-core CPU."""

    out: Path = Path("demo_out")
    slides: int = 20
    seed: int = 0
    size: int = 4096  # level-0 side of each synthetic slide (20x, 0.5 um/px)
    slides_per_patient: tuple[int, ...] = (1, 2, 3)  # cycled over patients: some patients have several slides
    train_steps: int = 200  # tiny ZoomLDM training steps
    folds: int = 5
    mil_epochs: int = 12

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
        if self.train_steps < 1 or self.mil_epochs < 1:
            raise ConfigError("--train-steps and --mil-epochs must be at least 1")


def tiny_model_config() -> Path:
    """The official-format config of the tiny ZoomLDM the demo trains (shipped with the package)."""
    return Path(str(resources.files("zoomfeat.train").joinpath("tiny_zoomldm.yaml")))


def stages(cfg: DemoConfig) -> list[tuple[str, list[str]]]:
    """The demo's command lines, in order: (title, argv without the leading ``zoomfeat``)."""
    d = cfg.out
    slides, labels = d / "slides", d / "slides" / "labels.csv"
    model_dir = d / "zoomldm"
    out: list[tuple[str, list[str]]] = [
        ("synthesise a two-class cohort (signal at 20x and 5x)",
         ["synth", "--out", slides, "--n", cfg.slides, "--size", cfg.size, "--seed", cfg.seed,
          "--slides-per-patient", ",".join(map(str, cfg.slides_per_patient))]),
        ("tile: tissue masks and aligned 20x/5x grids",
         ["tile", slides, "--out", d / "tiles", "--mags", "20x,5x", "--preview"]),
        ("prepare the ZoomLDM training set (latents + conditioning grids)",
         ["prepare-train", slides, "--out", d / "trainset", "--conditioner", "toy", "--zoomldm",
          tiny_model_config(), "--mags", "20x,10x,5x", "--max-patches-per-mag", 24, "--seed", cfg.seed]),
        ("train a tiny ZoomLDM on CPU",
         ["train", "--data", d / "trainset", "--zoomldm", tiny_model_config(), "--out", model_dir,
          "--max-steps", cfg.train_steps, "--batch-size", 8, "--lr", "1e-3", "--warmup-steps", 20,
          "--every-n-steps", cfg.train_steps, "--seed", cfg.seed, "--no-val-samples"]),
        ("extract ZoomLDM features at 20x and 5x (conditioned on the toy encoder)",
         ["extract", slides, "--tiles", d / "tiles", "--out", d / "features" / "zoomldm", "--encoder", "zoomldm",
          "--zoomldm", model_dir / "official" / "config.yaml", "--weights", model_dir / "official" / "last.ckpt",
          "--conditioner", "toy", "--toy-seed", cfg.seed, "--conditioning-out", d / "features" / "toy_conditioning",
          "--mags", "20x,5x"]),
        ("extract the toy-encoder baseline at 20x",
         ["extract", slides, "--tiles", d / "tiles", "--out", d / "features" / "toy", "--encoder", "toy",
          "--toy-seed", cfg.seed, "--mags", "20x"]),
        ("patient-level, stratified 5-fold splits",
         ["splits", "make", "--labels", labels, "--out", d / "splits", "--folds", cfg.folds, "--mode", "kfold",
          "--seed", cfg.seed]),
    ]
    for name, features, mags in FEATURE_SETS:
        out.append((f"ABMIL on {features}@{mags}",
                    ["train-mil", "--task", "custom", "--label-col", "label", "--labels", labels,
                     "--splits", d / "splits", "--features", f"{d / 'features' / features}@{mags}",
                     "--model", "abmil", "--protocol", "hipt", "--epochs", cfg.mil_epochs, "--seed", cfg.seed,
                     "--out", d / "runs" / name]))
    for name, _, _ in FEATURE_SETS:
        out.append((f"report of {name}", ["report", d / "runs" / name]))
    out.append(("comparison table (the demo's index page)",
                ["compare", *[d / "runs" / name for name, _, _ in FEATURE_SETS], "--out", d / "report",
                 "--reference", d / "runs" / "toy_20x"]))
    return [(title, [str(a) for a in argv]) for title, argv in out]


def run_demo(cfg: DemoConfig) -> int:
    """Run every stage; return 0, or the exit code of the first stage that failed."""
    import cli

    print("zoomfeat demo: a SYNTHETIC cohort and a TINY model -- the numbers show that the pipeline works, "
          "not how ZoomLDM performs on real slides.", flush=True)
    start = time.perf_counter()
    plan = stages(cfg)
    for i, (title, argv) in enumerate(plan, 1):
        print(f"\n[{i}/{len(plan)}] {title}\n$ zoomfeat {shlex.join(argv)}", flush=True)
        t0 = time.perf_counter()
        code = cli.main(argv)
        if code != 0:
            print(f"demo: stage {i} failed with exit code {code}; rerun the command above to see why",
                  file=sys.stderr)
            return code
        print(f"    done in {time.perf_counter() - t0:.0f} s", flush=True)
    index = cfg.out / "report" / "index.html"
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s: open {index}")
    return 0
