"""Generated splits: never leaky across patients, stratified within one slide, reproducible (hypothesis)."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splits.generate import MakeConfig, make_splits
from splits.simil import SimilConfig, simil_from_json, simil_splits
from zoomfeat.errors import ConfigError, DataError

FAST = settings(max_examples=25, deadline=None)


def cohort(sizes_by_class: dict[str, list[int]], mixed: bool = False) -> pd.DataFrame:
    """One row per slide; patient ``<class><i>`` has ``size`` slides (the last one flips label if mixed)."""
    rows = []
    for cls, sizes in sizes_by_class.items():
        for i, size in enumerate(sizes):
            for j in range(size):
                label = "Z" if mixed and size > 2 and j == size - 1 else cls
                rows.append({"case_id": f"{cls}{i}", "slide_id": f"{cls}{i}-s{j}", "label": label})
    return pd.DataFrame(rows)


def cohorts(max_size: int):
    sizes = st.lists(st.integers(1, max_size), min_size=5, max_size=30)
    return st.dictionaries(st.sampled_from("ABC"), sizes, min_size=1, max_size=3)


def _patients(df, slides):
    case = dict(zip(df["slide_id"], df["case_id"]))
    return {case[s] for s in slides}


def _check_no_leak_and_cover(df, folds):
    for f in folds:
        assert sorted(f.all_slides()) == sorted(df["slide_id"])
        parts = [_patients(df, f.part(p)) for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])


def _check_stratified(df, slides, frac, tolerance):
    label = dict(zip(df["slide_id"], df["label"]))
    got = Counter(label[s] for s in slides)
    for cls, n in Counter(df["label"]).items():
        assert abs(got.get(cls, 0) - n * frac) < tolerance, (cls, got, n * frac)


@FAST
@given(cohorts(max_size=3), st.integers(2, 5), st.integers(0, 10**6))
def test_kfold_partitions_patients_stratified_and_reproducible(sizes, folds, seed):
    df = cohort(sizes)
    config = MakeConfig(folds=folds, val_frac=0.1, seed=seed)
    if min(len(v) for v in sizes.values()) < folds:
        with pytest.raises(DataError, match="fewer than --folds"):
            make_splits(df, config)
        return
    result = make_splits(df, config)
    _check_no_leak_and_cover(df, result)
    tests = [s for f in result for s in f.test]
    assert sorted(tests) == sorted(df["slide_id"])            # test sets partition the cohort
    largest = max(max(v) for v in sizes.values())
    for f in result:
        _check_stratified(df, f.test, 1.0 / folds, tolerance=largest)
    assert make_splits(df.sample(frac=1.0, random_state=seed % 97), config) == result


@FAST
@given(cohorts(max_size=1), st.integers(2, 5), st.integers(0, 10**6))
def test_one_slide_per_patient_is_within_one_slide_of_ideal(sizes, folds, seed):
    df = cohort(sizes)
    if min(len(v) for v in sizes.values()) < folds:
        return
    for f in make_splits(df, MakeConfig(folds=folds, val_frac=0.0, seed=seed)):
        _check_stratified(df, f.test, 1.0 / folds, tolerance=1)
    for f in make_splits(df, MakeConfig(folds=folds, mode="repeated", val_frac=0.2, test_frac=0.3, seed=seed)):
        for part, frac in (("train", 0.5), ("val", 0.2), ("test", 0.3)):
            _check_stratified(df, f.part(part), frac, tolerance=1)


@FAST
@given(cohorts(max_size=4), st.integers(0, 10**6))
def test_repeated_and_simil_never_leak_even_with_mixed_patients(sizes, seed):
    df = cohort(sizes, mixed=True)
    if min(len(v) for v in sizes.values()) < 5:
        return
    repeated = make_splits(df, MakeConfig(folds=3, mode="repeated", test_frac=0.2, seed=seed))
    _check_no_leak_and_cover(df, repeated)
    assert make_splits(df, MakeConfig(folds=3, mode="repeated", test_frac=0.2, seed=seed)) == repeated
    try:
        simil = simil_splits(df, SimilConfig(test_frac=0.2, folds=3, seed=seed))
    except DataError as exc:                                   # rest of a class can fall below --folds
        assert "fewer than --folds" in str(exc)
        return
    _check_no_leak_and_cover(df, simil)
    assert len({f.test for f in simil}) == 1                   # one fixed test set
    assert sorted(s for f in simil for s in f.val) == sorted(s for s in df["slide_id"] if s not in simil[0].test)


def test_seeds_differ_and_repeated_test_sets_overlap():
    df = cohort({"A": [1] * 40, "B": [2] * 12})
    a = make_splits(df, MakeConfig(folds=5, mode="repeated", seed=0))
    assert a != make_splits(df, MakeConfig(folds=5, mode="repeated", seed=1))
    assert len(set(a[0].test) & set(a[1].test)) > 0 or len(set(a[0].test) | set(a[1].test)) < len(df)


def test_fewer_patients_of_a_class_than_folds_says_so():
    df = cohort({"A": [1] * 20, "B": [3, 3, 3]})
    with pytest.raises(DataError, match=r"class 'B' has 3 patient\(s\), fewer than --folds 5"):
        make_splits(df, MakeConfig(folds=5))


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "bogus"}, "--mode"), ({"folds": 1}, "at least 2"), ({"test_frac": 0.2}, "repeated"),
    ({"mode": "repeated", "val_frac": 0.5, "test_frac": 0.5}, "no training"),
])
def test_make_config_is_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MakeConfig(**kwargs)


def test_simil_json_keeps_its_test_set_and_groups_tcga_patients(tmp_path):
    train = {f"TCGA-AA-{i:04d}-01Z-00-DX{j}.svs": "HRD" if i % 3 == 0 else "HRP" for i in range(30) for j in (1, 2)}
    test = {"TCGA-BB-0001-01Z-00-DX1": "HRD", "TCGA-BB-0002-01Z-00-DX1": "HRP"}
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train_dict": train, "test_dict": test}))
    table, folds, source = simil_from_json(path, None, SimilConfig(folds=5))
    assert source == "TCGA barcode" and len(table) == 62 and table["case_id"].nunique() == 32
    assert all(f.test == tuple(sorted(test)) for f in folds) and len(folds) == 5
    _check_no_leak_and_cover(table, folds)
