"""The chaos benchmark's small version: 1 cycle (3 with ZOOMFEAT_CHAOS_CYCLES=3) of SIGKILL at seeded random moments during two concurrent
``extract`` processes and during ``train-mil``, each followed by a rerun whose outputs must be byte-identical to an
uninterrupted run's (benchmarks/bench_chaos.py runs 20 cycles and the CDM and generation workloads too)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_chaos  # noqa: E402


@pytest.mark.slow
def test_killed_runs_resume_to_byte_identical_outputs(tmp_path):
    cycles = int(os.environ.get("ZOOMFEAT_CHAOS_CYCLES", "1"))  # 3 cycles take ~140 s of CI's suite budget
    results = bench_chaos.chaos(["extract", "train-mil"], cycles=cycles, seed=0, work=tmp_path, verbose=False,
                                small=True)
    for name, result in results.items():
        assert result["files"] > 0, name
        assert result["passed"] == result["cycles"] == cycles, (name, result["notes"])


def test_digest_sees_a_changed_byte_and_ignores_logs(tmp_path):
    (tmp_path / "fold_0").mkdir()
    (tmp_path / "fold_0" / "model.ckpt").write_bytes(b"abc")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("t=1")
    before = bench_chaos.digest(tmp_path)
    (tmp_path / "logs" / "metrics.csv").write_text("t=2")
    assert bench_chaos.digest(tmp_path) == before and list(before) == ["fold_0/model.ckpt"]
    (tmp_path / "fold_0" / "model.ckpt").write_bytes(b"abd")
    assert bench_chaos.digest(tmp_path) != before
