"""Cross-validated MIL training end to end: real HDF5 bags, real Lightning loops, real output files."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mil.bags import FeatureSpec, MILDataWarning, load_bag
from mil.config import MILConfig, make_protocol
from mil.cv import load_fold_model, run_cv
from splits.io import make_fold, write_splits_dir
from mil_data import planted_cohort, write_feature_file
from zoomfeat.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = {"abmil": {"hidden": 64, "attn_dim": 32}, "clam_sb": {"hidden": 64, "attn_dim": 32},
         "clam_mb": {"hidden": 64, "attn_dim": 32}, "dsmil": {"query_dim": 32}}


def _config(paths: dict, out: Path, model: str = "abmil", kwargs: dict | None = None, **overrides) -> MILConfig:
    protocol = make_protocol(overrides.pop("protocol", "hipt"), epochs=overrides.pop("epochs", 10),
                             lr=overrides.pop("lr", 2e-3))
    return MILConfig(features=f"{paths['features']}@20x", labels=str(paths["labels"]), splits=str(paths["splits"]),
                     out=str(out), task=overrides.pop("task", "subtyping"), model=model,
                     model_kwargs=kwargs if kwargs is not None else HEADS.get(model, {"hidden": 64}),
                     protocol=protocol, **overrides)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_cohort(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def planted_runs(planted, tmp_path_factory):
    """5-fold CV of every attention head and of mean pooling on 60 bags (5% key instances), 10 epochs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for model in [*HEADS, "mean"]:
        cfg = _config(planted, root / model, model)
        runs[model] = (cfg, run_cv(cfg))
    torch.set_num_threads(threads)
    return runs


def _mean_auc(summary: pd.DataFrame) -> float:
    rows = summary[(summary.seed == "mean") & (summary.fold == "mean")]
    return float(rows.test_auc.iloc[0])


@pytest.mark.parametrize("model", sorted(HEADS))
@pytest.mark.slow
def test_attention_heads_find_the_planted_signal(planted_runs, model):
    assert _mean_auc(planted_runs[model][1]) >= 0.95


@pytest.mark.slow
def test_mean_pooling_is_clearly_worse(planted_runs):
    mean = _mean_auc(planted_runs["mean"][1])
    assert mean < 0.95
    assert all(mean < _mean_auc(planted_runs[m][1]) - 0.03 for m in HEADS)


def test_attention_concentrates_on_key_instances(planted_runs, planted):
    cfg, _ = planted_runs["abmil"]
    model, record = load_fold_model(cfg.out, 0)
    assert not model.training and record.label_map == {"IDC": 0, "ILC": 1} and record.classes == ["IDC", "ILC"]
    preds = pd.read_csv(Path(cfg.out) / "fold_0" / "predictions.csv")
    positive = preds[(preds.label == 1) & (preds.split == "test")].slide_id.iloc[0]
    bag = load_bag(FeatureSpec.parse(cfg.features), positive)
    with torch.no_grad():
        attention = model(bag.features[None]).attention[0]  # a batch of one bag
    u = torch.zeros(bag.features.shape[1])
    u[:4] = 0.5
    key = (bag.features @ u) > 3.5  # key instances sit at 7 along u
    assert attention[key].sum() > 0.5  # about 5% of the instances get most of the attention


