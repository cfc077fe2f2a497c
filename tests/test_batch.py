import csv
import logging
from pathlib import Path

import pytest

from zoomfeat.batch import run_batch, shard_slides
from zoomfeat.errors import ConfigError, DataError, SlideError
from zoomfeat.store import OutputError


def test_shards_partition_sorted_slides():
    slides = [Path(f"s{i}.svs") for i in (3, 1, 0, 2, 4)]
    parts = [shard_slides(slides, f"{i}/2") for i in range(2)]
    assert [p.name for p in parts[0]] == ["s0.svs", "s2.svs", "s4.svs"]
    assert sorted(parts[0] + parts[1]) == sorted(slides)
    for bad in ("2/2", "x", "1/0"):
        with pytest.raises(ConfigError, match="--shard"):
            shard_slides(slides, bad)


def _rows(path):
    return list(csv.reader(open(path)))


def test_failures_are_recorded_and_batch_goes_on(tmp_path, capsys):
    def process(path: Path) -> str:
        if path.name == "bad.svs":
            raise SlideError(f"{path}: cannot be opened")
        if path.name == "dim.svs":
            raise DataError("features have 3 columns, expected 4")
        return "skipped" if path.name == "old.svs" else "done"

    slides = [Path(n) for n in ("a.svs", "bad.svs", "dim.svs", "old.svs")]
    report = run_batch(slides, tmp_path, process, desc="t", progress=False)
    assert report.outcomes == {"a.svs": "done", "bad.svs": "failed", "dim.svs": "failed", "old.svs": "skipped"}
    assert report.exit_code == 1 and report.summary().startswith("done 1, skipped 1, failed 2")
    err = capsys.readouterr().err
    assert "error: bad.svs: cannot be opened\n" in err and "error: dim.svs: features have 3" in err
    assert "Traceback" not in err
    assert _rows(tmp_path / "errors.csv") == [["slide", "error", "traceback"], ["bad.svs", "cannot be opened", ""],
                                              ["dim.svs", "features have 3 columns, expected 4", ""]]


def test_a_bug_is_not_a_slide_failure_its_traceback_is_kept(tmp_path, capsys):
    """A built-in exception (here ZeroDivisionError, or a raw OSError) is a bug: one line naming it, the
    traceback in the record, the batch goes on; under --debug (logger at DEBUG) it propagates."""
    def buggy(path):
        if path.name == "a.svs":
            return 1 / 0
        raise OSError("raw, unwrapped")

    report = run_batch([Path("a.svs"), Path("b.svs")], tmp_path, buggy, desc="t", progress=False)
    assert report.outcomes == {"a.svs": "failed", "b.svs": "failed"}
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("error: a.svs: internal error (ZeroDivisionError: division by zero): please report it with "
                      "the traceback from errors.csv (or rerun with --debug)")
    assert "internal error (OSError: raw, unwrapped)" in err[1] and len(err) == 3
    rows = {r["slide"]: r for r in csv.DictReader(open(tmp_path / "errors.csv"))}
    assert "Traceback" in rows["a.svs"]["traceback"] and "1 / 0" in rows["a.svs"]["traceback"]
    logger = logging.getLogger("zoomfeat")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with pytest.raises(ZeroDivisionError):
            run_batch([Path("a.svs")], tmp_path, buggy, desc="t", progress=False)
    finally:
        logger.setLevel(old)


def test_interrupt_propagates_and_output_errors_stop_the_batch(tmp_path):
    def interrupted(path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch([Path("a.svs")], tmp_path, interrupted, desc="t", progress=False)
    seen = []

    def disk_full(path):
        seen.append(path.name)
        raise OutputError("cannot write x.h5: No space left on device")

    with pytest.raises(OutputError):
        run_batch([Path("a.svs"), Path("b.svs")], tmp_path, disk_full, desc="t", progress=False)
    assert seen == ["a.svs"]  # the second slide is not tried: it would fail the same way


def test_shards_keep_their_own_records_and_errors_csv_merges_them(tmp_path):
    """Two job-array shards into one folder: the second run does not erase the first one's failures; a later
    run that finishes a slide clears its old failure everywhere."""
    def fail_odd(path):
        if int(path.stem[1:]) % 2:
            raise SlideError("odd slide")
        return "done"

    slides = [Path(f"s{i}.svs") for i in range(6)]
    for i in range(2):
        run_batch(shard_slides(slides, f"{i}/2"), tmp_path, fail_odd, desc="t", progress=False, shard=f"{i}/2")
    assert shard_slides(slides, "1/2") == [Path("s1.svs"), Path("s3.svs"), Path("s5.svs")]
    merged = [r[0] for r in _rows(tmp_path / "errors.csv")[1:]]
    assert merged == ["s1.svs", "s3.svs", "s5.svs"]
    assert sorted(p.name for p in (tmp_path / ".errors").iterdir()) == ["shard-0-of-2.csv", "shard-1-of-2.csv"]
    run_batch([Path("s3.svs")], tmp_path, lambda p: "done", desc="t", progress=False)  # fixed and redone
    assert [r[0] for r in _rows(tmp_path / "errors.csv")[1:]] == ["s1.svs", "s5.svs"]


def test_a_slide_claimed_by_a_live_process_is_left_to_it(tmp_path):
    from zoomfeat.store import Claim

    held = Claim(tmp_path, "s1")
    assert held.acquire()
    done = []
    report = run_batch([Path("s0.svs"), Path("s1.svs")], tmp_path, lambda p: done.append(p.name) or "done",
                       desc="t", progress=False)
    assert done == ["s0.svs"] and report.outcomes["s1.svs"] == "claimed" and report.exit_code == 0
    held.release()
    assert not held.path.exists()


def test_two_runs_with_the_same_record_keep_each_others_failures(tmp_path):
    """Concurrent unsharded runs share the record "all": each keeps the rows of slides it did not try."""
    from zoomfeat.store import Claim

    def fail(path):
        raise SlideError("broken")

    held = Claim(tmp_path, "b")
    held.acquire()  # run 1 finds b claimed by run 2
    run_batch([Path("a.svs"), Path("b.svs")], tmp_path, fail, desc="t", progress=False)
    held.release()
    run_batch([Path("b.svs")], tmp_path, fail, desc="t", progress=False)  # run 2 fails b
    assert [r[0] for r in _rows(tmp_path / "errors.csv")[1:]] == ["a.svs", "b.svs"]
    run_batch([Path("a.svs")], tmp_path, lambda p: "done", desc="t", progress=False)
    assert [r[0] for r in _rows(tmp_path / "errors.csv")[1:]] == ["b.svs"]
