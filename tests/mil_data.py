"""Synthetic feature files, label tables and split folders for the MIL tests (real HDF5 in the DESIGN.md format,
written by the store like every feature file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from splits.io import make_fold, write_splits_dir
from zoomfeat.store import write_feature_file as store_write_feature_file


def write_feature_file(directory: Path, slide_id: str, feats_20x: np.ndarray, feats_5x: np.ndarray | None = None,
                       extractor: str = "toy") -> Path:
    """One complete ``<slide_id>.h5`` written by the store (``zoomfeat.store.write_feature_file``): 20x tiles in
    one row and, when ``feats_5x`` is given, the 5x tiles that contain them (parents found from the geometry)."""
    features = {"20x": feats_20x} if feats_5x is None else {"20x": feats_20x, "5x": feats_5x}
    return store_write_feature_file(directory, slide_id, features, extractor=extractor)


def planted_bag(rng: np.random.Generator, label: int, n: int, dim: int, amplitude: float = 7.0,
                share: float = 0.05, spread: float = 3.0, matched: bool = True) -> np.ndarray:
    """[n, dim] N(0, 1) instances; in positive bags ``share`` of them (the key instances) are drawn from
    N(amplitude * u, spread^2 I) with u = (1, 1, 1, 1, 0, ...) / 2 instead. Negative bags are pure noise.

    The other instances of a positive bag move by a small opposite amount, so both classes have the same
    expected bag mean: mean pooling sees little, while a head that finds the few key instances separates them.
    ``matched=False`` leaves them in place (the same draws otherwise): the witnesses alone mark the bag.
    """
    x = rng.standard_normal((n, dim)).astype(np.float32)
    if label == 1:
        k = max(1, int(round(share * n)))
        u = np.zeros(dim, dtype=np.float32)
        u[:4] = 0.5
        key = np.zeros(n, dtype=bool)
        key[rng.choice(n, size=k, replace=False)] = True
        x[key] = spread * x[key] + amplitude * u
        if matched:
            x[~key] -= amplitude * k / (n - k) * u  # keeps the expected bag mean at 0, as in negative bags
    return x


def planted_cohort(root: Path, n_slides: int = 60, dim: int = 32, sizes: tuple[int, int] = (100, 200),
                   folds: int = 5, seed: int = 0, share: float = 0.05, spread: float = 3.0,
                   matched: bool = True) -> dict[str, Path]:
    """Feature folder, labels.csv and a stratified k-fold split folder (test = fold k, val = fold k+1);
    ``share``, ``spread`` and ``matched``: the fraction of witness (key) instances in positive bags, their
    standard deviation in every dimension, and whether the other instances balance the bag mean
    (:func:`planted_bag`)."""
    rng = np.random.default_rng(seed)
    labels = np.array([i % 2 for i in range(n_slides)])
    rows = []
    for i, y in enumerate(labels):
        sid = f"S{i:03d}"
        write_feature_file(root / "feats", sid, planted_bag(rng, int(y), int(rng.integers(*sizes)), dim,
                                                             share=share, spread=spread, matched=matched))
        rows.append({"case_id": f"C{i:03d}", "slide_id": sid, "label": "ILC" if y else "IDC"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    # classes alternate; with an even k, j % k would give each fold one class, so there the j-th slide of each
    # class goes to fold (j // 2) % k (an odd k keeps j % k, on which the tests' numbers were measured)
    fold_of = (lambda j: (j // 2) % folds) if folds % 2 == 0 else (lambda j: j % folds)
    chunk = [[r["slide_id"] for j, r in enumerate(rows) if fold_of(j) == k] for k in range(folds)]
    split_folds = []
    for k in range(folds):
        val = (k + 1) % folds
        train = [s for j in range(folds) if j not in (k, val) for s in chunk[j]]
        split_folds.append(make_fold(k, train, chunk[val], chunk[k]))
    write_splits_dir(split_folds, root / "splits", source="synthetic", seed=seed, command="tests")
    return {"features": root / "feats", "labels": root / "labels.csv", "splits": root / "splits"}
