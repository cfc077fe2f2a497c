"""Label tables and split files: normalisation, validation errors, CLAM/HIPT formats, round trips."""

from __future__ import annotations

import json
import zipfile

import pandas as pd
import pytest

from splits.io import (SplitFold, check_folds_against_labels, read_split_file, read_splits_dir,
                       write_splits_dir)
from zoomfeat.labels import normalize_slide_id, read_labels, write_labels
from zoomfeat.errors import DataError

CSV = "case_id,slide_id,label\nP1,S1.svs,A\nP1,S2,A\nP2,S3.tiff,B\nP3,S4,B\n"


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("raw, expected", [
    ("TCGA-A1-01Z-00-DX1.0A1B-2C.svs", "TCGA-A1-01Z-00-DX1.0A1B-2C"),
    ("  S1.SVS ", "S1"), ("dir/sub/S2.ndpi", "S2"), ("S3.h5", "S3"), ("S4", "S4"), ("a.b.c", "a.b.c"),
])
def test_normalize_slide_id(raw, expected):
    assert normalize_slide_id(raw) == expected


def test_read_labels_normalises_ids_and_keeps_extra_columns(tmp_path):
    path = _write(tmp_path / "l.csv", "slide_id,case_id,label,age\nS1.svs,P1,A,50\nS2,P2,B,60\n")
    df = read_labels(path)
    assert list(df.columns) == ["case_id", "slide_id", "label", "age"]
    assert list(df["slide_id"]) == ["S1", "S2"]
    assert df.attrs["dropped"] == {}


def test_missing_column_names_file_column_and_present(tmp_path):
    path = _write(tmp_path / "l.csv", "slide_id,diagnosis\nS1,A\n")
    with pytest.raises(DataError) as info:
        read_labels(path)
    message = str(info.value)
    assert "l.csv" in message and "'case_id'" in message and "slide_id, diagnosis" in message


def test_duplicate_slide_with_different_labels_names_slide_and_lines(tmp_path):
    path = _write(tmp_path / "l.csv", CSV + "P1,S1,B\n")
    with pytest.raises(DataError, match=r"slide S1 .*different labels.*lines 2, 6"):
        read_labels(path)


def test_exact_duplicates_and_empty_labels_are_dropped_with_counts(tmp_path):
    path = _write(tmp_path / "l.csv", CSV + "P1,S2,A\nP1,S2,A\nP5,S9,\nP6,S10, \n")
    df = read_labels(path)
    assert len(df) == 4
    assert df.attrs["dropped"] == {"exact duplicate row": 2, "empty label": 2}


def test_reads_hipt_style_zip_in_memory_without_extracting(tmp_path):
    archive = tmp_path / "inner" / "table.csv.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../table.csv.zip", ",case_id,slide_id,oncotree_code\n0,P1,S1.svs,IDC\n1,P2,S2.svs,ILC\n")
    df = read_labels(archive, label_col="oncotree_code")
    assert list(df["label"]) == ["IDC", "ILC"] and list(df["slide_id"]) == ["S1", "S2"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["inner", "table.csv.zip"]  # nothing extracted


def test_write_labels_round_trip(tmp_path):
    df = read_labels(_write(tmp_path / "l.csv", CSV))
    again = read_labels(write_labels(df, tmp_path / "out" / "labels.csv"))
    pd.testing.assert_frame_equal(df, again)


def test_reads_clam_split_file_with_index_and_blank_padding(tmp_path):
    path = _write(tmp_path / "splits_3.csv", ",train,val,test\n0,S1.svs,S3,S4\n1,S2,,\n")
    assert read_split_file(path) == SplitFold(3, ("S1", "S2"), ("S3",), ("S4",))


def test_reads_bool_split_file(tmp_path):
    path = _write(tmp_path / "splits_1_bool.csv",
                  ",train,val,test\nS1,True,False,False\nS2.svs,True,False,False\nS3,False,True,False\n"
                  "S4,False,False,True\n")
    assert read_split_file(path) == SplitFold(1, ("S1", "S2"), ("S3",), ("S4",))


def test_slide_in_two_parts_is_an_error(tmp_path):
    path = _write(tmp_path / "splits_0.csv", "train,val,test\nS1,S2,S1.svs\n")
    with pytest.raises(DataError, match="S1 is listed in train and in test"):
        read_split_file(path)


def test_read_splits_dir_sorts_ignores_descriptors_and_checks_bool(tmp_path):
    for k in (10, 2):
        _write(tmp_path / f"splits_{k}.csv", f",train,val,test\n0,A{k},B{k},C{k}\n")
        _write(tmp_path / f"splits_{k}_descriptor.csv", ",train,val,test\nx,1,1,1\n")
    _write(tmp_path / "splits_2_bool.csv", ",train,val,test\nA2,True,False,False\nB2,False,True,False\n"
           "C2,False,False,True\n")
    assert [f.index for f in read_splits_dir(tmp_path)] == [2, 10]
    _write(tmp_path / "splits_2_bool.csv", ",train,val,test\nA2,False,False,True\nC2,True,False,False\n")
    with pytest.raises(DataError, match="disagree"):
        read_splits_dir(tmp_path)


def test_empty_split_dir_is_an_error(tmp_path):
    _write(tmp_path / "splits_0_descriptor.csv", ",train\nx,1\n")
    with pytest.raises(DataError, match="no split files"):
        read_splits_dir(tmp_path)


def test_write_splits_dir_round_trip_and_provenance(tmp_path):
    folds = [SplitFold(0, ("a", "b", "c"), ("d",), ("e", "f")), SplitFold(1, ("d", "e", "f"), (), ("a",))]
    write_splits_dir(folds, tmp_path, source="unit", seed=7, command="zoomfeat splits make")
    assert (tmp_path / "splits_0.csv").read_text().splitlines()[:2] == ["train,val,test", "a,d,e"]
    assert read_splits_dir(tmp_path) == folds
    meta = json.loads((tmp_path / "splits.json").read_text())
    assert (meta["source"], meta["seed"], meta["command"], meta["folds"]) == ("unit", 7, "zoomfeat splits make", 2)


def test_split_naming_unknown_slides_is_an_error(tmp_path):
    folds = [SplitFold(0, ("S1", "S2"), ("S3",), ("S4", "S99"))]
    check_folds_against_labels(folds[:0], ["S1"], "x")
    with pytest.raises(DataError, match=r"fold 0 names 1 slide\(s\) not in the label table \(e.g. S99\)"):
        check_folds_against_labels(folds, ["S1", "S2", "S3", "S4"], "splits/")
