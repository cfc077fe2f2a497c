"""``train-mil --instance-sample F``: each training step sees a seeded random share of each bag's instances.

Checked here: the draw (size, order, determinism per slide and epoch), that a step's padded batch holds exactly
rows of the real bags, that all folds at once still equal folds one by one, that evaluation sees whole bags
(predictions recomputed from the saved weights on the full bag), and the CLI's record and refusal. What it does
to accuracy on planted-witness cohorts is measured in benchmarks/RESULTS.md (MIL robustness)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import cli
from mil.bags import BagStore, FeatureSpec
from mil.config import MILConfig, make_protocol, training_plan
from mil.cv import run_cv
from mil.registry import build_model
from mil.train import FoldData, FoldTrainer, epoch_order, instance_subset, make_bags
from mil_data import planted_cohort
from splits.io import read_splits_dir

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"hidden": 8, "attn_dim": 4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return planted_cohort(tmp_path_factory.mktemp("sample"), n_slides=20, dim=8, sizes=(6, 13))


def _cfg(paths, out: Path, **kw) -> MILConfig:
    return MILConfig(features=f"{paths['features']}@20x", labels=str(paths["labels"]), splits=str(paths["splits"]),
                     out=str(out), model="abmil", model_kwargs=SMALL,
                     protocol=make_protocol("hipt", epochs=kw.pop("epochs", 2), lr=1e-2), **kw)


def test_instance_subset_is_a_seeded_sorted_share_per_slide_and_epoch():
    for n, share in ((10, 0.5), (7, 0.3), (200, 0.02), (1, 0.5), (5, 1.0)):
        keep = instance_subset("S001", n, share, seed=0, epoch=3)
        assert len(keep) == max(1, round(share * n)) and len(set(keep.tolist())) == len(keep)
        assert keep.tolist() == sorted(keep.tolist()) and 0 <= int(keep.min()) and int(keep.max()) < n
        assert torch.equal(keep, instance_subset("S001", n, share, seed=0, epoch=3))
    assert torch.equal(instance_subset("S001", 5, 1.0, 0, 0), torch.arange(5))
    draws = {tuple(instance_subset(s, 100, 0.5, seed, epoch).tolist())
             for s, seed, epoch in (("S001", 0, 0), ("S001", 0, 1), ("S002", 0, 0), ("S001", 1, 0))}
    assert len(draws) == 4  # another epoch, slide or seed draws other instances


def test_a_sampled_step_holds_exactly_rows_of_the_real_bags(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path / "unused", instance_sample=0.5, bags_per_step=3)
    store = BagStore(FeatureSpec.parse(cfg.features), cache=False)
    labels = pd.read_csv(tiny["labels"])
    target = {r.slide_id: int(r.label == "ILC") for r in labels.itertuples()}
    folds = [(f.index, FoldData({p: list(f.part(p)) for p in ("train", "val", "test")}, target,
                                {s: s for s in target})) for f in read_splits_dir(tiny["splits"])]
    order = epoch_order([d.parts["train"] for _, d in folds], target, lambda s: True)
    bags = make_bags(store, sorted(target), "cpu", True)
    engine = FoldTrainer(cfg, *folds[0], bags, order, 8, 2, "cpu", training_plan(cfg))
    chunk = [0, 1, 2]
    x, mask = engine._step_bags(chunk, epoch=4)
    for b, k in enumerate(chunk):
        full = store.get(engine.order_ids[k]).features.float()
        rows = x[b][mask[b]] if mask is not None else x[b]
        assert len(rows) == max(1, round(0.5 * len(full)))
        # every kept row is a distinct row of the real bag, in the bag's order
        hits = [int(torch.nonzero((full == r).all(1)).flatten()[0]) for r in rows]
        assert hits == sorted(set(hits))
    x2, _ = engine._step_bags(chunk, epoch=5)
    assert not torch.equal(x, x2)  # a new draw each epoch


def test_sampled_training_is_reproducible_and_evaluates_whole_bags(tiny, tmp_path):
    runs = {}
    for mode in (False, True):
        run_cv(_cfg(tiny, tmp_path / str(mode), instance_sample=0.5, epochs=3, folds=(0,)))
        runs[mode] = pd.read_csv(tmp_path / str(mode) / "fold_0" / "predictions.csv")
    assert runs[False].equals(runs[True])
    # evaluation: the saved weights on the whole bag give the written probability
    store = BagStore(FeatureSpec.parse(f"{tiny['features']}@20x"), cache=False)
    state = torch.load(tmp_path / "False" / "fold_0" / "model.ckpt", weights_only=True)["state_dict"]
    head = build_model("abmil", 8, 2, **SMALL)
    head.load_state_dict(state)
    head.eval()
    preds = pd.read_csv(tmp_path / "False" / "fold_0" / "predictions.csv")
    for row in preds.itertuples():
        with torch.no_grad():
            p = torch.softmax(head(store.get(row.slide_id).features.float()[None]).logits, 1)[0, 1]
        assert float(p) == pytest.approx(row.prob, abs=1e-6)


def test_cli_records_instance_sample_and_refuses_bad_values(tiny, tmp_path, capsys):
    args = ["train-mil", "--features", f"{tiny['features']}@20x", "--labels", str(tiny["labels"]),
            "--splits", str(tiny["splits"]), "--epochs", "1", "--model-kwargs", json.dumps(SMALL)]
    assert cli.main([*args, "--out", str(tmp_path / "a"), "--instance-sample", "0.5", "--folds", "0"]) == 0
    err = capsys.readouterr().err  # the plan names the departure as an option
    assert "a random 50%  [--instance-sample (departs from every reference: all instances)]" in err
    assert json.loads((tmp_path / "a" / "config.json").read_text())["config"]["instance_sample"] == 0.5
    for bad in ("0", "1.5", "-0.1"):
        assert cli.main([*args, "--out", str(tmp_path / f"b{bad}"), "--instance-sample", bad]) == 2
        assert f"--instance-sample must be in (0, 1], got {float(bad)}" in capsys.readouterr().err
