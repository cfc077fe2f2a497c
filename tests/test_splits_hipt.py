"""HIPT's real BRCA subtyping splits (../shared/splits_data) and the ``zoomfeat splits`` command line."""

from __future__ import annotations

import json

import pytest

from cli import main
from splits.audit import audit_splits, format_audit
from splits.hipt import NOT_IN_TABLE, import_hipt
from splits.io import read_splits_dir
from zoomfeat.labels import read_labels

HIPT = ("splits_data", "HIPT", "2-Weakly-Supervised-Subtyping")
EXPECTED_SIZES = [(715, 79, 81), (711, 84, 80), (718, 80, 77), (708, 81, 86), (716, 80, 79), (716, 77, 82),
                  (712, 81, 82), (715, 75, 85), (709, 82, 84), (709, 80, 86)]


@pytest.fixture(scope="module")
def hipt_paths():
    from tests.conftest import require_shared

    root = require_shared(*HIPT)
    return root / "splits" / "10foldcv_subtype" / "tcga_brca", root / "dataset_csv" / "tcga_brca_subset.csv.zip"


@pytest.fixture(scope="module")
def hipt(hipt_paths):
    return import_hipt(*hipt_paths)


def test_hipt_import_reproduces_the_real_fold_sizes(hipt):
    assert [f.sizes() for f in hipt.folds] == EXPECTED_SIZES
    labels = hipt.labels
    assert (len(labels), labels["case_id"].nunique()) == (875, 837)
    assert labels["label"].value_counts().to_dict() == {"IDC": 726, "ILC": 149}
    assert hipt.dropped_slides == {NOT_IN_TABLE: 166}


def test_bool_files_agree_with_list_files(hipt_paths, tmp_path):
    for k in (0, 7):
        (tmp_path / f"splits_{k}_bool.csv").write_bytes((hipt_paths[0] / f"splits_{k}_bool.csv").read_bytes())
    raw = read_splits_dir(hipt_paths[0])
    assert read_splits_dir(tmp_path) == [raw[0], raw[7]]


def test_audit_finds_patients_shared_between_train_and_test(hipt):
    audit = audit_splits(hipt.folds, hipt.labels)
    shared = [len(f.shared_patients["train/test"]) for f in audit.folds]
    assert shared == [8, 4, 5, 5, 6, 1, 10, 4, 7, 3]
    assert not audit.test_sets_partition and audit.distinct_test_slides == 569
    assert "patients shared between train and test: 10 of 10 folds, 1-10 per fold, 53 in all" in format_audit(audit)


def test_audit_of_raw_hipt_files_counts_unlabelled_slides(hipt_paths, hipt):
    audit = audit_splits(read_splits_dir(hipt_paths[0]), hipt.labels)
    assert audit.distinct_test_slides == 675
    assert [len(f.unlabelled) for f in audit.folds] == [166] * 10
    assert [len(f.shared_patients["train/test"]) for f in audit.folds] == [12, 8, 10, 8, 8, 4, 15, 9, 13, 4]  # MANIFEST: 4-15


@pytest.mark.slow
def test_cli_hipt_then_audit(hipt_paths, tmp_path, capsys):
    out = tmp_path / "hipt"
    assert main(["splits", "hipt", "--splits-dir", str(hipt_paths[0]), "--labels", str(hipt_paths[1]),
                 "--out", str(out)]) == 0
    assert "dropped 166 slide(s) named in the split files: not in the label table" in capsys.readouterr().out
    assert [f.sizes() for f in read_splits_dir(out)] == EXPECTED_SIZES
    assert len(read_labels(out / "labels.csv")) == 875
    args = ["splits", "audit", str(out), "--labels", str(out / "labels.csv"), "--json", str(tmp_path / "a.json")]
    assert main(args) == 0
    assert main([*args, "--strict"]) == 1
    assert json.loads((tmp_path / "a.json").read_text())["test_sets_partition"] is False


def _labels(tmp_path, n_patients=24):
    rows = ["case_id,slide_id,label"]
    for i in range(n_patients):
        rows += [f"P{i},S{i}a.svs,{'A' if i % 3 else 'B'}", f"P{i},S{i}b,{'A' if i % 3 else 'B'}"]
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_cli_make_simil_audit_round_trip(tmp_path, capsys):
    labels = _labels(tmp_path)
    for sub, extra in (("make", ["--folds", "4"]), ("make", ["--folds", "4", "--mode", "repeated"]),
                       ("simil", ["--folds", "3"])):
        out = tmp_path / f"{sub}{len(extra)}"
        assert main(["splits", sub, "--labels", str(labels), "--out", str(out), *extra]) == 0
        assert main(["splits", "audit", str(out), "--labels", str(labels), "--strict"]) == 0
        assert "no patient has slides in both train and test" in capsys.readouterr().out
    meta = json.loads((tmp_path / "make2" / "splits.json").read_text())
    assert meta["config"]["folds"] == 4 and meta["seed"] == 0


def test_cli_audit_reports_missing_features_and_unknown_slides(tmp_path, capsys):
    labels = _labels(tmp_path, 6)
    split = tmp_path / "splits"
    split.mkdir()
    (split / "splits_0.csv").write_text("train,val,test\nS0a,S1a,S2a\nS0b,S1b,S2b\nS9z,,\n")
    features = tmp_path / "features"
    features.mkdir()
    (features / "S0a.h5").write_bytes(b"")
    assert main(["splits", "audit", str(split), "--labels", str(labels), "--features", str(features)]) == 0
    out = capsys.readouterr().out
    assert "1 slide(s) without a label (e.g. S9z)" in out and "6 slide(s) without features" in out
    assert main(["splits", "audit", str(split), "--labels", str(labels), "--strict"]) == 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,label\nS1,A\n")
    assert main(["splits", "make", "--labels", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "missing column 'case_id'" in err
    assert main(["splits", "make", "--labels", str(_labels(tmp_path, 6)), "--out", str(tmp_path / "o"),
                 "--folds", "3"]) == 2
    assert "class 'B' has 2 patient(s), fewer than --folds 3" in capsys.readouterr().err
