"""Synthetic augmentation never leaks held-out slides or patients; training fractions are nested and paired."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mil.augment import plan_cohort, plan_fold, synthetic_for_fold, training_fraction
from zoomfeat.features import source_of, synthetic_id
from zoomfeat.errors import ConfigError


@st.composite
def cohorts(draw):
    """A cohort (slides -> patient, label), a random train / held-out split of its slides, and synthetic ids."""
    n_patients = draw(st.integers(2, 25))
    case_of, label_of = {}, {}
    for p in range(n_patients):
        label = draw(st.integers(0, 1))
        for s in range(draw(st.integers(1, 3))):
            slide = f"p{p}-s{s}"
            case_of[slide], label_of[slide] = f"p{p}", label
    slides = sorted(case_of)
    held = draw(st.lists(st.sampled_from(slides), unique=True, max_size=len(slides) - 1))
    train = [s for s in slides if s not in held]
    copies = draw(st.integers(0, 3))
    available = [synthetic_id(s, k) for s in slides for k in range(copies)] + ["not-a-copy", "ghost~syn1"]
    return case_of, label_of, train, held, available


@settings(max_examples=200, deadline=None)
@given(cohorts(), st.floats(0.01, 1.0), st.integers(0, 5))
@pytest.mark.slow
def test_no_synthetic_bag_of_a_held_out_slide_or_patient_enters_training(cohort, fraction, seed):
    case_of, label_of, train, held, available = cohort
    plan = plan_fold(train, held, case_of, label_of, fraction=fraction, seed=seed, available=available)
    held_patients = {case_of[s] for s in held}
    for syn in plan.synthetic:
        source = source_of(syn)
        assert source in plan.train_real and source not in held
        assert case_of[source] not in held_patients
    assert set(plan.train_real) <= set(train)


@st.composite
def split_folders(draw):
    """A cohort and several folds, each a random train / val / test partition of its slides (patients may
    straddle parts, as they can in a hand-made split folder), with synthetic copies of every slide."""
    case_of, label_of, _, _, _ = draw(cohorts())
    slides = sorted(case_of)
    folds = {}
    for k in range(draw(st.integers(1, 4))):
        part = {s: draw(st.sampled_from(("train", "val", "test"))) for s in slides}
        folds[k] = {name: [s for s in slides if part[s] == name] for name in ("train", "val", "test")}
    copies = draw(st.integers(1, 3))
    available = [synthetic_id(s, c) for s in slides for c in range(copies)]
    return case_of, label_of, folds, available


@settings(max_examples=100, deadline=None)
@given(split_folders(), st.floats(0.01, 1.0), st.integers(0, 5))
def test_applied_folds_train_on_no_copy_of_a_held_out_slide_or_patient(folder, fraction, seed):
    """The path mil.cv applies (plan_cohort -> fold_data): validation and test stay as they were, and a
    fold's training set holds real training slides plus copies whose patient has nothing held out."""
    from mil.train import FoldData

    case_of, label_of, folds, available = folder
    data = {k: FoldData(parts, {s: int(label_of[s]) for s in case_of}, dict(case_of)) for k, parts in folds.items()}
    cohort = plan_cohort(data, case_of, label_of, fraction=fraction, seed=seed, available=available)
    for k, parts in folds.items():
        applied = cohort.fold_data(k, data[k])
        assert applied.parts["val"] == parts["val"] and applied.parts["test"] == parts["test"]
        held_patients = {case_of[s] for s in parts["val"] + parts["test"]}
        for slide in applied.parts["train"]:
            source = source_of(slide)
            if source is None:
                assert slide in parts["train"]
                continue
            assert source in parts["train"] and case_of[source] not in held_patients
            assert applied.target[slide] == label_of[source] and applied.case[slide] == case_of[source]
        if parts["train"] and fraction == 1.0:  # every copy of an eligible training slide is used
            eligible = {s for s in parts["train"] if case_of[s] not in held_patients}
            assert {source_of(s) for s in applied.parts["train"] if source_of(s)} == eligible


@settings(max_examples=200, deadline=None)
@given(cohorts(), st.lists(st.floats(0.01, 1.0), min_size=2, max_size=4), st.integers(0, 5), st.integers(0, 9))
@pytest.mark.slow
def test_fractions_are_nested_stratified_and_whole_patients(cohort, fractions, seed, fold):
    case_of, label_of, train, _, _ = cohort
    previous = set()
    for fraction in sorted(fractions):
        kept, _ = training_fraction(train, case_of, label_of, fraction, seed, fold)
        assert previous <= set(kept)  # nested: the smaller fraction's set is inside the larger one's
        previous = set(kept)
        kept_patients = {case_of[s] for s in kept}
        assert {s for s in train if case_of[s] in kept_patients} == set(kept)  # whole patients only
        train_labels = {label_of[s] for s in train}
        assert {label_of[s] for s in kept} == train_labels  # every class keeps at least one patient


def test_same_seed_same_subset_and_counts():
    case_of = {f"p{i}-s0": f"p{i}" for i in range(100)}
    label_of = {s: int(s[1:].split("-")[0]) % 2 for s in case_of}
    train = sorted(case_of)
    a, dropped = training_fraction(train, case_of, label_of, 0.1, seed=3, fold=1)
    b, _ = training_fraction(train, case_of, label_of, 0.1, seed=3, fold=1)
    c, _ = training_fraction(train, case_of, label_of, 0.1, seed=4, fold=1)
    assert a == b and a != c
    assert len(a) == 10 and dropped == 90
    assert sum(label_of[s] for s in a) == 5  # 5 of the 50 patients of each class


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "0.1"])
def test_bad_fractions_are_config_errors(bad):
    with pytest.raises(ConfigError, match="--train-fraction"):
        training_fraction(["a"], {"a": "p"}, {"a": 0}, bad, 0, 0)


def test_synthetic_ids_round_trip():
    assert source_of(synthetic_id("TCGA-A1~x", 12)) == "TCGA-A1~x"
    assert source_of("TCGA-A1") is None
    assert synthetic_for_fold(["a"], ["b"], {"a": "p1", "b": "p1"}, ["a~syn0"]) == []  # same patient as held out