def test_run_outputs(planted_runs, planted):
    cfg, summary = planted_runs["abmil"]
    run = Path(cfg.out)
    assert list(summary.fold) == ["0", "1", "2", "3", "4", "mean", "std", "mean", "mean"]
    assert list(summary.seed) == ["0"] * 7 + ["mean", "std"]
    aucs = summary.test_auc.iloc[:5].astype(float)
    assert np.isclose(summary.test_auc.iloc[5], aucs.mean()) and np.isclose(summary.test_auc.iloc[6], aucs.std(ddof=1))
    assert np.isclose(summary.test_auc.iloc[7], aucs.mean()) and pd.isna(summary.test_auc.iloc[8])  # one seed
    assert pd.read_csv(run / "summary.csv").shape == (9, 6)
    config = json.loads((run / "config.json").read_text())
    assert config["feature_dim"] == 32 and config["extractor"] == "toy" and config["extractor_config"] == {"dim": 32}
    assert config["config"]["protocol"]["name"] == "hipt" and config["config"]["protocol"]["epochs"] == 10
    assert sorted(config["split_fingerprints"]) == ["0", "1", "2", "3", "4"]
    assert all(len(v) == 64 for v in config["split_fingerprints"].values())
    assert config["format"] == "zoomfeat-mil-run" and config["schema_version"] == 3
    assert config["seeds"] == [0] and config["folds"] == []
    assert config["feature_spec"] == f"{planted['features']}@20x" and config["task"] == "subtyping"
    assert config["inputs"]["labels_sha256"] == hashlib.sha256(Path(planted["labels"]).read_bytes()).hexdigest()
    assert len(config["inputs"]["feature_files"]) == 60
    preds = pd.read_csv(run / "fold_2" / "predictions.csv")
    assert list(preds.columns) == ["slide_id", "case_id", "label", "prob", "split", "prob_IDC", "prob_ILC"]
    assert np.allclose(preds.prob_ILC, preds.prob) and np.allclose(preds.prob_IDC + preds.prob_ILC, 1, atol=1e-6)
    assert preds.split.value_counts().to_dict() == {"val": 12, "test": 12}
    assert preds.prob.between(0, 1).all()
    metrics = json.loads((run / "fold_2" / "metrics.json").read_text())
    for key in ("fold", "seed", "test_auc", "test_balanced_accuracy", "test_accuracy", "test_macro_f1", "val_auc",
                "val_loss", "n_train", "n_val", "n_test", "epochs_trained", "best_epoch"):
        assert key in metrics
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (36, 12, 12)
    assert metrics["epochs_trained"] == 10 and metrics["best_epoch"] == 10  # hipt: the last epoch
    # the saved model reproduces the saved predictions
    model, _ = load_fold_model(run, 2)
    spec = FeatureSpec.parse(cfg.features)
    with torch.no_grad():
        probs = [float(torch.softmax(model(load_bag(spec, s).features[None]).logits, 1)[0, 1]) for s in preds.slide_id]
    assert np.allclose(probs, preds.prob, atol=1e-5)


def test_resume_skips_done_folds_and_rejects_another_config(planted_runs):
    cfg, _ = planted_runs["abmil"]
    metrics = Path(cfg.out) / "fold_0" / "metrics.json"
    before = metrics.stat().st_mtime_ns
    run_cv(replace(cfg, folds=(0,)))
    assert metrics.stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="other inputs or settings: settings seeds"):
        run_cv(replace(cfg, seed=1, seeds=None))


@pytest.fixture
def tiny(tmp_path):
    return planted_cohort(tmp_path / "tiny", n_slides=20, dim=8, sizes=(4, 9))


@pytest.mark.slow
def test_same_seed_same_metrics(tiny, tmp_path):
    results = []
    for name in ("a", "b"):
        cfg = _config(tiny, tmp_path / name, "clam_sb", {"hidden": 8, "attn_dim": 4}, epochs=2, folds=(0, 1),
                      protocol="simil", balanced=True)
        run_cv(cfg)
        results.append([json.loads((tmp_path / name / f"fold_{k}" / "metrics.json").read_text()) for k in (0, 1)])
    assert results[0] == results[1]


@pytest.mark.slow
def test_clam_protocol_early_stopping_restores_best(tiny, tmp_path):
    cfg = _config(tiny, tmp_path / "run", "abmil", {"hidden": 8, "attn_dim": 4}, folds=(0,), lr=1e-2,
                  protocol="clam", epochs=None)
    cfg = replace(cfg, protocol=make_protocol("clam", epochs=8, min_epochs=2, patience=1))
    run_cv(cfg)
    metrics = json.loads((tmp_path / "run" / "fold_0" / "metrics.json").read_text())
    assert 2 <= metrics["epochs_trained"] <= 8
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_trained"]


