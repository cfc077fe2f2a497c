"""A 10-fold run over HIPT's TCGA-BRCA subtyping splits with tiny synthetic bags for their slide ids."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from mil.config import MILConfig, make_protocol
from mil.cv import run_cv
from splits.io import read_splits_dir
from conftest import require_shared
from mil_data import write_feature_file

pytestmark = pytest.mark.usefixtures("one_thread")

HIPT = ("splits_data", "HIPT", "2-Weakly-Supervised-Subtyping")
EXPECTED = [(715, 79, 81), (711, 84, 80), (718, 80, 77), (708, 81, 86), (716, 80, 79), (716, 77, 82),
            (712, 81, 82), (715, 75, 85), (709, 82, 84), (709, 80, 86)]


@pytest.mark.slow
def test_hipt_ten_folds_use_the_labelled_slides_only(tmp_path):
    root = require_shared(*HIPT)
    splits = root / "splits" / "10foldcv_subtype" / "tcga_brca"
    labels = root / "dataset_csv" / "tcga_brca_subset.csv.zip"
    rng = np.random.default_rng(0)
    slides = sorted({s for fold in read_splits_dir(splits) for s in fold.all_slides()})
    for slide in slides:
        write_feature_file(tmp_path / "feats", slide, rng.standard_normal((4, 8)).astype(np.float32))
    cfg = MILConfig(features=f"{tmp_path / 'feats'}@20x", labels=str(labels), splits=str(splits),
                    out=str(tmp_path / "run"), task="subtyping", label_col="oncotree_code", model="mean",
                    model_kwargs={"hidden": 8}, protocol=make_protocol("hipt", epochs=1))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        summary = run_cv(cfg)
    sizes = []
    for k in range(10):
        m = json.loads((tmp_path / "run" / f"fold_{k}" / "metrics.json").read_text())
        sizes.append((m["n_train"], m["n_val"], m["n_test"]))
    assert sizes == EXPECTED
    assert len(summary) == 14  # 10 folds, the seed's mean and std, the mean and std over seeds
    assert any("whose label is not IDC/ILC" in str(w.message) for w in record)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["label_map"] == {"IDC": 0, "ILC": 1} and len(config["split_fingerprints"]) == 10
