"""Hostile input over the slide/tile/feature commands: info, tile, verify, extract, export, prepare-train, heatmap.

Every parametrised case runs the real CLI dispatcher on one bad input (or a fault: full disk, read-only folder)
and asserts what a user must get: the exit status, exactly one ``error:`` line naming the problem, no traceback,
and nothing else lost or changed (every file that existed keeps its bytes; no temporary file is left). The other
tests cover the cases that need more than one command: shards into one folder, two concurrent extract
processes, a bug inside a slide, a conditioning folder that holds another feature set.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cli
from hostile import one_error, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two small slides, their tile stores, toy features (20x, 5x) and random tiny-ZoomLDM weights."""
    from zoomfeat.model import load_zoomldm
    from zoomfeat.resolve import tiny_config_path
    from zoomfeat.synthetic import write_synthetic_slide

    root = tmp_path_factory.mktemp("hostile_data")
    for i in range(2):
        write_synthetic_slide(root / "slides" / f"s{i}.svs", size=1024, seed=i)
    assert cli.main(["tile", str(root / "slides"), "--out", str(root / "tiles"), "--no-progress"]) == 0
    assert cli.main(_toy(root / "slides", root / "feats" / "toy")) == 0
    load_zoomldm(tiny_config_path(), None).save_official(root / "tiny.ckpt")
    return root


@pytest.fixture
def work(base, tmp_path):
    """A private copy of everything the cases may touch."""
    for name in ("slides", "tiles", "feats"):
        shutil.copytree(base / name, tmp_path / name)
    shutil.copy2(base / "tiny.ckpt", tmp_path / "tiny.ckpt")
    return tmp_path


def _toy(slides, out, *extra):
    return ["extract", str(slides), "--out", str(out), "--encoder", "toy", "--mags", "20x,5x", "--device", "cpu",
            "--workers", "0", "--batch-size", "16", *extra]


def _tiny(slides, out, weights, *extra):
    return ["extract", str(slides), "--out", str(out), "--encoder", "zoomldm", "--zoomldm", "tiny", "--weights",
            str(weights), "--conditioner", "toy", "--mags", "20x,5x", "--device", "cpu", "--workers", "0",
            "--batch-size", "16", *extra]


