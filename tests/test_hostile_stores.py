"""Feature files that ``verify`` refuses are refused, with verify's own message, by every command that loads
them (train-mil, export, heatmap's bag reader): 20x features shorter than their coordinates, parent links out of
range, NaN rows, float16 storage, and a ``slide_id`` naming another slide (which verify itself now reports).
Each command exits 2 with one line; no input changes."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

import cli
from hostile import one_error, snapshot
from mil_data import planted_cohort

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return planted_cohort(root / "cohort", n_slides=12, dim=4, sizes=(4, 7), folds=3)


def _fused(folder, slide_id="s0"):
    """A complete 20x+5x feature file written by the store."""
    from zoomfeat.store import write_feature_file

    rng = np.random.default_rng(0)
    return write_feature_file(folder, slide_id, {"20x": rng.standard_normal((8, 4)).astype(np.float32),
                                                 "5x": rng.standard_normal((2, 4)).astype(np.float32)})


def _short_features(path):
    with h5py.File(path, "a") as f:
        data = f["20x/features"][:-2]
        del f["20x/features"]
        f["20x"].create_dataset("features", data=data)


def _parents_out_of_range(path):
    with h5py.File(path, "a") as f:
        rows = f["20x/parent_5x"][()]
        rows[0] = 99
        f["20x/parent_5x"][...] = rows


def _nan_rows(path):
    with h5py.File(path, "a") as f:
        mag = "5x" if "5x" in f else "20x"
        data = f[f"{mag}/features"][()]
        data[1, 2] = np.nan
        f[f"{mag}/features"][...] = data


def _float16(path):
    with h5py.File(path, "a") as f:
        data = f["20x/features"][()].astype(np.float16)
        del f["20x/features"]
        f["20x"].create_dataset("features", data=data)


def _other_slide(path):
    with h5py.File(path, "a") as f:
        f.attrs["slide_id"] = "someone-else"


CASES = {"short": (_short_features, "20x/features has shape (6, 4), expected [8, D]"),
         "parents": (_parents_out_of_range, "20x/parent_5x: rows out of range [0, 2)"),
         "nan": (_nan_rows, "5x/features: 1 rows contain NaN or inf"),
         "float16": (_float16, "20x/features is float16, the format stores float32"),
         "slide_id": (_other_slide, "slide_id 'someone-else' names another slide than 's0'")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_and_the_reader_say_the_same(case, tmp_path, capsys):
    from zoomfeat.errors import DataError
    from zoomfeat.store import FeatureFile

    path = _fused(tmp_path)
    damage, message = CASES[case]
    damage(path)
    assert cli.main(["verify", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert any(message in line for line in lines), err
    with pytest.raises(DataError) as info, FeatureFile(path) as f:
        f.require_complete("s0")
        f.fused(["20x", "5x"])
    assert f"error: {info.value}" in lines


def _damaged_cohort(cohort, tmp_path, case):
    """A copy of the cohort whose first slide's features are made 20x+5x and then damaged."""
    folder = tmp_path / "cohort"
    shutil.copytree(cohort["features"].parent, folder)
    feats = folder / cohort["features"].name
    first = sorted(feats.glob("*.h5"))[0]
    CASES[case][0](first)
    return folder, feats, first


@pytest.mark.parametrize("case", ["short", "nan", "float16", "slide_id"])
def test_train_mil_refuses_what_verify_refuses(case, cohort, tmp_path, capsys):
    folder, feats, first = _damaged_cohort(cohort, tmp_path, case)
    argv = ["train-mil", "--features", f"{feats}@20x", "--labels", str(folder / cohort["labels"].name), "--splits",
            str(folder / cohort["splits"].name), "--out", str(tmp_path / "run"), "--model", "mean",
            "--model-kwargs", '{"hidden": 4}', "--epochs", "1"]
    before = snapshot(folder)
    line = one_error(argv, capsys)
    assert first.name in line, line
    assert snapshot(folder) == before
    assert not list((tmp_path / "run").rglob("model.ckpt")) if (tmp_path / "run").exists() else True


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_refuses_what_verify_refuses(case, tmp_path, capsys):
    feats = tmp_path / "feats"
    path = _fused(feats)
    CASES[case][0](path)
    if case == "nan":  # export writes 20x: the NaN goes there
        with h5py.File(path, "a") as f:
            data = f["20x/features"][()]
            data[0, 0] = np.nan
            f["20x/features"][...] = data
    if case == "slide_id":  # export reads by file: the id mismatch is verify's and the slide readers' concern
        pytest.skip("export names its outputs after the file it reads")
    before = snapshot(feats)
    line = one_error(["export", str(feats), "--format", "clam", "--out", str(tmp_path / "clam")], capsys, code=1)
    assert CASES[case][1] in line or (case == "nan" and "20x/features: 1 rows contain NaN" in line), line
    assert not list((tmp_path / "clam").rglob("*.h5")) if (tmp_path / "clam").exists() else True
    assert snapshot(feats) == before
