"""TransMIL against an oracle written here in numpy (float64) from the papers' equations: Shao et al. 2021
(square padding, class token, two TransLayers around PPEG) and Xiong et al. 2021 (Nystrom attention with
segment-mean landmarks and the iterative pseudo-inverse), on a fixed tiny case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mil.registry import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _layer_norm(x: np.ndarray, ln) -> np.ndarray:
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + ln.eps) * _np(ln.weight) + _np(ln.bias)


def _conv2d_depthwise(img: np.ndarray, w: np.ndarray, bias, pad: tuple[int, int]) -> np.ndarray:
    """img [C, H, W], w [C, kh, kw]: cross-correlation with zero padding, one filter per channel."""
    c, h, wd = img.shape
    padded = np.zeros((c, h + 2 * pad[0], wd + 2 * pad[1]))
    padded[:, pad[0]:pad[0] + h, pad[1]:pad[1] + wd] = img
    out = np.zeros_like(img)
    for r in range(h):
        for col in range(wd):
            out[:, r, col] = (padded[:, r:r + w.shape[1], col:col + w.shape[2]] * w).sum((1, 2))
    return out if bias is None else out + bias[:, None, None]


def _pinv(a: np.ndarray, iterations: int) -> np.ndarray:
    """Iterative pseudo-inverse (Razavi et al. 2014, as in Nystromformer): Z0 = A^T / (||A||_1 ||A||_inf) with
    the norms' maxima taken over every head of the bag (as TransMIL computes it), then
    Z <- 1/4 Z (13 I - A Z (15 I - A Z (7 I - A Z)))."""
    z = np.transpose(a, (0, 2, 1)) / (np.abs(a).sum(-1).max() * np.abs(a).sum(-2).max())
    eye = np.eye(a.shape[-1])
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _nystrom(x: np.ndarray, attn, cls_row: bool, cls_conv: bool = True):
    """Nystrom attention of one sequence x [n, dim], the class token first; returns (out [n, dim], cls row
    [heads, n] or None). ``cls_conv=False``: no value convolution at the class token's position."""
    n, heads, d, m = x.shape[0], attn.heads, attn.dim_head, attn.landmarks
    pad = (m - n % m) % m
    x = np.concatenate([np.zeros((pad, x.shape[1])), x])
    qkv = x @ _np(attn.to_qkv.weight).T
    q, k, v = qkv[:, :heads * d], qkv[:, heads * d:2 * heads * d], qkv[:, 2 * heads * d:]
    split = lambda t: t.reshape(len(x), heads, d).transpose(1, 0, 2)  # noqa: E731  [heads, n', d]
    q, k, v = split(q) * d ** -0.5, split(k), split(v)
    seg = len(x) // m
    q_land = q.reshape(heads, m, seg, d).mean(2)
    k_land = k.reshape(heads, m, seg, d).mean(2)
    f1 = _softmax(q @ k_land.transpose(0, 2, 1))
    z = _pinv(_softmax(q_land @ k_land.transpose(0, 2, 1)), attn.pinv_iterations)
    f3 = _softmax(q_land @ k.transpose(0, 2, 1))
    res = _conv2d_depthwise(v, _np(attn.res_conv.weight)[:, 0], None, attn.res_conv.padding)
    if not cls_conv:
        res[:, pad] = 0.0
    out = f1 @ z @ (f3 @ v) + res  # [heads, n', d]
    out = out.transpose(1, 0, 2).reshape(len(x), heads * d)
    out = (out @ _np(attn.to_out[0].weight).T + _np(attn.to_out[0].bias))[pad:]
    row = (f1[:, pad:pad + 1] @ z @ f3)[:, 0, pad:] if cls_row else None  # [heads, n]
    return out, row


def _ppeg(t: np.ndarray, ppeg, side: int) -> np.ndarray:
    cls, feat = t[:1], t[1:]
    grid = feat.T.reshape(-1, side, side)  # token r * side + c -> grid[:, r, c]
    out = grid.copy()
    for conv in (ppeg.proj, ppeg.proj1, ppeg.proj2):
        out += _conv2d_depthwise(grid, _np(conv.weight)[:, 0], _np(conv.bias), conv.padding)
    return np.concatenate([cls, out.reshape(out.shape[0], -1).T])