def test_duplicate_slide_with_two_labels_is_refused(tiny, tmp_path):
    labels = pd.read_csv(tiny["labels"])
    row = labels.iloc[[0]].assign(label="ILC" if labels.label.iloc[0] == "IDC" else "IDC")
    pd.concat([labels, row]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(DataError, match="different labels"):
        run_cv(_config({**tiny, "labels": tmp_path / "dup.csv"}, tmp_path / "run", epochs=1))


def test_unknown_class_is_refused(tiny, tmp_path):
    labels = pd.read_csv(tiny["labels"]).assign(label=lambda d: np.where(np.arange(len(d)) % 2, "1", "0"))
    labels.loc[3, "label"] = "maybe"
    labels.to_csv(tmp_path / "hrd.csv", index=False)
    with pytest.raises(DataError, match="unknown class.*'maybe'"):
        run_cv(_config({**tiny, "labels": tmp_path / "hrd.csv"}, tmp_path / "run", task="hrd", epochs=1))


def test_slides_without_features_or_empty_bags_are_left_out_with_a_count(tiny, tmp_path):
    fold = json.loads((Path(tiny["splits"]) / "splits.json").read_text())["sizes"]["0"]
    train = pd.read_csv(Path(tiny["splits"]) / "splits_0.csv").train.dropna().tolist()
    (Path(tiny["features"]) / f"{train[0]}.h5").unlink()
    (Path(tiny["features"]) / f"{train[1]}.h5").unlink()
    write_feature_file(Path(tiny["features"]), train[2], np.zeros((0, 8), dtype=np.float32))
    with pytest.warns(MILDataWarning) as record:
        run_cv(_config(tiny, tmp_path / "run", "mean", {"hidden": 8}, epochs=1, folds=(0,)))
    messages = " | ".join(str(w.message) for w in record)
    assert "2 slide(s) have no feature file" in messages and "1 slide(s) have an empty bag" in messages
    metrics = json.loads((tmp_path / "run" / "fold_0" / "metrics.json").read_text())
    assert metrics["n_train"] == fold["train"] - 3
    left_out = json.loads((tmp_path / "run" / "config.json").read_text())["left_out"]
    assert left_out == {"no_label": 0, "no_features": 2, "empty_bag": 1}


def test_one_class_test_set_gives_null_auc_and_a_warning(tiny, tmp_path):
    labels = pd.read_csv(tiny["labels"])
    neg = labels[labels.label == "IDC"].slide_id.tolist()
    pos = labels[labels.label == "ILC"].slide_id.tolist()
    write_splits_dir([make_fold(0, neg[:6] + pos[:6], neg[6:8] + pos[6:8], pos[8:])], tmp_path / "splits",
                     source="test", command="test")
    with pytest.warns(MILDataWarning, match="test AUC is undefined"):
        summary = run_cv(_config({**tiny, "splits": tmp_path / "splits"}, tmp_path / "run", "mean",
                                 {"hidden": 8}, epochs=1))
    metrics = json.loads((tmp_path / "run" / "fold_0" / "metrics.json").read_text())
    assert metrics["test_auc"] is None and metrics["val_auc"] is not None
    assert metrics["test_balanced_accuracy"] is not None
    assert summary.test_auc.isna().all()


def test_subtyping_drops_other_codes_with_a_count(tiny, tmp_path):
    labels = pd.read_csv(tiny["labels"])
    labels.loc[:2, "label"] = "MDLC"
    labels.to_csv(tmp_path / "codes.csv", index=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_cv(_config({**tiny, "labels": tmp_path / "codes.csv"}, tmp_path / "run", "mean", {"hidden": 8},
                       epochs=1, folds=(0,)))
    messages = " | ".join(str(w.message) for w in record)
    assert "dropped 3 slide(s) whose label is not IDC/ILC (MDLC: 3)" in messages
    assert "3 slide(s) named in the splits have no usable label" in messages


@pytest.mark.slow
def test_resume_needs_input_fingerprints_and_allows_a_fresh_start_before_any_fold(tiny, tmp_path):
    """A record without fingerprints (an older zoomfeat) cannot prove the inputs unchanged: refused. A folder
    whose run never finished a fold is not bound to its record: a fixed rerun starts there."""
    cfg = _config(tiny, tmp_path / "run", "mean", {"hidden": 8}, epochs=1, folds=(0,))
    run_cv(cfg)
    path = tmp_path / "run" / "config.json"
    record = json.loads(path.read_text())
    old = {k: record[k] for k in ("config", "label_map", "feature_dim", "split_source", "split_fingerprints")}
    path.write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="no input fingerprints"):
        run_cv(replace(cfg, folds=(1,)))
    (tmp_path / "run" / "fold_0" / "metrics.json").unlink()  # no finished fold any more
    labels = pd.read_csv(tiny["labels"])
    labels.to_csv(tmp_path / "l2.csv", index=False)
    run_cv(replace(cfg, labels=str(tmp_path / "l2.csv")))
    assert json.loads(path.read_text())["schema_version"] == 3


def test_task_sets_the_heads_reference_semantics(tiny, tmp_path):
    """A positive/negative task (hrd) runs DSMIL with its one positive stream (--num_classes 1 in DSMIL's code)
    and CLAM without subtyping; subtyping runs DSMIL with a stream per class and CLAM with subtyping; an
    explicit --model-kwargs value wins. The checkpoint records what was built."""
    labels = pd.read_csv(tiny["labels"]).assign(label=lambda d: (d.label == "ILC").astype(int))
    labels.to_csv(tmp_path / "hrd.csv", index=False)
    hrd = {**tiny, "labels": tmp_path / "hrd.csv"}
    cases = [(hrd, "hrd", "dsmil", {}, ("negative_stream", False)),
             (tiny, "subtyping", "dsmil", {}, ("negative_stream", None)),
             (hrd, "hrd", "dsmil", {"negative_stream": True}, ("negative_stream", True)),
             (hrd, "hrd", "clam_sb", {}, ("subtyping", None)),
             (tiny, "subtyping", "clam_sb", {}, ("subtyping", True))]
    small = {"dsmil": {"query_dim": 4}, "clam_sb": {"hidden": 8, "attn_dim": 4}}
    for i, (paths, task, model, given, (key, value)) in enumerate(cases):
        out = tmp_path / f"run{i}"
        run_cv(_config(paths, out, model, {**small[model], **given}, task=task, epochs=1, folds=(0,)))
        ckpt = torch.load(out / "fold_0" / "model.ckpt", weights_only=True)
        assert ckpt["model_kwargs"].get(key) == value, (task, model, given)
        if model == "dsmil":
            assert ckpt["state_dict"]["instance_classifier.weight"].shape == (1 if value is False else 2, 8)
            assert ckpt["model_kwargs"]["average"] is True  # scored by both streams, whatever the task


@pytest.mark.parametrize("model,kwargs,new_argument,value", [
    ("dsmil", {"query_dim": 4}, "negative_stream", False), ("dsmil", {"query_dim": 4}, "average", True),
    ("transmil", {"dim": 8, "heads": 2}, "class_token_residual", False)])
def test_resume_refuses_folds_whose_head_was_built_differently(tiny, tmp_path, model, kwargs, new_argument, value):
    """A run whose finished folds hold a head built with other arguments (the two-stream DSMIL an earlier
    zoomfeat built under --task hrd; DSMIL scored by its bag stream alone; TransMIL with the reference's
    class-token convolution) is not resumed into a mix of heads, and an old fold still loads as the head it was
    trained as."""
    from mil.cv import load_fold_model

    labels = pd.read_csv(tiny["labels"]).assign(label=lambda d: (d.label == "ILC").astype(int))
    labels.to_csv(tmp_path / "hrd.csv", index=False)
    cfg = _config({**tiny, "labels": tmp_path / "hrd.csv"}, tmp_path / "run", model, kwargs, task="hrd",
                  epochs=1, folds=(0,))
    run_cv(cfg)
    ckpt_path = tmp_path / "run" / "fold_0" / "model.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["model_kwargs"].pop(new_argument) is value  # recorded; popped: what the earlier version wrote
    torch.save(ckpt, ckpt_path)
    if new_argument != "negative_stream":  # same weights either way (two streams would need other weights)
        assert getattr(load_fold_model(tmp_path / "run", 0)[0], new_argument) is not value  # the class default
    with pytest.raises(ConfigError, match="fold 0 was trained with head arguments"):
        run_cv(replace(cfg, folds=(0, 1)))
    assert not (tmp_path / "run" / "fold_1").exists()
