"""``train-mil --augment DIR --train-fraction F``: synthetic bags join training folds only, fractions are
recorded per fold, runs are reproducible, a resume with another fraction is refused, and copies made from
another feature set (or recording none) are refused with one line naming both."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import cli
from mil_data import planted_cohort
from splits.io import read_splits_dir
from zoomfeat.store import FeatureFile, write_feature_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("aug")
    paths = planted_cohort(root, n_slides=20, dim=8, sizes=(4, 9), folds=5)  # 2 of each class per test fold
    rng = np.random.default_rng(1)
    for path in sorted(paths["features"].glob("*.h5")):
        with FeatureFile(path) as f:
            feats = f.features("20x")
        made = {"synthetic": {"made_from": {"features_file": path.name,  # what feature-copies records
                                            "features_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}}
        for k in range(2):  # two copies of every slide, a little noise on the real rows
            write_feature_file(root / "syn", f"{path.stem}~syn{k}", {"20x": feats + 0.1 * rng.standard_normal(
                feats.shape).astype(np.float32)}, extractor="toy", extractor_config=made)
    return {**paths, "syn": root / "syn", "root": root}


def _argv(cohort, out, *extra):
    return ["train-mil", "--features", f"{cohort['features']}@20x", "--labels", str(cohort["labels"]),
            "--splits", str(cohort["splits"]), "--out", str(out), "--model", "abmil", "--epochs", "2",
            "--seed", "0", *extra]


@pytest.mark.slow
def test_synthetic_bags_of_training_slides_only(cohort, tmp_path):
    out = tmp_path / "run"
    assert cli.main(_argv(cohort, out, "--augment", str(cohort["syn"]), "--train-fraction", "0.5")) == 0
    labels = pd.read_csv(cohort["labels"])
    for fold in read_splits_dir(cohort["splits"]):
        metrics = json.loads((out / f"fold_{fold.index}" / "metrics.json").read_text())
        aug = metrics["augmentation"]
        train = labels[labels.slide_id.isin(fold.part("train"))]
        per_class = train.groupby("label").case_id.nunique()  # one slide per patient in this cohort
        assert aug["fraction"] == 0.5
        assert aug["train_real"] == sum(max(1, round(0.5 * n)) for n in per_class)
        assert aug["patients_dropped_by_fraction"] == len(train) - aug["train_real"]
        assert aug["synthetic_added"] == 2 * aug["train_real"]  # both copies of each kept training slide
        predicted = pd.read_csv(out / f"fold_{fold.index}" / "predictions.csv")
        assert not predicted.slide_id.str.contains("~syn").any()  # never evaluated on a synthetic bag
        assert set(predicted.slide_id) <= set(fold.part("val")) | set(fold.part("test"))
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["augment"] == str(cohort["syn"]) and record["config"]["train_fraction"] == 0.5
    assert any("~syn" in s for s in record["inputs"]["feature_files"])


@pytest.mark.slow
def test_same_seed_same_predictions_and_fraction_changes_them(cohort, tmp_path):
    runs = {}
    for name, extra in {"a": ["--train-fraction", "0.5"], "b": ["--train-fraction", "0.5"],
                        "full": []}.items():
        assert cli.main(_argv(cohort, tmp_path / name, "--augment", str(cohort["syn"]), *extra)) == 0
        runs[name] = pd.concat(pd.read_csv(p) for p in sorted((tmp_path / name).glob("fold_*/predictions.csv")))
    pd.testing.assert_frame_equal(runs["a"].reset_index(drop=True), runs["b"].reset_index(drop=True))
    assert not np.allclose(runs["a"]["prob"].to_numpy(), runs["full"]["prob"].to_numpy())


def test_resume_with_another_fraction_is_refused(cohort, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_argv(cohort, out, "--train-fraction", "0.5", "--folds", "0")) == 0
    capsys.readouterr()
    assert cli.main(_argv(cohort, out, "--train-fraction", "0.25", "--folds", "0,1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_fraction" in err[0]


@pytest.mark.parametrize("extra, fragment", [(["--train-fraction", "0"], "--train-fraction"),
                                             (["--augment", "/nonexistent/syn"], "--augment")])
def test_bad_augmentation_options_are_one_line_errors(cohort, tmp_path, capsys, extra, fragment):
    assert cli.main(_argv(cohort, tmp_path / "bad", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


@pytest.mark.slow
def test_compare_shows_real_vs_synthetic_and_fraction_curves(cohort, tmp_path):
    runs = []
    for fraction in ("0.25", "0.5", "1.0"):
        for aug in ([], ["--augment", str(cohort["syn"])]):
            out = tmp_path / f"f{fraction}{'_syn' if aug else ''}"
            assert cli.main(_argv(cohort, out, "--train-fraction", fraction, "--folds", "0,1", *aug)) == 0
            runs.append(str(out))
    assert cli.main(["compare", *runs, "--out", str(tmp_path / "cmp"), "--reference", runs[-2]]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    names = set(result["feature_sets"])
    assert {"toy@20x 25%", "toy@20x +syn 25%", "toy@20x", "toy@20x +syn"} <= names
    curves = result["fraction_curves"]["subtyping"]
    assert set(curves) == {"toy@20x", "toy@20x +syn"}
    assert [float(f) for f in curves["toy@20x +syn"]] == [0.25, 0.5, 1.0]
    assert len(result["comparisons"]) == 5  # every run paired with the reference on the same folds
    assert (tmp_path / "cmp" / "fraction_auc_subtyping.png").stat().st_size > 1000


@pytest.mark.parametrize("case", ["re-extracted", "no record"])
def test_copies_of_another_feature_set_are_refused(cohort, tmp_path, capsys, case):
    """The copies record the sha256 of the real file they were made from; a feature set whose file differs (here
    one slide's features rewritten, as a re-extraction does) or copies that record nothing are refused."""
    features = tmp_path / "features"
    shutil.copytree(cohort["features"], features)
    syn = tmp_path / "syn"
    shutil.copytree(cohort["syn"], syn)
    victim = sorted(features.glob("*.h5"))[0]
    if case == "re-extracted":
        with FeatureFile(victim) as f:
            feats = f.features("20x")
        victim.unlink()
        write_feature_file(features, victim.stem, {"20x": feats + 1.0}, extractor="toy")
    else:
        copy = syn / f"{victim.stem}~syn0.h5"
        with FeatureFile(copy) as f:
            feats = f.features("20x")
        copy.unlink()
        write_feature_file(syn, copy.stem, {"20x": feats}, extractor="toy")
    argv = _argv(cohort, tmp_path / "run", "--augment", str(syn))
    argv[argv.index("--features") + 1] = f"{features}@20x"
    capsys.readouterr()
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(syn) in err[0], err
    if case == "re-extracted":
        expected = hashlib.sha256(victim.read_bytes()).hexdigest()[:12]
        assert f"{victim.stem}~syn" in err[0] and str(victim) in err[0] and expected in err[0] and "made from" in err[0]
    else:
        assert "records no feature file" in err[0]
    assert not (tmp_path / "run" / "fold_0").exists()
