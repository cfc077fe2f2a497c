"""Label efficiency end to end (issue 17): a cohort whose class signal lives in the conditioning, a tiny ZoomLDM
trained on it in the test, real ZoomLDM features, synthetic copies from ``zoomfeat feature-copies``, ABMIL at 10% of
the training patients with and without ``--augment``, and ``zoomfeat compare``'s label-efficiency curve.

Every stage is the public command (``cli.main``): ``prepare-train`` -> ``train`` -> ``extract --encoder zoomldm``
-> ``splits make`` -> ``feature-copies`` -> ``train-mil --train-fraction F [--augment DIR]`` -> ``compare``.

The cohort: each 20x tile (256 level-0 px) is one of two tissue types, pink "normal" or purple "signal"; a slide
of class c holds a number of signal tiles drawn from ``signal_counts[c]``. The toy conditioner sees the tile's
colour, so a tile's conditioning says which type it is: a generator that follows its conditioning regenerates a
signal tile as a signal tile, and the synthetic bags keep their slide's label.

Two measurements come with every run (printed; asserted only as finite numbers here):

* the conditioning response of the trained model's features (``zoomfeat.demo.context_response``: relative
  change of the pooled block-3 features when a tile's own context is replaced by another tile's), and
* the type transfer of the synthetic copies: the mean projection of synthetic features of signal-sourced minus
  normal-sourced tiles on the real signal-minus-normal centroid direction, in units of that real distance
  (1: the copies keep the real type difference, 0: they lose it).

The CI study (30 training steps) checks the plumbing: which bags each fold trained on, that no synthetic bag is
ever evaluated, and that compare's curve is the runs' mean AUCs. The issue's claim (augmentation at 10% raises
ABMIL's mean test AUC over seeds) is ``test_augmentation_raises_mean_test_auc_at_10_percent``, an opt-in
measurement (``ZOOMFEAT_AUGMENT_CLAIM=1``, ~60 minutes on a shared 2-core machine: its generator trains for
3000 steps). In ``CLAIM_STUDY`` every tile of a slide also carries that slide's illumination ramp
(``Study.ramp``), which the toy conditioner barely sees: two real training slides per class are told apart most
easily by their ramps, copies regenerated from the conditioning keep the tile type and redraw the ramp, and
augmentation raised the mean test AUC at 10% over 20 seeds on 2026-12-02 (0.488 -> 0.579); the 2026-12-07 rerun
does not reproduce it (0.493 -> 0.504, p 0.23: its generator keeps half the type difference, so this test fails),
benchmarks/RESULTS.md, "Label efficiency with synthetic copies".
On ``OVERLAP_STUDY`` (overlapping classes, no confound) it does not (0.538 -> 0.530 over five seeds).

Issue 39 adds whole synthetic slides: ``CLAIM_STUDY`` also runs ``feature-copies --unit slide`` (generate-slide's
cascade over each real slide's layout and conditions, then extracted like the real slides) and, beside it, patch
copies of the same number per slide; the per-seed AUCs of every arm are printed as they finish (real and patch
copies first for every seed, then the slower arms seed by seed), and the slide arm is reported, not asserted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cli
from zoomfeat.store import FeatureFile

pytestmark = pytest.mark.usefixtures("one_thread")

PINK = np.array([232.0, 160.0, 196.0])
SIGNAL = np.array([96.0, 52.0, 146.0])
TILE = 256


@dataclass(frozen=True)
class Study:
    """Sizes of one end-to-end study (the CI default is the smallest that exercises every stage)."""

    slides: int = 20
    side: int = 768  # level-0 px: 3x3 tiles at 20x
    signal_counts: tuple[tuple[int, ...], tuple[int, ...]] = ((0,), (2,))  # signal tiles per slide, by class
    train_slides: int = 6  # slides whose tiles train the tiny ZoomLDM (both classes)
    train_steps: int = 30
    batch_size: int = 16
    copies: int = 2
    gen_steps: int = 2
    seeds: tuple[int, ...] = (0,)
    fractions: tuple[float, ...] = (0.1, 0.3)
    epochs: int = 10
    train_args: tuple[str, ...] = ()  # extra `zoomfeat train` options
    ramp: float = 0.0  # per-slide illumination ramp (grey levels from tile centre to edge), 0: none
    slide_copies: int = 0  # >0: also `feature-copies --unit slide` (whole synthetic slides), this many per slide,
    # and, when it differs from ``copies``, patch-unit copies of the same number (equal counts side by side)


CI_STUDY = Study()
# the first claim study (overlapping classes, no confound; augmentation did not help: RESULTS.md)
OVERLAP_STUDY = Study(slides=40, side=1024, signal_counts=((1, 2, 3, 4), (2, 3, 4, 5)), train_slides=10,
                      train_steps=300, copies=4, gen_steps=4, seeds=(0, 1, 2, 3, 4), fractions=(0.1,), epochs=20)
# the claim as measured (2026-12-02): a clean rule (0-1 vs 2-3 signal tiles) behind a per-slide illumination ramp
# the conditioning cannot see, a generator trained 3000 steps with its Summarizer frozen and gradients clipped,
# 20 seeds of the 10% draw
CLAIM_STUDY = replace(OVERLAP_STUDY, signal_counts=((0, 1), (2, 3)), ramp=40.0, train_steps=3000,
                      seeds=tuple(range(20)), train_args=("--summarizer-lr-scale", "0", "--grad-clip", "1.0"),
                      slide_copies=1)
# the slide unit's cascade on these 1024-px slides: one 5x patch, one region of 4x4 20x patches (~40 CPU s per
# synthetic slide with the 3000-step model: one copy per slide keeps the study near 40 CPU minutes)
SLIDE_UNIT_ARGS = ("--unit", "slide", "--levels", "5x,20x")


def write_cohort(root: Path, study: Study, seed: int = 0) -> tuple[Path, dict[str, list[int]]]:
    """Slides (Aperio-style SVS), ``labels.csv`` (one slide per patient, classes alternating) and the tile types
    (slide id -> 0/1 per 20x tile, row-major over the tile grid); a slide of class c holds a number of signal
    tiles drawn from ``study.signal_counts[c]``."""
    from zoomfeat.synthetic import write_pyramid

    rng = np.random.default_rng(seed)
    grid = study.side // TILE
    rows, types = [], {}
    yy, xx = (np.mgrid[0:TILE, 0:TILE] + 0.5) / TILE - 0.5
    for i in range(study.slides):
        label, slide_id = i % 2, f"case-{i:03d}"
        kinds = np.zeros(grid * grid, int)
        count = int(rng.choice(study.signal_counts[label]))
        if count:
            kinds[rng.choice(grid * grid, count, replace=False)] = 1
        ramp = 0.0
        if study.ramp:  # one direction per slide, the same in every tile (an uneven illumination of the field)
            angle = rng.uniform(0.0, 2 * np.pi)
            ramp = (2 * study.ramp * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]
        image = np.empty((study.side, study.side, 3), np.float32)
        for k, kind in enumerate(kinds):
            r, c = divmod(k, grid)
            colour = (SIGNAL if kind else PINK) + rng.normal(0.0, 8.0, 3)  # per-tile stain jitter
            grain = rng.standard_normal((TILE, TILE, 1)) * 20.0
            image[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = colour + grain + ramp
        write_pyramid(root / f"{slide_id}.svs", np.clip(image, 0, 255).astype(np.uint8))
        rows.append((slide_id, slide_id, label))
        types[slide_id] = kinds.tolist()
    pd.DataFrame(rows, columns=["case_id", "slide_id", "label"]).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv", types


def _fraction_slides(splits: Path, labels: Path, study: Study, seeds=None) -> list[str]:
    """The real slides of every (seed, fold, fraction) training subset (of ``seeds``, default the study's): the
    ones that need synthetic copies."""
    from mil.augment import training_fraction
    from splits.io import read_splits_dir

    table = pd.read_csv(labels)
    case_of, label_of = dict(zip(table.slide_id, table.case_id)), dict(zip(table.slide_id, table.label))
    need: set[str] = set()
    for seed in study.seeds if seeds is None else seeds:
        for fold in read_splits_dir(splits):
            for fraction in study.fractions:
                kept, _ = training_fraction(list(fold.part("train")), case_of, label_of, fraction, seed, fold.index)
                need.update(kept)
    return sorted(need)


def type_transfer(real_dir: Path, syn_dir: Path, types: dict[str, list[int]]) -> dict[str, float]:
    """How much of the real signal-vs-normal feature difference the synthetic copies keep (see the module text)."""
    def kind_of(slide_id, coords):  # the type of the real tile at each 20x corner (a whole-slide copy has the
        side = int(np.sqrt(len(types[slide_id])))  # real slide's layout, so the same corners mean the same tiles)
        return np.array([types[slide_id][(int(y) // TILE) * side + int(x) // TILE] for x, y in coords])

    real, kinds, real_at = {}, {}, {}
    for slide_id in types:
        with FeatureFile(real_dir / f"{slide_id}.h5") as f:
            coords, feats = f.coords("20x"), f.features("20x")
        real[slide_id] = feats
        kinds[slide_id] = kind_of(slide_id, coords)
        real_at[slide_id] = {(int(x), int(y)): row for (x, y), row in zip(coords, feats)}
    everything = np.concatenate(list(real.values()))
    labels = np.concatenate(list(kinds.values()))
    mu0, mu1 = everything[labels == 0].mean(0), everything[labels == 1].mean(0)
    direction = (mu1 - mu0) / float(np.sum((mu1 - mu0) ** 2))
    probes = {0: [], 1: []}
    distance, spread = [], []
    for path in sorted(syn_dir.glob("*~syn*.h5")):
        source = path.stem.split("~syn")[0]
        with FeatureFile(path) as f:
            coords, syn = f.coords("20x"), f.features("20x")
        syn_kinds = kind_of(source, coords)
        for kind in (0, 1):
            probes[kind].extend(((syn - mu0) @ direction)[syn_kinds == kind])
        pairs = [(row, real_at[source][(int(x), int(y))]) for (x, y), row in zip(coords, syn)
                 if (int(x), int(y)) in real_at[source]]
        distance.append(np.array([np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in pairs]))
    normal = everything[labels == 0]
    spread = np.linalg.norm(normal - mu0, axis=1) / np.linalg.norm(normal, axis=1)
    return {"transfer": float(np.mean(probes[1]) - np.mean(probes[0])),
            "probe_normal_sourced": float(np.mean(probes[0])), "probe_signal_sourced": float(np.mean(probes[1])),
            "syn_to_source_relative": float(np.mean(np.concatenate(distance))),
            "real_normal_spread_relative": float(spread.mean())}


def _mil_argv(root: Path, labels: Path, seed: int, fraction: float, epochs: int, augment: Path | None) -> list[str]:
    name = f"f{fraction:g}_s{seed}" + (f"_{augment.name}" if augment else "")
    argv = ["train-mil", "--task", "custom", "--label-col", "label", "--labels", str(labels),
            "--splits", str(root / "splits"), "--features", f"{root / 'features' / 'zoomldm'}@20x",
            "--model", "abmil", "--epochs", str(epochs), "--seed", str(seed), "--train-fraction", f"{fraction:g}",
            "--out", str(root / "runs" / name)]
    return argv + (["--augment", str(augment)] if augment else [])


def run_study(root: Path, study: Study) -> dict:
    """Every stage through the CLI; returns the runs, AUCs per (seed, fraction, augmented) and measurements."""
    import time

    from zoomfeat.demo import context_response

    times = {}

    def timed(name, argv):
        start = time.perf_counter()
        assert cli.main([str(a) for a in argv]) == 0, name
        times[name] = round(time.perf_counter() - start, 1)
        print(f"stage {name}: {times[name]} s", flush=True)

    slides = root / "slides"
    slides.mkdir(parents=True)
    labels, types = write_cohort(slides, study)
    from zoomfeat.train import TINY_ZOOMLDM_YAML as config
    tissue = ["--saturation-threshold", "15"]  # every tile is tissue (no background in these slides)
    train = [slides / f"case-{i:03d}.svs" for i in range(study.train_slides)]
    timed("prepare-train", ["prepare-train", *train, "--out", root / "trainset", "--conditioner", "toy",
                            "--zoomldm", config, "--mags", "20x", "--batch-size", 16, *tissue])
    timed("train", ["train", "--data", root / "trainset", "--zoomldm", config, "--out", root / "zoomldm",
                    "--max-steps", study.train_steps, "--batch-size", study.batch_size, "--lr", 2e-3,
                    "--warmup-steps", 20,
                    "--every-n-steps", study.train_steps, "--seed", 0, "--workers", 0, "--no-val-samples",
                    *study.train_args])
    official = root / "zoomldm" / "official"
    model = ["--zoomldm", official / "config.yaml", "--weights", official / "last.ckpt"]
    response = context_response(official / "config.yaml", official / "last.ckpt", root / "trainset", (50,),
                                root / "context_response.json")
    timed("extract", ["extract", slides, "--out", root / "features" / "zoomldm", "--encoder", "zoomldm", *model,
                      "--conditioner", "toy", "--conditioning-out", root / "features" / "toy", "--mags", "20x",
                      "--device", "cpu", "--workers", 0, "--batch-size", 32, *tissue])
    timed("splits", ["splits", "make", "--labels", labels, "--out", root / "splits", "--folds", 5,
                     "--mode", "kfold", "--seed", 0])
    syn, syn_slide = root / "synthetic", root / "synthetic_slide"
    syn_patch_n = root / f"synthetic_patch{study.slide_copies}"
    copies = ["--features", root / "features" / "zoomldm", "--conditioning", root / "features" / "toy", *model,
              "--steps", study.gen_steps, "--device", "cpu"]
    needed = _fraction_slides(root / "splits", labels, study)
    timed("feature-copies", ["feature-copies", *needed, *copies, "--copies", study.copies, "--out", syn,
                             "--batch-size", 64])
    print(f"context response {json.dumps(response['by_mag'])}; type transfer "
          f"{json.dumps(type_transfer(root / 'features' / 'zoomldm', syn, types))}", flush=True)
    arms = {False: None, True: syn}
    if study.slide_copies:
        if study.slide_copies != study.copies:
            timed(f"feature-copies x{study.slide_copies}", ["feature-copies", *needed, *copies, "--copies",
                                                           study.slide_copies, "--out", syn_patch_n,
                                                           "--batch-size", 64])
            arms["patch_n"] = syn_patch_n
        arms["slide"] = syn_slide
    runs, aucs = {}, {}
    # every seed of the real and patch-copy arms first, then seed by seed the arms whose copies take longer to make
    for seed, group in [(s, (False, True)) for s in study.seeds] + [(s, tuple(arms)[2:]) for s in study.seeds]:
        if "slide" in group:  # this seed's slides (resumable: the copies of earlier seeds are skipped)
            timed(f"feature-copies --unit slide s{seed}", ["feature-copies", *SLIDE_UNIT_ARGS, *_fraction_slides(
                root / "splits", labels, study, [seed]), *copies, "--copies", study.slide_copies, "--out",
                syn_slide, "--batch-size", 16])
            so_far = type_transfer(root / "features" / "zoomldm", syn_slide, types)
            print(f"type transfer (slide unit, so far) {json.dumps(so_far)}", flush=True)
        for fraction in study.fractions:
            for arm, augment in ((a, arms[a]) for a in group):
                argv = _mil_argv(root, labels, seed, fraction, study.epochs, augment)
                timed(f"train-mil s{seed} f{fraction:g}{' +' + augment.name if augment else ''}", argv)
                out = Path(argv[argv.index("--out") + 1])
                summary = pd.read_csv(out / "summary.csv", dtype={"seed": str, "fold": str})
                key = (seed, fraction, arm)
                mean = summary[(summary.seed == "mean") & (summary.fold == "mean")].test_auc.iloc[0]
                runs[key], aucs[key] = out, float(mean)
                print(f"AUC seed {seed} fraction {fraction:g} arm {arm}: {float(mean):.4f}", flush=True)
    result = {"runs": runs, "aucs": aucs, "labels": labels, "types": types, "syn": syn, "times": times,
              "context_response": response, "transfer": type_transfer(root / "features" / "zoomldm", syn, types)}
    if study.slide_copies:
        result["syn_slide"] = syn_slide
        result["transfer_slide"] = type_transfer(root / "features" / "zoomldm", syn_slide, types)
    return result


def _report(result: dict, study: Study) -> str:
    lines = [f"study {study}", f"stage seconds {json.dumps(result['times'])}",
             f"context response {json.dumps(result['context_response']['by_mag'])}",
             f"type transfer {json.dumps(result['transfer'])}"]
    if "transfer_slide" in result:
        lines.append(f"type transfer (slide unit) {json.dumps(result['transfer_slide'])}")
    for seed in study.seeds:
        for fraction in study.fractions:
            more = "".join(f" +{arm} {result['aucs'][(seed, fraction, arm)]:.3f}" for arm in ("patch_n", "slide")
                           if (seed, fraction, arm) in result["aucs"])
            lines.append(f"seed {seed} fraction {fraction:g}: real {result['aucs'][(seed, fraction, False)]:.3f} "
                         f"+syn {result['aucs'][(seed, fraction, True)]:.3f}{more}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    result = run_study(tmp_path_factory.mktemp("label_efficiency"), CI_STUDY)
    print(_report(result, CI_STUDY))
    return result


@pytest.mark.slow
def test_synthetic_copies_of_the_real_pipeline_join_only_training_folds(study):
    from splits.io import read_splits_dir

    copies = sorted(p.stem for p in study["syn"].glob("*.h5"))
    assert copies and all("~syn" in s for s in copies)
    labels = pd.read_csv(study["labels"])
    splits = {f.index: f for f in read_splits_dir(Path(study["labels"]).parents[1] / "splits")}
    for (seed, fraction, augmented), run in study["runs"].items():
        for fold, split in splits.items():
            metrics = json.loads((run / f"fold_{fold}" / "metrics.json").read_text())
            aug = metrics["augmentation"]
            train = labels[labels.slide_id.isin(split.part("train"))]
            per_class = train.groupby("label").case_id.nunique()
            # stratified, whole patients (one slide per patient here)
            assert aug["train_real"] == sum(max(1, round(fraction * n)) for n in per_class)
            assert aug["synthetic_added"] == (CI_STUDY.copies * aug["train_real"] if augmented else 0)
            predicted = pd.read_csv(run / f"fold_{fold}" / "predictions.csv")
            assert not predicted.slide_id.str.contains("~syn").any()
            assert set(predicted.slide_id) <= set(split.part("val")) | set(split.part("test"))
    for value in study["aucs"].values():
        assert 0.0 <= value <= 1.0


@pytest.mark.slow
def test_measurements_are_finite(study):
    def numbers(tree):
        return [x for v in tree.values() for x in numbers(v)] if isinstance(tree, dict) else [tree]

    response = numbers(study["context_response"]["by_mag"])
    assert response and all(np.isfinite(v) for v in response)
    assert all(np.isfinite(v) for v in study["transfer"].values())


@pytest.mark.slow
def test_compare_shows_the_label_efficiency_curve_real_vs_synthetic(study, tmp_path):
    runs = [str(study["runs"][(0, f, a)]) for f in CI_STUDY.fractions for a in (False, True)]
    reference = str(study["runs"][(0, CI_STUDY.fractions[-1], False)])
    assert cli.main(["compare", *runs, "--out", str(tmp_path / "cmp"), "--reference", reference]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    curves = result["fraction_curves"]["custom"]
    assert set(curves) == {"zoomldm@20x", "zoomldm@20x +syn"}
    for series, aug in (("zoomldm@20x", False), ("zoomldm@20x +syn", True)):
        assert sorted(float(f) for f in curves[series]) == list(CI_STUDY.fractions)
        for fraction, mean_auc in curves[series].items():  # the curve's points are the runs' mean test AUCs
            assert mean_auc == pytest.approx(study["aucs"][(0, float(fraction), aug)], abs=1e-9)
    assert (tmp_path / "cmp" / "fraction_auc_custom.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ZOOMFEAT_AUGMENT_CLAIM") != "1",
                    reason="issue 17's claim (augmentation at 10% raises mean test AUC over seeds) trains its "
                           "generator for 3000 steps (~60 minutes with the slide arm, measured in "
                           "benchmarks/RESULTS.md); run with ZOOMFEAT_AUGMENT_CLAIM=1")
def test_augmentation_raises_mean_test_auc_at_10_percent(tmp_path):
    from scipy.stats import wilcoxon

    result = run_study(tmp_path, CLAIM_STUDY)
    print(_report(result, CLAIM_STUDY))
    real = np.array([result["aucs"][(s, 0.1, False)] for s in CLAIM_STUDY.seeds])
    synthetic = np.array([result["aucs"][(s, 0.1, True)] for s in CLAIM_STUDY.seeds])
    # a gain beyond the seed-to-seed noise: the paired per-seed differences, one-sided Wilcoxon signed-rank
    test = wilcoxon(synthetic, real, alternative="greater")
    n = CLAIM_STUDY.slide_copies
    if n:  # whole synthetic slides beside the per-patch copies: reported, not asserted
        arms = [(f"+{CLAIM_STUDY.copies} patch copies", synthetic)]
        arms += [(f"+{n} {unit} copies", np.array([result["aucs"][(s, 0.1, arm)] for s in CLAIM_STUDY.seeds]))
                 for unit, arm in (("patch", "patch_n"), ("slide", "slide")) if (0, 0.1, arm) in result["aucs"]]
        for name, arm in arms:
            diff = arm - real
            print(f"{name}: mean {arm.mean():.3f} vs real {real.mean():.3f}, paired difference {diff.mean():+.3f} "
                  f"(SE {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}), {int((diff > 0).sum())} of {len(diff)} seeds "
                  f"up, one-sided Wilcoxon p {wilcoxon(arm, real, alternative='greater').pvalue:.3g}")
    assert synthetic.mean() > real.mean() and test.pvalue < 0.05, (
        f"mean test AUC at 10% over {len(real)} seeds: real {real.mean():.3f}, +syn {synthetic.mean():.3f}, "
        f"one-sided Wilcoxon p {test.pvalue:.3g}")
