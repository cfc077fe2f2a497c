"""``zoomfeat heatmap``: a tiny ABMIL trained by ``train-mil`` on feature-planted bags attends the signal tiles.

One real synthetic slide (OpenSlide) gives the tile grid (``make_grid``) and the signal boxes. Features are
planted at the feature level: tiles of the signal get a shifted mean, others pure noise. Training slides reuse
the grid with a random 2x2 block of signal tiles (label 1) or none (label 0). The run built here is also the
"real train-mil run" of tests/test_report.py and tests/test_compare.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cli
from zoomfeat.mags import PATCH_SIZE

DIM = 8
N_TRAIN = 16
SLIDE_SIZE = 3072


def _in_boxes(coords: np.ndarray, tile: int, boxes) -> np.ndarray:
    """bool [N]: at least half of the tile's area lies in one of the boxes (x0, y0, x1, y1), level-0 px."""
    inside = np.zeros(len(coords), bool)
    for x0, y0, x1, y1 in boxes:
        w = np.clip(np.minimum(coords[:, 0] + tile, x1) - np.maximum(coords[:, 0], x0), 0, None)
        h = np.clip(np.minimum(coords[:, 1] + tile, y1) - np.maximum(coords[:, 1], y0), 0, None)
        inside |= w * h >= tile * tile / 2
    return inside


def _write_bag(feature_dir: Path, info, grid, signal: np.ndarray, rng) -> None:
    from zoomfeat.store import TileStoreWriter, h5_path

    feats = rng.normal(0.0, 1.0, (len(signal), DIM)).astype(np.float32)
    feats[signal, :3] += 2.5
    with TileStoreWriter(h5_path(feature_dir, info.slide_id), info, grid, extractor="planted",
                         extractor_config={"rule": "signal tiles: +2.5 on dims 0-2, N(0,1) noise"},
                         feature_dim=DIM) as writer:
        writer.write_features("20x", 0, feats)
        writer.commit()


def _random_block(coords: np.ndarray, rng) -> np.ndarray:
    """bool [N]: a 2x2 block of lattice tiles around a random tile (fewer at the tissue edge)."""
    x, y = coords[rng.integers(len(coords))]
    return ((coords[:, 0] >= x) & (coords[:, 0] <= x + PATCH_SIZE)
            & (coords[:, 1] >= y) & (coords[:, 1] <= y + PATCH_SIZE))


def _write_splits(directory: Path, ids: list[str], n_folds: int = 2) -> None:
    directory.mkdir(parents=True)
    for k in range(n_folds):
        test = ids[4 * k:4 * k + 4]
        val = ids[4 * ((k + 1) % n_folds):4 * ((k + 1) % n_folds) + 2]
        train = [s for s in ids if s not in test and s not in val]
        cols = {"train": train, "val": val, "test": test}
        n = max(map(len, cols.values()))
        pd.DataFrame({c: v + [""] * (n - len(v)) for c, v in cols.items()}).to_csv(
            directory / f"splits_{k}.csv", index=False)


@functools.lru_cache(maxsize=None)
def build_cohort(base: Path) -> dict:
    """The slide, feature folder, labels and splits (once per test session)."""
    from zoomfeat.slides import Slide
    from zoomfeat.synthetic import write_synthetic_slide
    from zoomfeat.tiling import make_grid

    root = base / "mil_cohort"
    rng = np.random.default_rng(0)
    info = write_synthetic_slide(root / "target.svs", size=SLIDE_SIZE, label=1, seed=5, n_signal_boxes=1)
    with Slide(info.path) as slide:
        grid = make_grid(slide, [20.0])
        slide_info = slide.info
    coords = grid.coords["20x"]
    feature_dir = root / "features"
    signal = _in_boxes(coords, PATCH_SIZE, info.signal_boxes_level0)
    _write_bag(feature_dir, slide_info, grid, signal, rng)
    ids = [f"train-{i:02d}" for i in range(N_TRAIN)]
    for i, slide_id in enumerate(ids):
        planted = _random_block(coords, rng) if i % 2 else np.zeros(len(coords), bool)
        _write_bag(feature_dir, dataclasses.replace(slide_info, slide_id=slide_id), grid, planted, rng)
    pd.DataFrame({"case_id": [f"case-{s}" for s in ids], "slide_id": ids, "label": [i % 2 for i in range(N_TRAIN)]}
                 ).to_csv(root / "labels.csv", index=False)
    _write_splits(root / "splits", ids)
    return {"root": root, "slide": info.path, "features": feature_dir, "signal": signal, "coords": coords,
            "boxes": info.signal_boxes_level0}


