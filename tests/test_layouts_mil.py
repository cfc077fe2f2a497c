"""Bring your own features: the same features in another tool's layout (written here by independent writers)
train with ``train-mil`` to the same predictions as in zoomfeat's layout, and fuse across folders and layouts."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import cli
from mil_data import planted_bag
from splits.io import make_fold, write_splits_dir
from zoomfeat.store import write_feature_file

N_SLIDES, DIM = 16, 8


def _geometry(rng, n5: int):
    """5x tiles (1024 level-0 px at base 20x... here base 40x: 2048 px) in a row, 20x tiles inside them."""
    coarse = np.stack([np.arange(n5) * 2048, np.zeros(n5)], 1).astype(np.int64)
    fine = np.array([[cx + dx * 512, cy + dy * 512] for cx, cy in coarse for dx in range(4) for dy in range(4)
                     if rng.random() < 0.8], dtype=np.int64)
    return fine, coarse


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("byof")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_SLIDES):
        sid, label = f"S{i:02d}", (i // 4) % 2  # every test fold (i % 4) holds both classes
        fine, coarse = _geometry(rng, int(rng.integers(2, 4)))
        f20 = planted_bag(rng, label, len(fine), DIM, share=0.2)
        f5 = rng.standard_normal((len(coarse), DIM)).astype(np.float32) + label  # a coarse-scale signal too
        write_feature_file(root / "zf", sid, {"20x": f20, "5x": f5}, {"20x": fine, "5x": coarse},
                           base_magnification=40.0, extractor="toy")
        _independent_writers(root, sid, f20, fine)
        rows.append({"case_id": f"P{i:02d}", "slide_id": sid, "label": label})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    ids = [r["slide_id"] for r in rows]
    folds = [make_fold(k, [s for j, s in enumerate(ids) if j % 4 not in (k, (k + 1) % 4)],
                       [s for j, s in enumerate(ids) if j % 4 == (k + 1) % 4],
                       [s for j, s in enumerate(ids) if j % 4 == k]) for k in range(2)]
    write_splits_dir(folds, root / "splits", source="synthetic", seed=0, command="tests")
    return root


def _independent_writers(root, sid, feats, coords):
    """Each tool's layout, written with h5py / torch / numpy directly as that tool lays it out."""
    (root / "trident" / "features_uni_v1").mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "trident" / "features_uni_v1" / f"{sid}.h5", "w") as f:
        f["features"] = feats
        c = f.create_dataset("coords", data=coords)
        c.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                        "target_magnification": 20})
    (root / "clam" / "h5_files").mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "clam" / "h5_files" / f"{sid}.h5", "w") as f:
        f["features"] = feats
        f["coords"] = coords
    (root / "stamp").mkdir(exist_ok=True)
    with h5py.File(root / "stamp" / f"{sid}.h5", "w") as f:
        f["feats"] = feats
        f["coords"] = coords * 0.25  # micrometres at 0.25 um/px
        f.attrs.update({"unit": "um", "tile_size_um": 128.0, "tile_size_px": 256})
    (root / "s2v" / "tile_embeddings").mkdir(parents=True, exist_ok=True)
    torch.save(torch.from_numpy(feats), root / "s2v" / "tile_embeddings" / f"{sid}.pt")
    (root / "eva" / "embeddings").mkdir(parents=True, exist_ok=True)
    torch.save(torch.from_numpy(feats), root / "eva" / "embeddings" / f"{sid}.pt")
    manifest = root / "eva" / "manifest.csv"
    new = not manifest.exists()
    with open(manifest, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["origin", "embeddings", "target", "split"])
        w.writerow([f"{sid}.svs", f"embeddings/{sid}.pt", "", ""])


def _train(root, features: str, out: str) -> pd.DataFrame:
    argv = ["train-mil", "--task", "custom", "--label-col", "label", "--labels", str(root / "labels.csv"),
            "--splits", str(root / "splits"), "--features", features, "--model", "abmil", "--protocol", "hipt",
            "--epochs", "2", "--seed", "0", "--out", str(root / "runs" / out)]
    assert cli.main(argv) == 0
    frames = [pd.read_csv(p) for p in sorted((root / "runs" / out).glob("fold_*/predictions.csv"))]
    return pd.concat(frames).sort_values(["split", "slide_id"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(cohort):
    return _train(cohort, f"{cohort / 'zf'}@20x", "zoomfeat")


@pytest.mark.parametrize("spec", ["trident:{r}/trident@20x", "{r}/trident/features_uni_v1@20x", "clam:{r}/clam@20x",
                                  "{r}/stamp@20x", "{r}/s2v@20x", "eva:{r}/eva@20x"])
@pytest.mark.slow
def test_foreign_layout_gives_the_same_predictions(cohort, reference, spec):
    got = _train(cohort, spec.format(r=cohort), spec.split(":")[0].split("/")[-1].replace("@", "_"))
    prob_columns = [c for c in reference.columns if c.startswith("prob")]
    assert list(got["slide_id"]) == list(reference["slide_id"])
    np.testing.assert_allclose(got[prob_columns].to_numpy(), reference[prob_columns].to_numpy(), atol=1e-6)


@pytest.mark.slow
def test_fusion_across_folders_and_layouts_links_by_containment(cohort):
    native = _train(cohort, f"{cohort / 'zf'}@20x+5x", "zf_fused")
    mixed = _train(cohort, f"trident:{cohort / 'trident'}@20x+{cohort / 'zf'}@5x", "mixed_fused")
    prob_columns = [c for c in native.columns if c.startswith("prob")]
    np.testing.assert_allclose(mixed[prob_columns].to_numpy(), native[prob_columns].to_numpy(), atol=1e-6)


def test_fusion_without_coordinates_is_a_one_line_error(cohort, capsys):
    argv = ["train-mil", "--task", "custom", "--label-col", "label", "--labels", str(cohort / "labels.csv"),
            "--splits", str(cohort / "splits"), "--features", f"eva:{cohort / 'eva'}@20x+{cohort / 'zf'}@5x",
            "--model", "abmil", "--epochs", "1", "--out", str(cohort / "runs" / "bad")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot fuse" in err[0] and "no tile coordinates" in err[0]


def test_compare_puts_a_foreign_layout_and_zoomfeat_on_the_same_folds(cohort, reference):
    """A TRIDENT folder and a zoomfeat folder compared with the same paired statistics."""
    trident = cohort / "runs" / "trident"
    if not (trident / "summary.csv").is_file():
        _train(cohort, f"trident:{cohort}/trident@20x", "trident")
    out = cohort / "cmp"
    assert cli.main(["compare", str(cohort / "runs" / "zoomfeat"), str(trident), "--out", str(out),
                     "--reference", str(cohort / "runs" / "zoomfeat")]) == 0
    result = __import__("json").loads((out / "compare.json").read_text())
    assert set(result["feature_sets"]) == {"toy@20x", "trident:uni_v1@20x"}
    (pair,) = result["comparisons"]
    assert pair["feature_set"] == "trident:uni_v1@20x" and pair["mean_difference"] == pytest.approx(0.0, abs=1e-9)