def _full_disk(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")


def _read_only(*_, **__):
    raise PermissionError(errno.EACCES, "Permission denied")


# ------------------------------------------------------------------------------------------------- cases
def _bad_weights(kind: str):
    def make(w):
        path = w / f"{kind}.ckpt"
        path.write_bytes({"text": b"these are not weights\n", "empty": b"", "random": os.urandom(4096)}[kind])
        return _tiny(w / "slides", w / "out", path), "cannot read weight file"
    return make


def _other_grid(w):
    return ["tile", str(w / "slides"), "--out", str(w / "tiles"), "--mags", "20x,10x"], \
        "holds outputs made with other settings (mags"


def _duplicate(command):
    def make(w):
        shutil.copy2(w / "slides" / "s0.svs", w / "site_b.svs")
        (w / "other").mkdir()
        shutil.copy2(w / "slides" / "s1.svs", w / "other" / "s0.tiff")
        slides = [str(w / "slides"), str(w / "other")]
        argv = ["tile", *slides, "--out", str(w / "out")] if command == "tile" else \
            [*_toy(slides[0], w / "out")[:2], slides[1], *_toy(slides[0], w / "out")[2:]]
        return argv, "two slides have the id 's0'"
    return make


def _file_out(command):
    def make(w):
        (w / "out").write_text("a file, not a folder")
        argv = {"tile": ["tile", str(w / "slides"), "--out", str(w / "out")],
                "extract": _toy(w / "slides", w / "out"),
                "export": ["export", str(w / "feats" / "toy"), "--format", "clam", "--out", str(w / "out")],
                "prepare-train": ["prepare-train", str(w / "slides"), "--conditioner", "toy", "--out", str(w / "out"),
                                  "--mags", "20x,5x", "--max-patches-per-mag", "1"]}[command]
        return argv, "is a file, not a folder"
    return make


CASES = {
    "info-missing": (lambda w: (["info", str(w / "nope.svs")], "no such file"), None),
    "info-folder": (lambda w: (["info", str(w / "slides")], "is a folder, not a slide file"), None),
    "tile-out-is-a-file": (_file_out("tile"), None),
    "tile-read-only-out": (lambda w: (["tile", str(w / "slides"), "--out", str(w / "ro")], "is not writable"),
                           ("zoomfeat.store.files._probe_writable", _read_only)),
    "tile-full-disk": (lambda w: (["tile", str(w / "slides"), "--out", str(w / "out")], "No space left on device"),
                       ("h5py.Group.create_dataset", _full_disk)),
    "tile-duplicate-ids": (_duplicate("tile"), None),
    "tile-other-grid-settings": (_other_grid, None),
    "tile-bad-shard": (lambda w: (["tile", str(w / "slides"), "--out", str(w / "out"), "--shard", "2/2"],
                                  "--shard '2/2'"), None),
    "verify-missing-folder": (lambda w: (["verify", str(w / "nowhere")], "is not a folder"), None),
    "verify-missing-list": (lambda w: (["verify", str(w / "tiles"), "--slides", str(w / "list.txt")],
                                       "--slides"), None),
    "extract-devices-0": (lambda w: (_toy(w / "slides", w / "out", "--devices", "0"), "bad --devices 0"), None),
    "extract-device-tpu9": (lambda w: (_toy(w / "slides", w / "out", "--device", "tpu9"), "bad --device 'tpu9'"),
                            None),
    "extract-weights-folder": (lambda w: ((w / "wdir").mkdir() or _tiny(w / "slides", w / "out", w / "wdir")),
                               None),
    "extract-weights-text": (_bad_weights("text"), None),
    "extract-weights-empty": (_bad_weights("empty"), None),
    "extract-weights-random": (_bad_weights("random"), None),
    "extract-out-is-a-file": (_file_out("extract"), None),
    "extract-full-disk": (lambda w: (_toy(w / "slides", w / "out"), "No space left on device"),
                          ("h5py.Dataset.__setitem__", _full_disk)),
    "extract-duplicate-ids": (_duplicate("extract"), None),
    "extract-other-settings": (lambda w: (_toy(w / "slides", w / "feats" / "toy", "--toy-seed", "3"),
                                          "holds outputs made with other settings (extractor_config.seed 0 -> 3"),
                               None),
    "export-out-is-a-file": (_file_out("export"), None),
    "export-missing-source": (lambda w: (["export", str(w / "nope"), "--format", "clam", "--out", str(w / "o")],
                                         "does not exist"), None),
    "prepare-train-device-tpu9": (lambda w: (["prepare-train", str(w / "slides"), "--conditioner", "toy", "--out",
                                              str(w / "out"), "--device", "tpu9"], "bad --device 'tpu9'"), None),
    "prepare-train-out-is-a-file": (_file_out("prepare-train"), None),
    "heatmap-missing-run": (lambda w: (["heatmap", str(w / "no_run"), str(w / "slides" / "s0.svs")], "no_run"),
                            None),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.slow
def test_hostile_input_is_one_line_and_loses_nothing(case, work, capsys, monkeypatch):
    make, patch = CASES[case]
    made = make(work)
    argv, expected = made if isinstance(made[0], list) else (made, "is a folder without weights.ckpt")
    before = snapshot(work)
    capsys.readouterr()
    if patch is not None:
        monkeypatch.setattr(patch[0], patch[1])
    line = one_error(argv, capsys)
    monkeypatch.undo()
    assert expected in line, line
    after = snapshot(work)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing lost or changed
    new = set(after) - set(before)
    assert not [p for p in new if ".tmp" in p or p.endswith(".h5")], new  # no half or stray outputs


# ------------------------------------------------------------------------------- several commands at once
@pytest.mark.slow
def test_conditioning_folder_holding_another_feature_set_is_refused(work, capsys):
    """The README layout: features/toy holds a baseline; a ZoomLDM run whose conditioning would default to
    <out>/../toy must not rewrite it (naming the folder and the option), and --conditioning-out elsewhere works."""
    toy = work / "feats" / "toy"
    before = snapshot(toy)
    line = one_error(_tiny(work / "slides", work / "feats" / "zoomldm", work / "tiny.ckpt"), capsys)
    assert str(toy) in line and "--conditioning-out (default <out>/../toy)" in line
    assert snapshot(toy) == before and not list((work / "feats" / "zoomldm").glob("*.h5"))
    assert cli.main(_tiny(work / "slides", work / "feats" / "zoomldm", work / "tiny.ckpt", "--conditioning-out",
                          str(work / "feats" / "toy_conditioning"))) == 0
    assert snapshot(toy) == before
    assert cli.main(["verify", str(work / "feats" / "toy_conditioning")]) == 0


def test_shards_into_one_folder_keep_every_failure_and_verify_reports_them(work, capsys):
    """--shard 0/2 and 1/2 into one folder, one broken slide per shard: errors.csv keeps both; verify --slides
    lists both failures and the slide no run was given."""
    slides = work / "slides"
    (slides / "s2.svs").write_bytes(b"broken")  # sorted: s0, s1, s2, s3 -> shard 0 gets s0, s2
    (slides / "s3.svs").write_bytes(b"broken too")
    out = work / "tiles_sharded"
    for i in range(2):
        assert cli.main(["tile", str(slides), "--out", str(out), "--shard", f"{i}/2", "--no-progress"]) == 1
    rows = (out / "errors.csv").read_text().splitlines()
    assert [r.split(",")[0].rsplit("/", 1)[-1] for r in rows[1:]] == ["s2.svs", "s3.svs"]
    listing = work / "expected.txt"
    listing.write_text("s0\ns1\ns2\ns3\ns4\n")
    capsys.readouterr()
    assert cli.main(["verify", str(out), "--slides", str(listing)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error:") for line in err)
    assert "slide s2 failed: cannot be opened" in err[0] and "slide s3 failed" in err[1]
    assert "slide s4 never got a complete file" in err[2]
    good = work / "good"
    good.mkdir()
    for name in ("s0.svs", "s1.svs"):
        shutil.copy2(slides / name, good / name)
    assert cli.main(["verify", str(out), "--slides", str(good)]) == 0  # a slide folder as the list: both done
    capsys.readouterr()
    assert cli.main(["verify", str(out)]) == 1  # without a list: the recorded failures of both shards
    import re

    lines = capsys.readouterr().err.splitlines()
    assert [re.search(r": slide (s\d) failed: ", line).group(1) for line in lines] == ["s2", "s3"]


def test_a_bug_inside_a_slide_keeps_its_traceback_and_debug_shows_it(work, capsys, monkeypatch):
    from zoomfeat.extract.baseline import EncoderFeaturizer

    def broken(self, batch):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(EncoderFeaturizer, "__call__", broken)
    out = work / "bug"
    assert cli.main(_toy(work / "slides", out)) == 1
    err = capsys.readouterr().err
    assert err.count("internal error (TypeError: unsupported operand)") == 2 and "Traceback" not in err
    import csv

    rows = list(csv.DictReader(open(out / "errors.csv")))
    assert all("Traceback" in r["traceback"] and "broken" in r["traceback"] for r in rows) and len(rows) == 2
    with pytest.raises(TypeError):
        cli.main(["--debug", *_toy(work / "slides", work / "bug2")])


@pytest.mark.slow
def test_two_concurrent_extract_runs_share_the_work(work):
    """Two real processes on one folder, started together: every slide is done exactly once (the done counts add
    up to the slide count), none fails, and every file verifies."""
    from zoomfeat.synthetic import write_synthetic_slide

    slides = work / "many"
    for i in range(8):
        write_synthetic_slide(slides / f"c{i}.svs", size=1024, seed=10 + i)
    out, go = work / "shared_out", work / "go"
    script = ("import sys, time, pathlib; import cli, torch, zoomfeat.extract.runner\n"
              "go = pathlib.Path(sys.argv[1]); pathlib.Path(sys.argv[2]).touch()\n"
              "while not go.exists(): time.sleep(0.01)\n"
              "sys.exit(cli.main(sys.argv[3:]))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(go), str(work / f"ready{k}"),
                               *_toy(slides, out)], env=env, stderr=subprocess.PIPE, text=True)
             for k in range(2)]
    while not all((work / f"ready{k}").exists() for k in range(2)):
        assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
        time.sleep(0.05)
    go.touch()
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    done = [int(err.split("extract: done ")[1].split(",")[0]) for _, err in results]
    assert sum(done) == 8, [err[-1000:] for _, err in results]
    assert all("failed 0" in err for _, err in results)
    assert sorted(p.name for p in out.glob("*.h5")) == [f"c{i}.h5" for i in range(8)]
    assert not list(out.glob(".*.tmp*")) and not list((out / ".claims").glob("*.lock"))
    assert subprocess.run([sys.executable, str(ROOT / "cli.py"), "verify", str(out)], env=env).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 60 KB file system (tmpfs), for a disk that really fills up; skipped where mounting is not allowed."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the monkeypatched full-disk cases cover the logic")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("command", ["tile", "extract"])
@pytest.mark.slow
def test_a_disk_that_really_fills_up_is_one_line_and_leaves_no_temp_file(work, small_disk, capsys, command):
    from zoomfeat.synthetic import write_synthetic_slide

    for i in range(2, 12):
        write_synthetic_slide(work / "slides" / f"s{i}.svs", size=1024, seed=i)
    out = small_disk / "out"
    argv = ["tile", str(work / "slides"), "--out", str(out), "--no-progress"] if command == "tile" else \
        _toy(work / "slides", out)
    line = one_error(argv, capsys)
    assert "No space left on device; free disk space or write to another folder" in line
    assert not list(out.glob(".*.tmp*"))
    from zoomfeat.store import verify_file

    finished = sorted(out.glob("*.h5"))
    assert finished and all(verify_file(p) == [] for p in finished)  # what was finished is whole


def test_a_really_read_only_out_is_one_line(work, tmp_path, capsys):
    """A read-only file system (root ignores permission bits, not this): refused before any slide."""
    mount = tmp_path / "ro_disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the monkeypatched read-only case covers the logic")
    try:
        for argv in (["tile", str(work / "slides"), "--out", str(mount)], _toy(work / "slides", mount)):
            line = one_error(argv, capsys)
            assert f"--out {mount} is not writable (Read-only file system)" in line
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("kind", ["text", "empty", "random", "folder"])
def test_weights_that_are_not_a_checkpoint_are_one_checkpoint_error(tmp_path, kind):
    """Both weight readers (ZoomLDM checkpoints, encoder weights): text, empty or random bytes are a one-line
    CheckpointError (torch.load itself raises KeyError / IndexError / EOFError on them); a folder without a
    weight file says what it expected inside."""
    from zoomfeat.encoders.weights import read_state_dict as read_encoder_weights
    from zoomfeat.encoders.weights import resolve_file
    from zoomfeat.errors import CheckpointError, ConfigError
    from zoomfeat.model.checkpoint import read_state_dict

    if kind == "folder":
        (tmp_path / "notes.txt").write_text("x")
        with pytest.raises(ConfigError, match=r"folder .* exists but holds no weight file: expected one of "
                                              r"pytorch_model.bin, model.safetensors inside it \(found: notes.txt\)"):
            resolve_file(tmp_path, ("pytorch_model.bin", "model.safetensors"), "uni")
        with pytest.raises(CheckpointError, match="is a folder: pass the checkpoint file inside it"):
            read_state_dict(tmp_path)
        return
    path = tmp_path / "w.ckpt"
    path.write_bytes({"text": b"these are not weights\n", "empty": b"", "random": bytes(range(256)) * 16}[kind])
    for reader in (read_state_dict, read_encoder_weights):
        with pytest.raises(CheckpointError) as err:
            reader(path)
        assert str(err.value).startswith("cannot read weight") and "\n" not in str(err.value)