def train_run(cohort: dict, out: Path, model: str = "abmil", seed: int = 0, epochs: int = 12,
              folds: tuple[str, ...] = (), seeds: str | None = None) -> Path:
    """A real cross-validation run (2 folds) on the planted cohort, through ``zoomfeat train-mil``; ``seeds``
    (``"0,1"``) runs it once per seed instead of once with ``seed``."""
    features, root = f"{cohort['features']}@20x", cohort["root"]
    argv = ["train-mil", "--features", features, "--labels", str(root / "labels.csv"), "--splits",
            str(root / "splits"), "--task", "custom", "--model", model, "--protocol", "hipt", "--epochs", str(epochs),
            "--lr", "5e-3", "--model-kwargs", json.dumps(_MODEL_KWARGS[model]),
            *(["--seeds", seeds] if seeds else ["--seed", str(seed)]), "--out", str(out), *folds]
    assert cli.main(argv) == 0
    return out


_MODEL_KWARGS = {"abmil": {"hidden": 32, "attn_dim": 16, "dropout": 0.0}, "mean": {"hidden": 32, "dropout": 0.0},
                 "transmil": {"dim": 16, "heads": 2}, "dtfd": {"dim": 16, "attn_dim": 8}}


@functools.lru_cache(maxsize=None)
def real_runs(base: Path) -> tuple[Path, Path]:
    """Two real runs on the same splits: ABMIL and mean pooling (once per test session)."""
    cohort = build_cohort(base)
    return (train_run(cohort, base / "runs" / "abmil", "abmil"), train_run(cohort, base / "runs" / "mean", "mean"))


@pytest.fixture
def cohort(tmp_path_factory):
    return build_cohort(tmp_path_factory.getbasetemp())


@pytest.fixture
def runs(tmp_path_factory):
    return real_runs(tmp_path_factory.getbasetemp())