def transmil_oracle(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits [C], attention [N]) of TransMIL on one bag, in float64."""
    conv = model.class_token_residual
    n = len(x)
    h = np.maximum(x @ _np(model._fc1[0].weight).T + _np(model._fc1[0].bias), 0)
    side = math.ceil(math.sqrt(n))
    h = np.concatenate([h, h[:side * side - n]])  # pad to a square by repeating the first tokens
    t = np.concatenate([_np(model.cls_token)[0], h])
    out, _ = _nystrom(_layer_norm(t, model.layer1.norm), model.layer1.attn, False, conv)
    t = _ppeg(t + out, model.pos_layer, side)
    out, row = _nystrom(_layer_norm(t, model.layer2.norm), model.layer2.attn, True, conv)
    t = t + out
    logits = _layer_norm(t, model.norm)[0] @ _np(model._fc2.weight).T + _np(model._fc2.bias)
    return logits, row.mean(0)[1:n + 1]


@pytest.mark.parametrize("class_token_residual", [True, False])
@pytest.mark.parametrize("n", [7, 2, 19])
def test_transmil_reproduces_the_papers_equations(n, class_token_residual):
    torch.manual_seed(3)
    model = build_model("transmil", 6, 3, dim=8, heads=2,  # landmarks = dim / 2 = 4
                        class_token_residual=class_token_residual).eval()
    for p in model.parameters():  # larger weights than the init, so every part moves the output
        p.data.normal_(0, 0.5)
    x = torch.randn(n, 6)
    with torch.no_grad():
        out = model(x[None])
    logits, attention = transmil_oracle(model, x.double().numpy())
    np.testing.assert_allclose(out.logits[0].numpy(), logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.attention[0].numpy(), attention, rtol=1e-4, atol=1e-5)


def test_the_class_token_residual_reads_the_first_instances_by_position():
    """The reference's value convolution (kernel 33) at the class token reads the bag's first instances by
    position: moving one instance from the front of the bag to the back changes the logits (with no dropout,
    the rest of the head is nearly order-free). Without it at the class token the change is far smaller."""
    torch.manual_seed(1)
    x = torch.randn(40, 6)
    x[0] += 20.0  # one distinct instance, first in the bag
    moved = torch.cat([x[1:], x[:1]])
    change = {}
    for flag in (True, False):
        torch.manual_seed(2)
        model = build_model("transmil", 6, 2, dim=16, heads=2, landmarks=64, class_token_residual=flag).eval()
        with torch.no_grad():
            for conv in (model.pos_layer.proj, model.pos_layer.proj1, model.pos_layer.proj2):
                conv.weight.zero_()  # PPEG off, so only the value convolution sees the order
                conv.bias.zero_()
            change[flag] = float((model(x[None]).logits - model(moved[None]).logits).abs().max())
    assert change[True] > 10 * change[False]


def test_train_mil_builds_transmil_without_the_class_token_residual(tmp_path):
    from mil.config import MILConfig, effective_model_kwargs

    cfg = MILConfig(features=f"{tmp_path}@20x", labels="l.csv", splits=str(tmp_path), out=str(tmp_path / "o"),
                    model="transmil")
    assert effective_model_kwargs(cfg)["class_token_residual"] is False
    explicit = MILConfig(features=f"{tmp_path}@20x", labels="l.csv", splits=str(tmp_path), out=str(tmp_path / "o"),
                         model="transmil", model_kwargs={"class_token_residual": True})
    assert effective_model_kwargs(explicit)["class_token_residual"] is True


def test_iterative_pinv_approaches_the_pseudo_inverse():
    """The scheme converges to numpy's pinv (20 iterations); TransMIL's 6 match the oracle's 6."""
    from mil.heads.transmil import iterative_pinv

    torch.manual_seed(0)
    a = torch.softmax(torch.randn(1, 2, 5, 5, dtype=torch.float64), -1)
    assert np.abs(iterative_pinv(a, 20).numpy() - np.linalg.pinv(a.numpy())).max() < 1e-8
    assert torch.allclose(torch.from_numpy(_pinv(a[0].numpy(), 6)), iterative_pinv(a, 6)[0])


def test_transmil_trains_and_its_dropout_is_active_in_training():
    torch.manual_seed(0)
    model = build_model("transmil", 6, 2, dim=8, heads=2)
    x, y = torch.randn(11, 6), torch.tensor(1)
    out = model(x[None], None, y.view(1))
    loss = torch.nn.functional.cross_entropy(out.logits, y.view(1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.cls_token.grad.abs().sum() > 0 and model.pos_layer.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert not torch.equal(model(x[None]).logits, model(x[None]).logits)  # dropout 0.1 in training mode
