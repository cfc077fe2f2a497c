"""The fast training paths give the numbers of the plain ones: all folds at once = folds one by one (bit for
bit), one bag per step = a plain per-bag Adam loop, several padded bags per step = the mean of the bags'
gradients. Speed itself is measured in benchmarks/bench_mil.py."""

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
from mil.models import build_model
from mil.losses import bag_loss
from mil.train import Engine, FoldData, epoch_order, make_bags
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


@pytest.mark.parametrize("model,bags,protocol,kwargs", [
    ("abmil", 1, "simil", {}), ("clam_mb", 2, "clam", {}), ("dsmil", 1, "hipt", {}),
    ("dsmil", 2, "simil", {"negative_stream": False}),
    pytest.param("transmil", 1, "hipt", {}, marks=pytest.mark.slow), ("dtfd", 1, "hipt", {}),
    ("clam_sb", 3, "simil", {})])
@pytest.mark.slow
def test_all_folds_at_once_is_bit_identical_to_one_by_one(tiny, tmp_path, model, bags, protocol, kwargs):
    extra = {"min_epochs": 1, "patience": 1} if protocol == "clam" else {}  # folds stop at different epochs
    runs = {}
    for mode in (False, True):
        cfg = _cfg(tiny, tmp_path / str(mode), model, all_folds=mode, bags_per_step=bags, model_kwargs=kwargs,
                   protocol=protocol, epochs=5 if protocol == "clam" else 2)
        if extra:
            from dataclasses import replace
            cfg = replace(cfg, protocol=replace(cfg.protocol, **extra))
        run_cv(cfg)
        runs[mode] = _outputs(tmp_path / str(mode))
    (p1, m1, s1), (p2, m2, s2) = runs[False], runs[True]
    assert p1.equals(p2)  # every probability, bit for bit
    assert m1 == m2
    assert all(torch.equal(a[k], b[k]) for a, b in zip(s1, s2) for k in a)
    assert p1.prob.nunique() > 4  # the runs did learn something fold-specific


def _fold(paths) -> tuple[list[tuple[int, FoldData]], dict[str, int]]:
    labels = pd.read_csv(paths["labels"])
    target = {r.slide_id: int(r.label == "ILC") for r in labels.itertuples()}
    folds = [(f.index, FoldData({p: list(f.part(p)) for p in ("train", "val", "test")}, target,
                                {s: s for s in target})) for f in read_splits_dir(paths["splits"])]
    return folds, target


def test_one_bag_per_step_is_a_plain_adam_loop(tiny):
    """Engine with one bag per step against the loop of CLAM's/DSMIL's scripts written here: model(x), loss,
    zero_grad, backward, torch.optim.Adam step, over the fold's bags in the epoch order."""
    folds, target = _fold(tiny)
    cfg = _cfg(tiny, Path("/tmp/unused"), "clam_sb", protocol="hipt", epochs=2)
    cfg = MILConfig(**{**cfg.__dict__, "model_kwargs": {"hidden": 8, "attn_dim": 4, "dropout": 0.0}})
    store = BagStore(FeatureSpec.parse(cfg.features), cache=False)
    bags = make_bags(store, sorted(target), "cpu", True)
    order = epoch_order([d.parts["train"] for _, d in folds], target, lambda s: True)
    engine = Engine(cfg, folds[:1], bags, order, 8, 2, "cpu", training_plan(cfg))
    for epoch in range(2):
        engine.train_epoch(epoch)
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
            loss = bag_loss(model, model(x, y), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    trained = engine.fold_state_dict(0)
    for name, p in model.named_parameters():
        if name == "attention.score.bias":  # softmax ignores it: its gradient, and so its Adam step, is rounding
            continue
        assert torch.allclose(trained[name], p.detach(), atol=1e-5), name


@pytest.mark.parametrize("model", ["abmil", "clam_mb", "dsmil", "max"])
def test_padded_step_gradient_is_the_mean_of_the_bags_gradients(model):
    torch.manual_seed(0)
    head = build_model(model, 6, 2, **{**SMALL[model], **({"dropout": 0.0} if model != "dsmil" else {})})
    bags = [torch.randn(n, 6) for n in (3, 11, 6)]
    y = torch.tensor([1, 0, 1])
    x = torch.zeros(3, 11, 6)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, :len(b)], mask[i, :len(b)] = b, True
    head.bag_losses(head.forward_bags(x, mask, y), y).mean().backward()
    batched = {n: p.grad.clone() for n, p in head.named_parameters()}
    head.zero_grad()
    for i, b in enumerate(bags):
        (bag_loss(head, head(b, y[i]), y[i]) / 3).backward()
    for n, p in head.named_parameters():
        assert torch.allclose(batched[n], p.grad, atol=1e-6), n


def test_cli_speed_options_and_refusals(tiny, tmp_path, capsys):
    args = ["train-mil", "--features", f"{tiny['features']}@20x", "--labels", str(tiny["labels"]),
            "--splits", str(tiny["splits"]), "--epochs", "1", "--model-kwargs", '{"hidden": 8, "attn_dim": 4}']
    assert cli.main([*args, "--out", str(tmp_path / "a"), "--all-folds", "--bags-per-step", "2"]) == 0
    record = json.loads((tmp_path / "a" / "config.json").read_text())["config"]
    assert record["all_folds"] is True and record["bags_per_step"] == 2
    assert cli.main([*args, "--out", str(tmp_path / "b"), "--model", "transmil", "--bags-per-step", "2",
                     "--model-kwargs", '{"dim": 8, "heads": 2}']) == 2
    assert "transmil takes at most 1 bag per step" in capsys.readouterr().err
    assert cli.main([*args, "--out", str(tmp_path / "c"), "--all-folds", "--balanced"]) == 2
    assert "drop --balanced" in capsys.readouterr().err
    assert cli.main([*args, "--out", str(tmp_path / "d"), "--precision", "fp8"]) == 2
    assert "unknown --precision 'fp8'" in capsys.readouterr().err


def test_fold_adam_steps_a_transposed_gradient_like_torch_adam():
    """Linear weights are held transposed and their gradients may come strided: each fold's update must equal
    torch.optim.Adam's (the fused kernel alone applies a strided gradient to the wrong elements)."""
    from mil.config import RECIPES
    from mil.optim import FoldOptimizer

    torch.manual_seed(0)
    start = torch.randn(2, 3, 5)
    grad = torch.randn(2, 5, 3).transpose(1, 2)  # [F, 3, 5], strided like a bmm weight gradient
    opt = FoldOptimizer({"w": start.clone()}, RECIPES["abmil"], 1e-1, 1e-4)
    opt.step({"w": grad}, [0, 1], 1e-1)
    for k in range(2):
        p = torch.nn.Parameter(start[k].clone())
        ref = torch.optim.Adam([p], lr=1e-1, betas=RECIPES["abmil"].betas, weight_decay=1e-4, foreach=False)
        p.grad = grad[k].contiguous()
        ref.step()
        assert torch.allclose(opt.params["w"][k], p.detach(), atol=1e-6)


def test_retain_freed_memory_sets_glibc_malloc_once():
    import platform

    from mil.train import retain_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True  # once per process (cached), still reported as set
