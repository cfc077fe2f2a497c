"""The training loop gives the numbers of the plain one: one bag per step = a plain per-bag Adam loop; a fold's
numbers do not depend on the other folds of the run. (Several padded bags per step = the mean of the bags'
gradients: tests/test_mil_models.py.) Speed itself is measured in benchmarks/bench_mil.py."""

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
from mil.losses import bag_loss
from mil.train import FoldData, FoldTrainer, epoch_order, make_bags
from mil_data import planted_cohort
from splits.io import read_splits_dir

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"abmil": {"hidden": 8, "attn_dim": 4}, "clam_sb": {"hidden": 8, "attn_dim": 4},
         "clam_mb": {"hidden": 8, "attn_dim": 4}, "dsmil": {"query_dim": 4}, "transmil": {"dim": 8, "heads": 2},
         "dtfd": {"dim": 8, "attn_dim": 4}, "mean": {"hidden": 8}, "max": {"hidden": 8}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return planted_cohort(tmp_path_factory.mktemp("speed"), n_slides=20, dim=8, sizes=(4, 9))


def _cfg(paths, out: Path, model: str, **kw) -> MILConfig:
    protocol = make_protocol(kw.pop("protocol", "simil"), epochs=kw.pop("epochs", 2), lr=1e-2)
    kwargs = {**SMALL[model], **kw.pop("model_kwargs", {})}
    return MILConfig(features=f"{paths['features']}@20x", labels=str(paths["labels"]), splits=str(paths["splits"]),
                     out=str(out), model=model, model_kwargs=kwargs, protocol=protocol, **kw)


def _outputs(run: Path) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    folds = sorted(int(p.name.split("_")[1]) for p in run.glob("fold_*"))
    preds = pd.concat([pd.read_csv(run / f"fold_{k}" / "predictions.csv") for k in folds])
    metrics = [json.loads((run / f"fold_{k}" / "metrics.json").read_text()) for k in folds]
    states = [torch.load(run / f"fold_{k}" / "model.ckpt", weights_only=True)["state_dict"] for k in folds]
    return preds, metrics, states


def test_a_fold_gets_the_same_numbers_whichever_folds_train_with_it(tiny, tmp_path):
    """Fold 1 trained alone (``--folds 1``) and after fold 0 in one run: the same weights and predictions, bit for
    bit (each fold seeds its own init, dropout and random splits; the epoch order runs over every fold's
    training slides)."""
    runs = {}
    for folds in ((1,), (0, 1)):
        out = tmp_path / "-".join(map(str, folds))
        run_cv(_cfg(tiny, out, "clam_mb", bags_per_step=2, protocol="clam", folds=folds, epochs=2))
        runs[folds] = _outputs(out)
    (p1, m1, s1), (p2, m2, s2) = runs[(1,)], runs[(0, 1)]
    assert p1.reset_index(drop=True).equals(p2.iloc[len(p2) - len(p1):].reset_index(drop=True))
    assert m1[0] == m2[1]
    assert all(torch.equal(s1[0][k], s2[1][k]) for k in s1[0])
    assert p2.prob.nunique() > 4  # the runs did learn something fold-specific


def _fold(paths) -> tuple[list[tuple[int, FoldData]], dict[str, int]]:
    labels = pd.read_csv(paths["labels"])
    target = {r.slide_id: int(r.label == "ILC") for r in labels.itertuples()}
    folds = [(f.index, FoldData({p: list(f.part(p)) for p in ("train", "val", "test")}, target,
                                {s: s for s in target})) for f in read_splits_dir(paths["splits"])]
    return folds, target


def test_one_bag_per_step_is_a_plain_adam_loop(tiny):
    """FoldTrainer with one bag per step against the loop of CLAM's/DSMIL's scripts written here: model(x), loss,
    zero_grad, backward, torch.optim.Adam step, over the fold's bags in the epoch order."""
    folds, target = _fold(tiny)
    cfg = _cfg(tiny, Path("/tmp/unused"), "clam_sb", protocol="hipt", epochs=2)
    cfg = MILConfig(**{**cfg.__dict__, "model_kwargs": {"hidden": 8, "attn_dim": 4, "dropout": 0.0}})
    store = BagStore(FeatureSpec.parse(cfg.features), cache=False)
    bags = make_bags(store, sorted(target), "cpu", True)
    order = epoch_order([d.parts["train"] for _, d in folds], target, lambda s: True)
    trainer = FoldTrainer(cfg, *folds[0], bags, order, 8, 2, "cpu", training_plan(cfg))
    for epoch in range(2):
        trainer.train_epoch(epoch)
    torch.manual_seed(cfg.seed)
    model = build_model("clam_sb", 8, 2, hidden=8, attn_dim=4, dropout=0.0, subtyping=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-5)
    ids, perm_gen = list(order), torch.Generator().manual_seed(cfg.seed)
    train = set(folds[0][1].parts["train"])
    for _ in range(2):
        for i in torch.randperm(len(ids), generator=perm_gen).tolist():
            if ids[i] not in train:
                continue
            x, y = store.get(ids[i]).features, torch.tensor(target[ids[i]])
            loss = bag_loss(model, model(x[None], None, y.view(1)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    trained = trainer.state_dict()
    for name, p in model.named_parameters():
        if name == "attention.score.bias":  # softmax ignores it: its gradient, and so its Adam step, is rounding
            continue
        assert torch.allclose(trained[name], p.detach(), atol=1e-5), name


def test_cli_speed_options_and_refusals(tiny, tmp_path, capsys):
    args = ["train-mil", "--features", f"{tiny['features']}@20x", "--labels", str(tiny["labels"]),
            "--splits", str(tiny["splits"]), "--epochs", "1", "--model-kwargs", '{"hidden": 8, "attn_dim": 4}']
    assert cli.main([*args, "--out", str(tmp_path / "a"), "--folds", "0", "--bags-per-step", "2"]) == 0
    record = json.loads((tmp_path / "a" / "config.json").read_text())["config"]
    assert record["bags_per_step"] == 2
    assert cli.main([*args, "--out", str(tmp_path / "d"), "--precision", "fp8"]) == 2
    assert "unknown --precision 'fp8'" in capsys.readouterr().err
    assert cli.main([*args, "--out", str(tmp_path / "e"), "--bags-per-step", "0"]) == 2
    assert "--bags-per-step must be >= 1" in capsys.readouterr().err


def test_retain_freed_memory_sets_glibc_malloc_once():
    import platform

    from mil.train import retain_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True  # once per process (cached), still reported as set
