"""The chaos benchmark's small version in the suite: 3 cycles of SIGKILL at seeded random moments during two
concurrent ``extract`` processes, ``train-mil --seeds``, ``generate-large --n 2`` and ``train-cdm``, each followed
by a rerun whose outputs must be byte-identical to an uninterrupted run's (benchmarks/bench_chaos.py runs 20
cycles of larger inputs as fresh ``python -m cli`` processes).

Here every command runs in a child forked from the test process (``bench_chaos.Forked``), which has imported
torch and Lightning once: the child is a real process that SIGKILL ends anywhere, but spends no seconds on
imports, so the kills land in the commands' work and 3 cycles of four workloads cost less CPU than one cycle of
two as fresh processes did."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_chaos  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_killed_runs_resume_to_byte_identical_outputs(tmp_path):
    cycles = int(os.environ.get("ZOOMFEAT_CHAOS_CYCLES", "3"))
    results = bench_chaos.chaos(["extract", "train-mil", "generate-large", "train-cdm"], cycles=cycles, seed=0,
                                work=tmp_path, verbose=False, small=True, fork=True)
    for name, result in results.items():
        assert result["files"] > 0, name
        assert result["passed"] == result["cycles"] == cycles, (name, result["notes"])
        assert all("(0 killed)" not in note for note in result["notes"]), (name, result["notes"])


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
