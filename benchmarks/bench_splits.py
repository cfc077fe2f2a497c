"""Time split generation and auditing on a synthetic cohort (run by hand: python benchmarks/bench_splits.py)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from splits.audit import audit_splits
from splits.generate import MakeConfig, make_splits


def cohort(n_patients: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        label = "ILC" if rng.random() < 0.17 else "IDC"
        rows += [(f"P{i}", f"P{i}-s{j}", label) for j in range(1 + int(rng.random() < 0.05))]
    return pd.DataFrame(rows, columns=["case_id", "slide_id", "label"])


def main() -> None:
    for n in (1_000, 10_000):
        df = cohort(n)
        for mode in ("kfold", "repeated"):
            t0 = time.perf_counter()
            folds = make_splits(df, MakeConfig(folds=10, mode=mode))
            t1 = time.perf_counter()
            audit_splits(folds, df)
            t2 = time.perf_counter()
            print(f"{n} patients ({len(df)} slides), {mode}, 10 folds: make {t1 - t0:.2f} s, audit {t2 - t1:.2f} s")


if __name__ == "__main__":
    main()
