import csv
from pathlib import Path

import pytest

from zoomfeat.batch import run_batch, shard_slides
from zoomfeat.errors import ConfigError, SlideError


def test_shards_partition_sorted_slides():
    slides = [Path(f"s{i}.svs") for i in (3, 1, 0, 2, 4)]
    parts = [shard_slides(slides, f"{i}/2") for i in range(2)]
    assert [p.name for p in parts[0]] == ["s0.svs", "s2.svs", "s4.svs"]
    assert sorted(parts[0] + parts[1]) == sorted(slides)
    for bad in ("2/2", "x", "1/0"):
        with pytest.raises(ConfigError, match="--shard"):
            shard_slides(slides, bad)


def test_failures_are_recorded_and_batch_goes_on(tmp_path, capsys):
    def process(path: Path) -> str:
        if path.name == "bad.svs":
            raise SlideError(f"{path}: cannot be opened")
        if path.name == "io.svs":
            raise OSError("disk gone")
        return "skipped" if path.name == "old.svs" else "done"

    slides = [Path(n) for n in ("a.svs", "bad.svs", "io.svs", "old.svs")]
    report = run_batch(slides, tmp_path, process, desc="t", progress=False)
    assert report.outcomes == {"a.svs": "done", "bad.svs": "failed", "io.svs": "failed", "old.svs": "skipped"}
    assert report.exit_code == 1 and report.summary().startswith("done 1, skipped 1, failed 2")
    err = capsys.readouterr().err
    assert "error: bad.svs: cannot be opened\n" in err and "error: io.svs: disk gone" in err
    rows = list(csv.reader(open(tmp_path / "errors.csv")))
    assert rows == [["slide", "error"], ["bad.svs", "cannot be opened"], ["io.svs", "disk gone"]]


def test_interrupt_and_bugs_propagate(tmp_path):
    def interrupted(path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch([Path("a.svs")], tmp_path, interrupted, desc="t", progress=False)
    with pytest.raises(ZeroDivisionError):
        run_batch([Path("a.svs")], tmp_path, lambda p: 1 / 0, desc="t", progress=False)
