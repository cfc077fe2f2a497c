"""DTFD-MIL against an oracle written here in numpy (float64) from Zhang et al. 2022's equations: pseudo-bags
of a shuffled bag, tier-1 gated attention per pseudo-bag, AFS distillation (the attention-pooled feature),
tier-2 gated attention over the distilled features; loss tier 2 + mean tier 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mil.registry import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max())
    return e / e.sum()


def _gated(h: np.ndarray, g) -> np.ndarray:
    """Gated attention scores (Ilse et al. 2018) [n]: w (tanh(V h) * sigmoid(U h)) + b."""
    v = np.tanh(h @ _np(g.attention_V[0].weight).T + _np(g.attention_V[0].bias))
    u = 1 / (1 + np.exp(-(h @ _np(g.attention_U[0].weight).T + _np(g.attention_U[0].bias))))
    return ((v * u) @ _np(g.attention_weights.weight).T + _np(g.attention_weights.bias))[:, 0]


def _ce(logits: np.ndarray, y: int) -> float:
    return float(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[y])


def dtfd_oracle(model, x: np.ndarray, y: int, perm: np.ndarray, groups: int = 4):
    """(bag logits [C], loss, attention [N]) for one bag split by ``perm`` into ``groups`` pseudo-bags."""
    feats, preds, weights = [], [], np.zeros(len(x))
    chunks = np.array_split(perm, min(groups, len(x)))
    for idx in chunks:
        mid = np.maximum(x[idx] @ _np(model.dim_reduction.fc1.weight).T, 0)  # Linear without bias + ReLU
        a = _softmax(_gated(mid, model.attention))
        f = a @ mid  # AFS: the distilled feature is the pseudo-bag's attention-pooled feature
        feats.append(f)
        preds.append(f @ _np(model.classifier.fc.weight).T + _np(model.classifier.fc.bias))
        weights[idx] = a
    feats = np.stack(feats)
    w2 = _softmax(_gated(feats, model.att_classifier.attention))
    logits = (w2 @ feats) @ _np(model.att_classifier.classifier.fc.weight).T + _np(model.att_classifier.classifier.fc.bias)
    loss = _ce(logits, y) + np.mean([_ce(p, y) for p in preds])
    for j, idx in enumerate(chunks):
        weights[idx] *= w2[j]
    return logits, loss, weights


@pytest.mark.parametrize("n", [11, 4, 3])
def test_dtfd_reproduces_the_papers_equations(n):
    torch.manual_seed(2)
    model = build_model("dtfd", 6, 3, dim=8, attn_dim=5).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    x = torch.randn(n, 6)
    y = torch.tensor(2)
    with torch.no_grad():
        out = model(x[None], None, y.view(1))
        loss = model.bag_losses(out, y.view(1))[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).numpy()  # the documented eval split
    logits, ref_loss, attention = dtfd_oracle(model, x.double().numpy(), 2, perm)
    np.testing.assert_allclose(out.logits[0].numpy(), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(out.attention[0].numpy(), attention, rtol=1e-5, atol=1e-7)
    assert abs(out.attention.sum() - 1) < 1e-5


def test_dtfd_tier2_does_not_train_tier1_and_the_split_is_redrawn():
    torch.manual_seed(0)
    model = build_model("dtfd", 6, 2, dim=8, attn_dim=4)
    x, y = torch.randn(13, 6), torch.tensor(1)
    out = model(x[None], None, y.view(1))
    ce_tier2 = -torch.log_softmax(out.logits, -1)[0, 1]
    ce_tier2.backward(retain_graph=True)
    assert model.dim_reduction.fc1.weight.grad is None or model.dim_reduction.fc1.weight.grad.abs().sum() == 0
    assert model.att_classifier.classifier.fc.weight.grad.abs().sum() > 0
    out.extra_loss.sum().backward()
    assert model.dim_reduction.fc1.weight.grad.abs().sum() > 0
    torch.manual_seed(1)
    first = model(x[None]).attention
    second = model(x[None]).attention
    assert not torch.allclose(first, second)  # training: a new random split every step
    model.eval()
    assert torch.equal(model(x[None]).attention, model(x[None]).attention)  # eval: the fixed split
