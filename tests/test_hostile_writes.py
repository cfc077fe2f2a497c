"""Hostile writes: a full disk (ENOSPC from the kernel: temporary files are links to /dev/full), a folder that
cannot be created or written (EPERM / EACCES from the kernel under /sys; EROFS from a read-only mount simulated at
``os.mkdir``) under every command that writes an artifact. Each must end with exactly one ``error:`` line naming
the path and the cause, exit 2, leave no temporary file, change no other file, and print what it had computed
before the failed write (gen-metrics prints its metrics)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from conftest import require_shared
from hostile import one_error, snapshot
from mil_data import planted_cohort
from test_cdm_pipeline import RUNTIME, TINY_DIT, cohort, contexts, trainset, zoomldm_weights  # noqa: F401
from test_feature_copies import _feature_copies, extracted, tiny  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _sys_unwritable() -> bool:
    try:
        os.mkdir("/sys/zoomfeat-probe")
    except OSError:
        return True
    os.rmdir("/sys/zoomfeat-probe")
    return False


needs_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
needs_sys = pytest.mark.skipif(not _sys_unwritable(), reason="/sys is writable here")


@pytest.fixture
def full_disk(monkeypatch):
    """Every temporary file of the store is a link to /dev/full: each write fails with the kernel's ENOSPC."""
    import zoomfeat.store.files as files
    import zoomfeat.store.tiles as tiles
    from zoomfeat.store import output_error
    import zoomfeat.store.trainset as trainset_module

    real = files.temp_path

    def to_full(path):
        tmp = real(path)
        Path(tmp).parent.mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(tmp):
            os.symlink("/dev/full", tmp)
        return tmp

    for module in (files, tiles, trainset_module):
        monkeypatch.setattr(module, "temp_path", to_full)


def _no_temp_files(*folders: Path) -> None:
    for folder in folders:
        left = [p for p in Path(folder).rglob(".*") if ".tmp" in p.name]
        assert not left, left


@pytest.fixture(scope="module")
def mil(tmp_path_factory):
    root = tmp_path_factory.mktemp("writes_mil")
    return planted_cohort(root / "cohort", n_slides=12, dim=4, sizes=(4, 7), folds=3)


def _train_mil(paths, out):
    return ["train-mil", "--features", f"{paths['features']}@20x", "--labels", str(paths["labels"]), "--splits",
            str(paths["splits"]), "--out", str(out), "--model", "mean", "--model-kwargs", '{"hidden": 4}',
            "--epochs", "1", "--lr", "1e-2"]


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return folder


@needs_full
def test_train_mil_on_a_full_disk_is_one_line(mil, tmp_path, capsys, full_disk):
    before = snapshot(mil["features"].parent)
    line = one_error(_train_mil(mil, tmp_path / "run"), capsys)
    assert "No space left on device" in line and str(tmp_path / "run") in line, line
    assert snapshot(mil["features"].parent) == before
    _no_temp_files(tmp_path)
    assert not list((tmp_path / "run").rglob("model.ckpt")) if (tmp_path / "run").exists() else True


@needs_full
def test_gen_metrics_prints_its_metrics_then_fails_on_a_full_disk(tmp_path, capsys, full_disk):
    imgs = _images(tmp_path / "imgs")
    got = cli.main(["gen-metrics", "--real", str(imgs), "--fake", str(imgs), "--metric", "ssim", "--out",
                    str(tmp_path / "m.csv")])
    captured = capsys.readouterr()
    assert got == 2 and "ssim\t1\t(n=2)" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left" in errors[0] and "m.csv" in errors[0], captured.err
    assert not (tmp_path / "m.csv").exists()
    _no_temp_files(tmp_path)


