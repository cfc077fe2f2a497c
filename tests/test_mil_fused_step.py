"""The training steps written out (mil.models.gated_attention_step for ABMIL, clam_step for CLAM-SB/MB,
dsmil_step for DSMIL): their losses and gradients against autograd (of ABMIL's definition written here; of the
CLAM and DSMIL heads' own modules), the engine's results with them against the engine's autograd path, the
compiled step against the eager one, and the --compile option's boundaries."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import cli
import mil.models
from mil.bags import BagStore, FeatureSpec
from mil.config import MILConfig, make_protocol, training_plan
from mil.layers import compiled_step, fold_generators
from mil.losses import bag_loss
from mil.models import build_model, gated_attention_step
from mil.train import Engine, FoldData, epoch_order, make_bags
from mil_data import planted_cohort
from splits.io import read_splits_dir

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("w1", "b1", "wa", "ba", "wb", "bb", "wc", "bc", "wcls", "bcls")


def _definition(x, mask, label, weight, w1, b1, wa, ba, wb, bb, wc, bc, wcls, bcls, m1, ma, mb):
    """ABMIL (Ilse et al. 2018, gated attention) per fold and bag, weights [F, out, in]: h = Dropout(ReLU(x W1^T +
    b1)), scores = (Dropout(tanh(h Wa^T + ba)) * Dropout(sigmoid(h Wb^T + bb))) wc^T + bc, attention = softmax over
    the bag's real instances, logits = (attention h) Wcls^T + bcls; each fold's loss the weight-averaged
    cross-entropy of its bags."""
    folds, bags, n, _ = x.shape
    losses = []
    for f in range(folds):
        total = 0.0
        for b in range(bags):
            rows = slice(b * n, b * n + int(mask[b].sum()))  # the bag's real instances come first
            xb = x[f, b, :int(mask[b].sum())]
            h = torch.relu(xb @ w1[f].T + b1[f]) * m1[f, rows]
            gate = torch.tanh(h @ wa[f].T + ba[f]) * ma[f, rows] * torch.sigmoid(h @ wb[f].T + bb[f]) * mb[f, rows]
            a = torch.softmax((gate @ wc[f].T + bc[f])[:, 0], dim=0)
            logits = (a @ h) @ wcls[f].T + bcls[f]
            total = total + weight[f, b] * -torch.log_softmax(logits, dim=0)[label[b]]
        losses.append(total / weight[f].sum())
    return torch.stack(losses)


def _case(dtype=torch.float64, folds=2):
    g = torch.Generator().manual_seed(3)
    bags, n, d, hidden, attn, classes = 2, 7, 5, 6, 4, 3
    shapes = {"w1": (hidden, d), "b1": (hidden,), "wa": (attn, hidden), "ba": (attn,), "wb": (attn, hidden),
              "bb": (attn,), "wc": (1, attn), "bc": (1,), "wcls": (classes, hidden), "bcls": (classes,)}
    values = {k: torch.randn(folds, *s, generator=g, dtype=dtype) for k, s in shapes.items()}
    x = torch.randn(folds, bags, n, d, generator=g, dtype=dtype)
    mask = torch.zeros(bags, n, dtype=torch.bool)
    mask[0, :7], mask[1, :4] = True, True
    x[:, 1, 4:] = 0.0  # padding, as mil.cache.pad_bags writes it
    label = torch.tensor([2, 0])
    weight = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=dtype)[:folds]  # fold 1 does not train on bag 0
    scale = 4 / 3
    masks = [(torch.rand(folds, bags * n, k, generator=g) > 0.25).to(dtype) * scale for k in (hidden, attn, attn)]
    return x, mask, label, weight, values, masks, scale


def _held(values):
    """Leaves laid out as the engine holds them ([F, in, out] weights) and their bound [F, out, in] views."""
    held = {k: (v.transpose(1, 2).contiguous() if k.startswith("w") else v.clone()) for k, v in values.items()}
    return held, [held[k].transpose(1, 2) if k.startswith("w") else held[k] for k in NAMES]


def test_written_out_abmil_step_matches_autograd_of_the_definition():
    x, mask, label, weight, values, masks, scale = _case()
    ref = {k: v.clone().requires_grad_(True) for k, v in values.items()}
    want_loss = _definition(x, mask, label, weight, *ref.values(), *masks)
    want = torch.autograd.grad(want_loss.sum(), list(ref.values()))
    held, bound = _held(values)
    loss, grads = gated_attention_step(x, mask, label, weight, *bound, *masks, scale, None)
    assert torch.allclose(loss, want_loss.detach(), atol=1e-12)
    for name, got, expected in zip(NAMES, grads, want):
        assert got.shape == expected.shape, name
        assert torch.allclose(got, expected, atol=1e-10), name
        if name.startswith("w") and name != "wc":  # weight gradients come laid out as the held weights
            assert got.transpose(1, 2).is_contiguous(), name
    assert float(grads[0][1].abs().sum()) > 0  # fold 1 trains on its one bag


def test_written_out_step_without_dropout_and_with_bf16_products():
    x, mask, label, weight, values, _, _ = _case(torch.float32)
    ones = [torch.ones(2, 14, k) for k in (6, 4, 4)]
    ref = {k: v.clone().requires_grad_(True) for k, v in values.items()}
    want_loss = _definition(x, mask, label, weight, *ref.values(), *ones)
    want = torch.autograd.grad(want_loss.sum(), list(ref.values()))
    _, bound = _held(values)
    for low, tol in ((None, 1e-5), (torch.bfloat16, 5e-2)):
        loss, grads = gated_attention_step(x, mask, label, weight, *bound, None, None, None, 1.0, low)
        assert loss.dtype == torch.float32 and torch.allclose(loss, want_loss.detach(), rtol=tol, atol=tol)
        for name, got, expected in zip(NAMES, grads, want):
            if name == "bc":  # softmax ignores the score bias: both gradients are float32 rounding (~1e-7)
                assert float(got.abs().max()) < 1e-5
                continue
            assert torch.allclose(got, expected, rtol=tol, atol=tol * float(expected.abs().max())), (name, low)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return planted_cohort(tmp_path_factory.mktemp("fused"), n_slides=20, dim=8, sizes=(4, 9))


def _engine(paths, model: str = "abmil", **kw) -> tuple[Engine, BagStore]:
    labels = pd.read_csv(paths["labels"])
    target = {r.slide_id: int(r.label == "ILC") for r in labels.itertuples()}
    folds = [(f.index, FoldData({p: list(f.part(p)) for p in ("train", "val", "test")}, target,
                                {s: s for s in target})) for f in read_splits_dir(paths["splits"])]
    kwargs = {"query_dim": 4} if model == "dsmil" else {"hidden": 8, "attn_dim": 4}
    cfg = MILConfig(features=f"{paths['features']}@20x", labels=str(paths["labels"]), splits=str(paths["splits"]),
                    out="/tmp/unused", model=model, model_kwargs=kwargs,
                    protocol=make_protocol("hipt", epochs=2, lr=1e-2), **kw)
    store = BagStore(FeatureSpec.parse(cfg.features), cache=False)
    order = epoch_order([d.parts["train"] for _, d in folds], target, lambda s: True)
    return Engine(cfg, folds[:3], make_bags(store, sorted(target), "cpu", True), order, 8, 2, "cpu",
                  training_plan(cfg)), store


@pytest.mark.parametrize("model,bags", [("abmil", 1), ("abmil", 3), ("clam_sb", 1), ("clam_mb", 3), ("dsmil", 2)])
def test_engine_with_the_written_out_step_trains_as_its_autograd_path(tiny, model, bags):
    """Three folds stacked, dropout on: the same dropout masks (drawn in the modules' order), the same weights
    after two epochs up to rounding, whether the step is the head's written-out one or autograd of its modules."""
    states = []
    for fused in (True, False):
        engine, _ = _engine(tiny, model, all_folds=True, bags_per_step=bags)
        assert engine.fused is not None
        if not fused:
            engine.fused = None  # the generic path: autograd through the head's modules
        for epoch in range(2):
            engine.train_epoch(epoch)
        states.append([engine.fold_state_dict(r) for r in range(3)])
    moved = 0.0
    init = _engine(tiny, model)[0].fold_state_dict(0)
    for a, b in zip(*states):
        for name in a:
            if name == "attention.score.bias":  # softmax ignores it: its gradient, and so its Adam step, is rounding
                continue
            assert torch.allclose(a[name], b[name], atol=1e-5), name
            moved = max(moved, float((a[name] - init[name]).abs().max()))
    assert moved > 1e-2  # training did move the weights


def _compiler_missing() -> bool:
    return not any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(_compiler_missing(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_step_gives_the_eager_numbers_and_each_fold_its_own_whatever_the_folds():
    x, mask, label, weight, values, masks, scale = _case(torch.float32)
    _, bound = _held(values)
    both = (x, mask, label, weight, *bound, *masks)
    first = [t if t is mask or t is label else t[:1] for t in both]  # fold 0 alone
    compiled = compiled_step(gated_attention_step)
    runs = {(name, folds): fn(*args, scale, None) for name, fn in (("eager", gated_attention_step),
                                                                    ("compiled", compiled))
            for folds, args in ((2, both), (1, first))}
    for folds in (2, 1):
        (loss, grads), (want_loss, want) = runs["compiled", folds], runs["eager", folds]
        assert torch.allclose(loss, want_loss, atol=1e-6)
        for name, a, b in zip(NAMES, grads, want):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), (name, folds)
    for name in ("eager", "compiled"):  # the --all-folds rule: fold 0's numbers, bit for bit, with or without fold 1
        (loss2, grads2), (loss1, grads1) = runs[name, 2], runs[name, 1]
        assert torch.equal(loss2[:1], loss1) and all(torch.equal(a[:1], b) for a, b in zip(grads2, grads1)), name


def _args(paths, out: Path, *extra) -> list[str]:
    return ["train-mil", "--features", f"{paths['features']}@20x", "--labels", str(paths["labels"]),
            "--splits", str(paths["splits"]), "--epochs", "1", "--folds", "0", "--out", str(out),
            "--model-kwargs", '{"hidden": 8, "attn_dim": 4}', *extra]


def test_compile_refuses_a_head_it_does_not_apply_to_and_names_a_failed_compile(tiny, tmp_path, capsys,
                                                                                  monkeypatch):
    for model, kwargs in (("dsmil", '{"query_dim": 4}'), ("clam_sb", '{"hidden": 8, "attn_dim": 4}')):
        assert cli.main(_args(tiny, tmp_path / "a", "--compile", "--model", model, "--model-kwargs", kwargs)) == 2
        assert ("--compile applies to the heads whose written-out training step compiles to one graph (abmil), "
                f"not {model}; drop --compile") in capsys.readouterr().err

    def broken(fn):
        def call(*args):
            raise RuntimeError("CppCompileError: C++ compile error\nlong compiler output")
        return call

    monkeypatch.setattr(mil.models, "compiled_step", broken)
    assert cli.main(_args(tiny, tmp_path / "b", "--compile")) == 2
    err = capsys.readouterr().err
    assert "--compile: torch.compile failed (CppCompileError: C++ compile error)" in err and "Traceback" not in err
    assert not list((tmp_path / "b").glob("fold_*/metrics.json"))  # nothing written as if it had trained


def _bind(head, tensors):
    for name, value in tensors.items():
        module = head.get_submodule(name.rpartition(".")[0])
        module._parameters[name.rpartition(".")[2]] = value


def _clam_case(name: str, subtyping: bool, dropout: float):
    torch.manual_seed(0)
    classes = 3 if subtyping else 2
    head = build_model(name, 5, classes, hidden=6, attn_dim=4, dropout=dropout, k_sample=2,
                       subtyping=subtyping).double().train()
    stacked = {n: p.detach().unsqueeze(0).repeat(2, *([1] * p.dim())) + 0.1 * torch.randn(2, *p.shape,
                                                                                           dtype=torch.float64)
               for n, p in head.named_parameters()}
    x = torch.randn(2, 3, 9, 5, dtype=torch.float64)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:], mask[2, 3:] = False, False  # bag 2 has 3 instances: k = 1 for it, 2 for the others
    x[:, 1, 5:], x[:, 2, 3:] = 0.0, 0.0
    label = torch.tensor([1, 0, 2 if subtyping else 1])
    weight = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    return head, stacked, x, mask, label, weight


def _fold_by_fold_autograd(head, stacked, x, mask, label, weight):
    """The oracle: autograd of the plain head, one fold and one bag at a time (its modules, unstacked, its own
    auxiliary loss), each fold's loss the weighted mean of its bags' as the engine weights a step's bags."""
    want = {n: torch.zeros_like(v) for n, v in stacked.items()}
    losses = []
    for f in range(x.shape[0]):
        for n, p in head.named_parameters():
            p.data = stacked[n][f].clone()
        head.zero_grad()
        total = sum(weight[f, b] * bag_loss(head, head(x[f, b, :int(mask[b].sum())], label[b]), label[b])
                    for b in range(x.shape[1])) / weight[f].sum()
        total.backward()
        losses.append(float(total))
        for n, p in head.named_parameters():
            want[n][f] = p.grad
    return torch.tensor(losses, dtype=torch.float64), want


def _bound_as_engine(stacked, linear_weights):
    """Stacked parameters as the engine binds them: Linear weights [F, out, in] views of tensors held [F, in, out]."""
    return {n: v.transpose(-1, -2).contiguous().transpose(-1, -2) if n in linear_weights else v
            for n, v in stacked.items()}


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb"])
@pytest.mark.parametrize("subtyping", [False, True])
def test_written_out_clam_step_matches_autograd_of_the_head_fold_by_fold(name, subtyping):
    """Without dropout, against autograd of the plain head fold by fold and bag by bag."""
    head, stacked, x, mask, label, weight = _clam_case(name, subtyping, 0.0)
    want_loss, want = _fold_by_fold_autograd(head, stacked, x, mask, label, weight)
    _bind(head, _bound_as_engine(stacked, {n for n, v in stacked.items() if v.dim() == 3}))  # every Linear weight
    loss, grads = head.fused_step(x, mask, label, weight)
    assert torch.allclose(loss, want_loss, atol=1e-12)
    assert set(grads) == set(want)
    for n, g in want.items():
        assert torch.allclose(grads[n], g, atol=1e-12), n


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb"])
def test_written_out_clam_step_draws_the_modules_masks(name):
    """With dropout: against autograd through the stacked head's modules with the same fold generators."""
    head, stacked, x, mask, label, weight = _clam_case(name, True, 0.25)
    leaf = {n: v.clone().requires_grad_(True) for n, v in stacked.items()}
    _bind(head, leaf)
    with fold_generators([torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]):
        per = (head.bag_losses(head.forward_bags(x, mask, label), label) * weight).sum(-1) / weight.sum(-1)
    want = torch.autograd.grad(per.sum(), list(leaf.values()), materialize_grads=True)
    _bind(head, stacked)
    with fold_generators([torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]):
        loss, grads = head.fused_step(x, mask, label, weight)
    assert torch.allclose(loss, per.detach(), atol=1e-12)
    for n, g in zip(leaf, want):
        assert torch.allclose(grads[n], g, atol=1e-12), n
    assert float(grads["instance_classifiers.2.weight"].abs().sum()) > 0  # the instance loss reached them


@pytest.mark.parametrize("classes,negative_stream", [(2, True), (3, True), (2, False)])
def test_written_out_dsmil_step_matches_autograd_of_the_head_fold_by_fold(classes, negative_stream):
    torch.manual_seed(0)
    head = build_model("dsmil", 5, classes, query_dim=4, negative_stream=negative_stream).double().train()
    stacked = {n: p.detach().unsqueeze(0).repeat(2, *([1] * p.dim())) + 0.3 * torch.randn(2, *p.shape,
                                                                                           dtype=torch.float64)
               for n, p in head.named_parameters()}
    _, _, x, mask, label, weight = _clam_case("clam_sb", False, 0.0)
    label = torch.tensor([1, 0, classes - 1])
    want_loss, want = _fold_by_fold_autograd(head, stacked, x, mask, label, weight)
    _bind(head, _bound_as_engine(stacked, {"instance_classifier.weight", "query.0.weight", "query.2.weight"}))
    loss, grads = head.fused_step(x, mask, label, weight)
    assert torch.allclose(loss, want_loss, atol=1e-12)
    assert set(grads) == set(want)
    for n, g in want.items():
        assert torch.allclose(grads[n], g, atol=1e-12), n


def test_dsmil_with_a_value_mlp_or_in_bf16_trains_through_autograd(tiny):
    assert build_model("dsmil", 5, 2, query_dim=4).fused_step is not None
    assert build_model("dsmil", 5, 2, query_dim=4, passing_v=True).fused_step is None
    assert _engine(tiny, "dsmil", precision="fp32")[0].fused is not None
    assert _engine(tiny, "dsmil", precision="bf16")[0].fused is None  # autocast keeps bf16 products
    assert _engine(tiny, "abmil", precision="bf16")[0].fused is not None  # its step casts them itself
