"""Every registered MIL head honours the one interface; CLAM/DSMIL details; the smooth top-1 SVM loss."""

from __future__ import annotations

import math

import pytest
import torch

from mil.losses import smooth_top1_svm
from mil.models import MIL_MODELS, MILOutput, build_model, register_model
from mil.module import bag_loss
from zoomfeat.commands.train_mil import MODEL_CHOICES
from zoomfeat.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"abmil": {"hidden": 16, "attn_dim": 8}, "clam_sb": {"hidden": 16, "attn_dim": 8},
         "clam_mb": {"hidden": 16, "attn_dim": 8}, "dsmil": {"query_dim": 8}, "mean": {"hidden": 16},
         "max": {"hidden": 16}}


def test_cli_choices_are_the_registry():
    assert tuple(sorted(MIL_MODELS)) == MODEL_CHOICES
    assert set(SMALL) == set(MIL_MODELS)


@pytest.mark.parametrize("name", sorted(MIL_MODELS))
@pytest.mark.parametrize("n", [1, 2, 37])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_every_head_forward_backward(name, n, n_classes):
    torch.manual_seed(0)
    model = build_model(name, 12, n_classes, **SMALL[name])
    x = torch.randn(n, 12)
    y = torch.tensor(n_classes - 1)
    out = model(x, y)
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (1, n_classes)
    assert out.attention.shape == (n,)
    assert torch.isfinite(out.attention).all()
    assert out.extra_loss is None or out.extra_loss.dim() == 0
    loss = bag_loss(model, out, y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    assert model(x).extra_loss is None  # no label, no auxiliary loss


def test_default_dimensions_follow_the_papers():
    abmil = build_model("abmil", 1024, 2)
    assert abmil.embed[0].out_features == 512 and abmil.embed[2].p == 0.25
    assert abmil.attention.tanh_gate[0].out_features == 256
    clam = build_model("clam_mb", 1024, 2)
    assert clam.k_sample == 8 and clam.bag_weight == 0.7 and len(clam.classifiers) == 2
    dsmil = build_model("dsmil", 1024, 2)
    assert dsmil.query[0].out_features == 128 and dsmil.query[2].out_features == 128
    assert dsmil.head.kernel_size == (1024,) and dsmil.bag_weight == 0.5


def test_attention_heads_sum_to_one():
    x = torch.randn(20, 12)
    for name in ("abmil", "clam_sb", "clam_mb", "dsmil", "mean"):
        out = build_model(name, 12, 2, **SMALL[name]).eval()(x)
        assert math.isclose(float(out.attention.detach().sum()), 1.0, rel_tol=1e-5), name


def test_clam_instance_loss_small_bags_and_subtyping():
    torch.manual_seed(0)
    clam = build_model("clam_sb", 12, 2, hidden=16, attn_dim=8)
    assert clam(torch.randn(1, 12), torch.tensor(1)).extra_loss is None  # k = min(8, N // 2) = 0
    assert clam(torch.randn(3, 12), torch.tensor(1)).extra_loss is not None  # k = 1
    # CLAM's reference code: without subtyping only the bag's class clusters; with subtyping the other
    # classes also get the top-attended instances as negatives, and the total is averaged over the classes
    torch.manual_seed(0)
    sub = build_model("clam_sb", 12, 2, hidden=16, attn_dim=8, subtyping=True)
    torch.manual_seed(0)
    full = build_model("clam_sb", 12, 2, hidden=16, attn_dim=8, subtyping=False)
    sub.eval(), full.eval()
    x, y = torch.randn(30, 12), torch.tensor(0)
    h = full.embed(x)
    attn = torch.softmax(full.attention(h).T, dim=1)
    own = full._cluster_loss(h, attn[0], full.instance_classifiers[0], True, 8)
    other = full._cluster_loss(h, attn[0], full.instance_classifiers[1], False, 8)
    assert torch.allclose(full(x, y).extra_loss, own)
    assert torch.allclose(sub(x, y).extra_loss, (own + other) / 2)


def test_clam_mb_subtyping_uses_each_class_branch_for_its_instance_loss():
    torch.manual_seed(0)
    clam = build_model("clam_mb", 12, 3, hidden=16, attn_dim=8, subtyping=True).eval()
    x, y = torch.randn(30, 12), torch.tensor(2)
    h = clam.embed(x)
    attn = torch.softmax(clam.attention(h).T, dim=1)  # [3, N]
    parts = [clam._cluster_loss(h, attn[c], clam.instance_classifiers[c], c == 2, 8) for c in range(3)]
    assert torch.allclose(clam(x, y).extra_loss, sum(parts) / 3)
    clam.subtyping = False
    assert torch.allclose(clam(x, y).extra_loss, parts[2])


def test_smooth_top1_svm_matches_its_formula_and_bounds_the_hinge():
    scores = torch.tensor([[2.0, 0.5], [0.0, 3.0], [1.0, 1.0]])
    target = torch.tensor([0, 0, 1])
    expected = torch.stack([torch.logsumexp(torch.tensor([0.0, 1 + 0.5 - 2.0]), 0),
                            torch.logsumexp(torch.tensor([0.0, 1 + 3.0]), 0),
                            torch.logsumexp(torch.tensor([1 + 1.0 - 1.0, 0.0]), 0)]).mean()
    assert torch.allclose(smooth_top1_svm(scores, target), expected)
    hinge = torch.tensor([0.0, 4.0, 1.0]).mean()  # max_j(alpha [j != y] + s_j) - s_y
    assert smooth_top1_svm(scores, target) >= hinge
    assert torch.allclose(smooth_top1_svm(scores, target, tau=1e-3), hinge, atol=1e-2)


def test_registry_rejects_unknown_names_bad_kwargs_and_duplicates():
    with pytest.raises(ConfigError, match="unknown MIL model 'nope'"):
        build_model("nope", 8, 2)
    with pytest.raises(ConfigError, match="bad model arguments for 'abmil'"):
        build_model("abmil", 8, 2, hiden=3)
    with pytest.raises(ValueError, match="registered twice"):
        register_model("abmil")(type("Dup", (torch.nn.Module,), {}))
