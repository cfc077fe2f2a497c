"""``zoomfeat extract --devices 2 --accelerator cpu``: Lightning Fabric DDP (gloo) in two processes, one slide
shard per rank, errors of every rank merged into one errors.csv, features equal to a one-process run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import h5py  # noqa: E402
import lightning  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]


def _run(slides: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ROOT / "cli.py"), "extract", str(slides), "--out", str(out), "--encoder", "toy",
            "--mags", "20x", "--accelerator", "cpu", "--batch-size", "8", "--workers", "0", *extra]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


@pytest.mark.slow
def test_two_cpu_ranks_split_the_slides_and_match_one_process(tmp_path):
    from zoomfeat.synthetic import write_synthetic_slide

    slides = tmp_path / "slides"
    write_synthetic_slide(slides / "s0.svs", size=1024, seed=1)  # sorted: s0 -> rank 0, s1 -> rank 1,
    write_synthetic_slide(slides / "s1.svs", size=1024, seed=3)  # s2 -> rank 0, s3 -> rank 1
    (slides / "s2.svs").write_bytes(b"broken on rank 0")
    (slides / "s3.svs").write_bytes(b"broken on rank 1")
    two = _run(slides, tmp_path / "two", "--devices", "2")
    assert two.returncode == 1, two.stderr[-2000:]  # two slides failed
    assert two.stderr.count("extract: done 1, skipped 0, failed 1 in") == 2  # each rank's own summary
    assert "done 2, skipped 0, failed 2 over 2 ranks" in two.stderr
    errors = (tmp_path / "two" / "errors.csv").read_text().splitlines()
    assert errors[0] == "slide,error,traceback"
    assert sorted(Path(r.split(",")[0]).name for r in errors[1:]) == ["s2.svs", "s3.svs"]
    records = sorted(p.name for p in (tmp_path / "two" / ".errors").iterdir())
    assert records == ["all.rank-0-of-2.csv", "all.rank-1-of-2.csv"]  # one record per rank, merged above
    one = _run(slides / "s0.svs", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    assert _run(slides / "s1.svs", tmp_path / "one").returncode == 0
    for slide_id in ("s0", "s1"):
        with h5py.File(tmp_path / "two" / f"{slide_id}.h5") as a, h5py.File(tmp_path / "one" / f"{slide_id}.h5") as b:
            assert len(a["20x"]["coords"]) > 0
            np.testing.assert_array_equal(a["20x"]["coords"][()], b["20x"]["coords"][()])
            np.testing.assert_array_equal(a["20x"]["features"][()], b["20x"]["features"][()])


def test_rank_slides_composes_shard_then_rank():
    from zoomfeat.extract.distributed import rank_slides

    slides = [Path(f"s{i}.svs") for i in range(8)]
    assert rank_slides(slides, None, 1, 2) == [Path(f"s{i}.svs") for i in (1, 3, 5, 7)]
    assert rank_slides(slides, "1/2", 0, 2) == [Path("s1.svs"), Path("s5.svs")]
    assert rank_slides(slides, "1/2", 1, 2) == [Path("s3.svs"), Path("s7.svs")]
