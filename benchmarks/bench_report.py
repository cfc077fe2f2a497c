"""Speed of ``report`` / ``compare`` / heatmap rendering on large fabricated inputs (run by hand).

    python benchmarks/bench_report.py            # prints a Markdown table

Inputs are fabricated (predictions.csv with random scores; a random attention map), so this measures the
reporting code, not training. Results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mil.compare import build_comparison
from mil.heatmap import attention_percentiles, render_heatmap
from mil.report import build_report


def fabricate(run_dir: Path, n_folds: int, n_test: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({  # a schema-2 run record (mil/record.py)
        "format": "zoomfeat-mil-run", "schema_version": 2, "task": "subtyping",
        "config": {"features": "/f/zoomldm@20x+5x", "model": "abmil", "splits": "s"},
        "label_map": {"IDC": 0, "ILC": 1}, "feature_spec": "/f/zoomldm@20x+5x", "feature_dim": 8,
        "split_source": "s", "inputs": None, "extractor": "zoomldm",
        "split_fingerprints": {str(k): str(k) for k in range(n_folds)}}))
    for k in range(n_folds):
        labels = rng.integers(0, 2, n_test)
        probs = np.clip(0.5 + 0.2 * (labels - 0.5) + rng.normal(0, 0.3, n_test), 0, 1)
        ids = [f"f{k}s{i}" for i in range(n_test)]
        (run_dir / f"fold_{k}").mkdir()
        pd.DataFrame({"slide_id": ids, "case_id": ids, "label": labels, "prob": probs, "split": "test",
                      "prob_IDC": 1 - probs, "prob_ILC": probs}).to_csv(
            run_dir / f"fold_{k}" / "predictions.csv", index=False)
        (run_dir / f"fold_{k}" / "metrics.json").write_text("{}")  # train-mil's done marker (mil.record)
    return run_dir


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n_folds, n_test in ((5, 200), (10, 1000)):
            a = fabricate(tmp / f"a{n_folds}", n_folds, n_test, 0)
            b = fabricate(tmp / f"b{n_folds}", n_folds, n_test, 1)
            t = timed(lambda: build_report(a, tmp / f"rep{n_folds}", n_bootstrap=1000))
            rows.append((f"report, {n_folds} folds x {n_test} test slides, 1000 bootstrap", t))
            t = timed(lambda: build_comparison([a, b], tmp / f"cmp{n_folds}", n_bootstrap=1000))
            rows.append((f"compare, 2 runs, {n_folds} folds x {n_test} test slides, 1000 paired bootstrap", t))
    rng = np.random.default_rng(0)
    for n_tiles in (10_000, 100_000):
        side = int(np.ceil(np.sqrt(n_tiles)))
        coords = np.stack(np.divmod(np.arange(n_tiles), side), 1)[:, ::-1] * 512
        thumb = np.full((2048, 2048, 3), 230, np.uint8)
        att = rng.random(n_tiles)
        t = timed(lambda: render_heatmap(thumb, coords, 512, (side * 512, side * 512), attention_percentiles(att)))
        rows.append((f"heatmap render, {n_tiles} tiles on a 2048 px thumbnail", t))
    print("| benchmark | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