def test_attention_lands_on_the_planted_signal(cohort, runs):
    from mil.heatmap import attention_map

    _, coords, attention = attention_map(runs[0], 0, cohort["slide"], f"{cohort['features']}@20x")
    np.testing.assert_array_equal(coords, cohort["coords"])
    signal = cohort["signal"]
    chance = signal.mean()
    assert 0 < chance < 0.5
    k = max(1, int(signal.sum()) // 2)
    top = np.argsort(-attention)[:k]
    hit_rate = signal[top].mean()
    assert hit_rate >= 0.9 and hit_rate > 2 * chance
    assert attention[signal].mean() > 3 * attention[~signal].mean()


@pytest.mark.parametrize("model", ["transmil", "dtfd"])
def test_heatmaps_of_the_heads_without_a_softmax_over_the_bag(cohort, tmp_path, model):
    """TransMIL (the class token's attention row) and DTFD (tier-1 x tier-2 weights) give a map too: one finite
    value per tile, and DTFD's weights sum to 1 over the bag."""
    from mil.heatmap import attention_map

    run = train_run(cohort, tmp_path / model, model, epochs=1, folds=("--folds", "0"))
    _, coords, attention = attention_map(run, 0, cohort["slide"], f"{cohort['features']}@20x")
    np.testing.assert_array_equal(coords, cohort["coords"])
    assert attention.shape == (len(coords),) and np.isfinite(attention).all() and attention.std() > 0
    if model == "dtfd":
        assert attention.sum() == pytest.approx(1.0, abs=1e-5)
    out = tmp_path / f"{model}.png"
    assert cli.main(["heatmap", "--run", str(run), "--fold", "0", "--slide", str(cohort["slide"]), "--features",
                     f"{cohort['features']}@20x", "--out", str(out)]) == 0 and out.is_file()


def test_heatmap_of_a_multi_seed_run_draws_the_chosen_seed(cohort, tmp_path, capsys, one_thread):
    """``--seed S`` draws the fold model of seed S: seed 1's map differs from seed 0's and equals ABMIL's
    attention (Ilse et al. 2018, eq. 9) computed here from seed 1's saved weights. Without ``--seed`` one line
    names the seed drawn (the first) and how to pick another; an unknown seed is a one-line error naming the
    run's seeds."""
    import torch

    from mil.bags import load_bag
    from mil.heatmap import attention_map
    from zoomfeat.features import FeatureSpec

    run = train_run(cohort, tmp_path / "two", "abmil", epochs=1, folds=("--folds", "0"), seeds="0,1")
    spec, slide = f"{cohort['features']}@20x", str(cohort["slide"])
    maps = {s: attention_map(run, 0, slide, spec, seed=s)[2] for s in (0, 1)}
    assert not np.allclose(maps[0], maps[1], atol=1e-4)
    ckpt = torch.load(run / "seed_1" / "fold_0" / "model.ckpt", map_location="cpu", weights_only=True)
    w = {k: v.double() for k, v in ckpt["state_dict"].items()}
    x = load_bag(FeatureSpec.parse(spec), Path(slide).stem).features.double()
    h = torch.relu(x @ w["embed.0.weight"].T + w["embed.0.bias"])
    gate = (torch.tanh(h @ w["attention.tanh_gate.0.weight"].T + w["attention.tanh_gate.0.bias"])
            * torch.sigmoid(h @ w["attention.sigmoid_gate.0.weight"].T + w["attention.sigmoid_gate.0.bias"]))
    expected = torch.softmax((gate @ w["attention.score.weight"].T + w["attention.score.bias"])[:, 0], dim=0)
    np.testing.assert_allclose(maps[1], expected.numpy(), rtol=1e-4, atol=1e-7)

    small = ["--top", "2", "--max-size", "256"]
    capsys.readouterr()
    assert cli.main(["heatmap", str(run), slide, "--out", str(tmp_path / "default.png"), *small]) == 0
    assert "drawing fold 0 of seed 0 (the first); --seed S draws another" in capsys.readouterr().out
    for s in (0, 1):
        assert cli.main(["heatmap", str(run), slide, "--seed", str(s), *small]) == 0
        assert "drawing" not in capsys.readouterr().out
    drawn = {s: (run / "heatmaps" / f"target_seed{s}_fold0.png").read_bytes() for s in (0, 1)}
    assert (tmp_path / "default.png").read_bytes() == drawn[0] != drawn[1]
    assert cli.main(["heatmap", str(run), slide, "--seed", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--seed 7:" in err and "was trained with seeds 0,1" in err and len(err.splitlines()) == 1
    assert cli.main(["heatmap", str(run), slide, "--seed", "-1"]) == 2
    assert "bad --seed -1" in capsys.readouterr().err


def test_heatmap_cli_writes_images(cohort, runs, tmp_path):
    from matplotlib import image as mpimg

    from zoomfeat.slides import Slide

    out = tmp_path / "maps" / "target.png"
    argv = ["heatmap", "--run", str(runs[0]), "--fold", "1", "--slide", str(cohort["slide"]), "--features",
            f"{cohort['features']}@20x", "--out", str(out), "--top", "4", "--max-size", "512"]
    assert cli.main(argv) == 0
    heat = mpimg.imread(out)
    with Slide(cohort["slide"]) as slide:
        thumb = slide.thumbnail(512)
    assert heat.shape[:2] == thumb.shape[:2] and heat[..., :3].std() > 0.05
    assert np.abs(heat[..., :3] * 255 - thumb).mean() > 5  # the overlay changed the thumbnail
    top = mpimg.imread(out.with_name("target_top.png"))
    assert top.shape[0] == top.shape[1] == 2 * PATCH_SIZE + 3 * 4 and top[..., :3].std() > 0.02


def test_heatmap_rejects_other_magnifications(cohort, runs, tmp_path, capsys):
    argv = ["heatmap", "--run", str(runs[0]), "--fold", "0", "--slide", str(cohort["slide"]), "--features",
            f"{cohort['features']}@5x", "--out", str(tmp_path / "x.png")]
    assert cli.main(argv) == 2
    assert "was trained on" in capsys.readouterr().err


def test_render_and_percentiles():
    from mil.heatmap import attention_percentiles, montage, render_heatmap

    np.testing.assert_allclose(attention_percentiles(np.array([0.1, 0.5, 0.3])), [0, 1, 0.5])
    thumb = np.full((64, 64, 3), 255, np.uint8)
    coords = np.array([[0, 0], [512, 512]])
    img = render_heatmap(thumb, coords, 512, (1024, 1024), np.array([0.0, 1.0]), alpha=1.0, cmap="gray")
    assert (img[:32, :32] == 0).all() and (img[32:, 32:] == 255).all() and (img[:32, 32:] == 255).all()
    grid = montage([np.zeros((8, 8, 3), np.uint8)] * 3, border=2)
    assert grid.shape == (2 * 10 + 2, 2 * 10 + 2, 3) and (grid == 0).sum() == 3 * 8 * 8 * 3


@pytest.mark.slow
def test_heatmap_run_slide_needs_no_scale_flag(cohort, runs, tmp_path, capsys):
    """`zoomfeat heatmap RUN SLIDE`: the fold's own feature set by default; a slide without usable scale
    metadata (bogus mpp, no objective power) is drawn from the feature file's base magnification."""
    from zoomfeat.slides import Slide
    from zoomfeat.store import TileStoreWriter, h5_path
    from zoomfeat.synthetic import write_synthetic_slide
    from zoomfeat.tiling import make_grid

    assert cli.main(["heatmap", str(runs[0]), str(cohort["slide"]), "--max-size", "256"]) == 0
    assert (runs[0] / "heatmaps" / "target_fold0.png").is_file()
    nometa = write_synthetic_slide(tmp_path / "nometa.tiff", size=2048, fmt="tiff", mpp=352.8, seed=3).path
    with pytest.raises(Exception, match="--base-mag"):
        Slide(nometa)
    with Slide(nometa, base_mag=20.0) as slide:  # what extract --base-mag 20 did
        grid = make_grid(slide, [20.0])
        with TileStoreWriter(h5_path(tmp_path / "f", "nometa"), slide.info, grid, extractor="planted",
                             feature_dim=DIM) as writer:
            writer.write_features("20x", 0, np.random.default_rng(1).normal(size=(len(grid), DIM)))
            writer.commit()
    out = tmp_path / "n.png"
    assert cli.main(["heatmap", str(runs[0]), str(nometa), "--features", f"{tmp_path / 'f'}@20x", "--out", str(out),
                     "--max-size", "256", "--top", "2"]) == 0
    assert out.is_file() and out.with_name("n_top.png").is_file()


def test_heatmap_refuses_another_slide_with_the_same_stem(cohort, runs, tmp_path, capsys):
    from zoomfeat.synthetic import write_synthetic_slide

    other = write_synthetic_slide(tmp_path / "elsewhere" / "target.svs", size=2048, seed=11).path
    out = tmp_path / "x.png"
    assert cli.main(["heatmap", str(runs[0]), str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the slide the features in" in err[0] and str(cohort["slide"]) in err[0]
    assert not out.exists()