@needs_full
def test_save_torch_reports_the_kernels_enospc_for_torch_files(tmp_path, full_disk):
    import torch

    from zoomfeat.store import OutputError, save_torch

    with pytest.raises(OutputError, match="No space left on device; free disk space"):
        save_torch({"w": torch.zeros(4096)}, tmp_path / "x.ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@needs_full
def test_train_cdm_on_a_full_disk_is_one_line(contexts, tmp_path, capsys, full_disk):  # noqa: F811
    before = snapshot(contexts)
    line = one_error(["train-cdm", "--data", str(contexts), "--out", str(tmp_path / "cdm"), "--max-steps", "1",
                      *TINY_DIT, *RUNTIME], capsys)
    assert "No space left on device" in line and str(tmp_path / "cdm") in line, line
    assert snapshot(contexts) == before
    _no_temp_files(tmp_path)


def _unwritable_commands(tmp_path: Path, out: str, mil: dict) -> dict[str, list[str]]:
    imgs = _images(tmp_path / "imgs")
    tiny = str(require_shared("golden", "zoomldm_tiny"))
    from zoomfeat.synthetic import write_pyramid

    slide = tmp_path / "slides" / "s.tiff"
    slide.parent.mkdir(exist_ok=True)
    if not slide.exists():
        write_pyramid(slide, np.full((512, 512, 3), (200, 120, 160), np.uint8), fmt="aperio", mpp=0.5, app_mag=20.0)
    return {
        "extract": ["extract", str(slide), "--out", f"{out}/feats", "--encoder", "toy", "--mags", "20x",
                    "--min-tissue", "0", "--device", "cpu"],
        "tile": ["tile", str(slide), "--out", f"{out}/tiles", "--mags", "20x", "--min-tissue", "0"],
        "invert": ["invert", str(imgs / "0.png"), "--mag", "5x", "--zoomldm", tiny, "--inversion-steps", "1",
                   "--device", "cpu", "--out", f"{out}/g.h5"],
        "gen-metrics": ["gen-metrics", "--real", str(imgs), "--fake", str(imgs), "--metric", "ssim",
                        "--out", f"{out}/m.csv"],
        "train-mil": _train_mil(mil, f"{out}/run"),
        "superres": ["superres", str(imgs / "0.png"), "--mag", "10x", "--zoomldm", tiny, "--rows", "bicubic",
                     "--device", "cpu", "--out", f"{out}/sr"],
    }


COMMANDS = ["extract", "tile", "invert", "gen-metrics", "train-mil", "superres"]


@needs_sys
@pytest.mark.parametrize("command", COMMANDS)
def test_an_unwritable_output_is_one_line(command, mil, tmp_path, capsys):
    """--out in a kernel-protected folder (/sys: EPERM for folders, EACCES for files)."""
    argv = _unwritable_commands(tmp_path, "/sys/zoomfeat-out", mil)[command]
    before = snapshot(tmp_path)
    line = one_error(argv, capsys)
    assert "/sys/zoomfeat-out" in line and ("not permitted" in line or "Permission denied" in line), line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_a_new_folder_under_a_read_only_mount_is_one_line(command, mil, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    argv = _unwritable_commands(tmp_path, str(ro / "new"), mil)[command]
    real_mkdir = os.mkdir

    def read_only_mkdir(path, *args, **kwargs):  # what the kernel answers under a read-only mount
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    before = snapshot(tmp_path)
    line = one_error(argv, capsys)
    assert str(ro) in line and "Read-only file system" in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_feature_copies_resumes_after_a_full_disk(extracted, tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A disk that fills after the first copy: one line, exit 2; the rerun (space freed) keeps the finished copy,
    writes the rest, and every copy equals an uninterrupted run's."""
    import h5py

    import zoomfeat.store.tiles as tiles
    from zoomfeat.store import output_error

    assert _feature_copies(extracted, tiny, tmp_path / "ref", "--copies", "2") == 0
    real, calls = tiles.check_free_space, []

    def fills_up(path, needed):
        calls.append(path)
        if len(calls) > 1:
            raise output_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path)
        return real(path, needed)

    monkeypatch.setattr(tiles, "check_free_space", fills_up)
    capsys.readouterr()
    assert _feature_copies(extracted, tiny, tmp_path / "out", "--copies", "2") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left" in errors[0], errors
    done = sorted(p.name for p in (tmp_path / "out").glob("*.h5"))
    assert len(done) == 1
    _no_temp_files(tmp_path / "out")
    monkeypatch.setattr(tiles, "check_free_space", real)
    first = (tmp_path / "out" / done[0]).stat().st_mtime_ns
    assert _feature_copies(extracted, tiny, tmp_path / "out", "--copies", "2") == 0
    assert (tmp_path / "out" / done[0]).stat().st_mtime_ns == first  # the finished copy is kept, not redone
    names = sorted(p.name for p in (tmp_path / "ref").glob("*.h5"))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.h5")) == names
    for name in names:
        with h5py.File(tmp_path / "ref" / name) as a, h5py.File(tmp_path / "out" / name) as b:
            keys = []
            a.visititems(lambda k, o: keys.append(k) if isinstance(o, h5py.Dataset) else None)
            for key in keys:
                assert np.array_equal(a[key][()], b[key][()]), (name, key)
