"""The training engine's fast building blocks against independent definitions: the dropout masks' statistics
(counted), and the fused embedding + gated-attention node's values and gradients against autograd of the
plain composition written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mil.layers import EmbedGatedAttention, fold_generators, fold_masks, keep_mask, keep_scale
from mil.models import build_model, embed_and_attend

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("p", [0.25, 0.5, 0.1])
def test_keep_mask_drops_at_rate_p_in_every_slot_and_keeps_the_expectation(p):
    n = 1 << 20
    mask = keep_mask((n,), p, torch.Generator().manual_seed(3), "cpu")
    dropped = round(p * 65536)
    scale = 65536 / (65536 - dropped)
    values = torch.unique(mask).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(scale, rel=1e-6)
    sigma = (p * (1 - p) / (n / 4)) ** 0.5
    # each of the four 16-bit slices of a 64-bit word drops at the rate (a 63-bit draw never drops the last)
    for slot in range(4):
        rate = float((mask[slot::4] == 0).double().mean())
        assert abs(rate - dropped / 65536) < 5 * sigma, (slot, rate)
    assert abs(float(mask.double().mean()) - 1.0) < 5 * sigma * scale * 2


def test_keep_mask_is_seeded_and_fold_masks_draw_each_fold_from_its_generator():
    a = keep_mask((3, 50), 0.25, torch.Generator().manual_seed(1), "cpu")
    b = keep_mask((3, 50), 0.25, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(a, b)
    with fold_generators([torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]):
        masks = fold_masks((3, 50), 0.25, "cpu")
    assert masks.shape == (2, 3, 50)
    assert torch.equal(masks[0], a) and not torch.equal(masks[1], a)
    assert fold_masks((3, 50), 0.25, "cpu") is None  # no generators active: the plain modules' dropout


def _composition(x, w1, b1, wa, ba, wb, bb, wc, bc, m1, ma, mb):
    """The definition: h = Dropout(ReLU(x W1^T + b1)), scores = (Dropout(tanh(h Wa^T + ba)) *
    Dropout(sigmoid(h Wb^T + bb))) Wc^T + bc, per fold (weights [F, out, in], masks 0 or 1/(1-p))."""
    h = torch.relu(x @ w1.transpose(1, 2) + b1[:, None]) * m1
    t = torch.tanh(h @ wa.transpose(1, 2) + ba[:, None]) * ma
    s = torch.sigmoid(h @ wb.transpose(1, 2) + bb[:, None]) * mb
    return h, (t * s) @ wc.transpose(1, 2) + bc[:, None]


def _case(k: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(k)
    folds, rows, d, hidden, attn = 2, 7, 5, 6, 4
    shapes = {"x": (folds, rows, d), "w1": (folds, hidden, d), "b1": (folds, hidden), "wa": (folds, attn, hidden),
              "ba": (folds, attn), "wb": (folds, attn, hidden), "bb": (folds, attn), "wc": (folds, k, attn),
              "bc": (folds, k)}
    values = {n: torch.randn(*s, generator=g, dtype=dtype) for n, s in shapes.items()}
    scale = 4 / 3
    masks = [(torch.rand(folds, rows, n, generator=g) > 0.25).to(dtype) * scale for n in (hidden, attn, attn)]
    return values, masks, scale


@pytest.mark.parametrize("k", [1, 3])
def test_fused_embed_attention_matches_autograd_of_the_composition(k):
    values, masks, scale = _case(k)
    # the oracle: autograd of the composition on plain [F, out, in] weights
    ref = {n: v.clone().requires_grad_(True) for n, v in values.items()}
    h_ref, s_ref = _composition(*ref.values(), *masks)
    dh, ds = torch.randn_like(h_ref), torch.randn_like(s_ref)
    ref_grads = torch.autograd.grad((h_ref * dh).sum() + (s_ref * ds).sum(), list(ref.values()))
    # the fused node, weights bound as the engine binds them: [F, out, in] views of leaves held [F, in, out]
    held = {n: (v.transpose(1, 2).contiguous() if n.startswith("w") else v.clone()).requires_grad_(True)
            for n, v in values.items()}
    bound = [held[n].transpose(1, 2) if n.startswith("w") else held[n] for n in values]
    h, s = EmbedGatedAttention.apply(*bound, *masks, scale, None)
    assert torch.allclose(h, h_ref, atol=1e-12) and torch.allclose(s, s_ref, atol=1e-12)
    grads = torch.autograd.grad((h * dh).sum() + (s * ds).sum(), list(held.values()))
    for (n, v), got, want in zip(held.items(), grads, ref_grads):
        assert got.shape == v.shape, n
        got = got.transpose(1, 2) if n.startswith("w") else got
        assert torch.allclose(got, want, atol=1e-10), n
    # weight gradients arrive in the held layout, so the optimiser needs no copy
    assert all(g.is_contiguous() for n, g in zip(held, grads) if n in ("w1", "wa", "wb"))


def test_fused_embed_attention_without_dropout_and_in_bf16():
    values, _, _ = _case(1, torch.float32)
    ones = [None, None, None]
    ref = {n: v.clone().requires_grad_(True) for n, v in values.items()}
    h_ref, s_ref = _composition(*ref.values(), 1.0, 1.0, 1.0)
    ref_grads = torch.autograd.grad(h_ref.sum() + s_ref.sum(), list(ref.values()))
    for low, tol in ((None, 1e-5), (torch.bfloat16, 5e-2)):
        leaves = {n: v.clone().requires_grad_(True) for n, v in values.items()}
        h, s = EmbedGatedAttention.apply(*leaves.values(), *ones, 1.0, low)
        assert h.dtype == s.dtype == torch.float32
        assert torch.allclose(h, h_ref, rtol=tol, atol=tol) and torch.allclose(s, s_ref, rtol=tol, atol=tol)
        grads = torch.autograd.grad(h.sum() + s.sum(), list(leaves.values()))
        for n, got, want in zip(leaves, grads, ref_grads):
            assert torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())), (n, low)


@pytest.mark.parametrize("name", ["abmil", "clam_mb"])
def test_stacked_head_draws_the_masks_of_its_modules_in_their_order(name):
    """The engine's fused path and the head's own modules (Dropout drawing from the fold generators), on the
    same stacked parameters and generator seeds: the same h and scores, so the same masks in the same order."""
    torch.manual_seed(0)
    head = build_model(name, 5, 2, hidden=6, attn_dim=4, dropout=0.25).train()
    params = {n: p.detach().unsqueeze(0).repeat(2, *([1] * p.dim())) for n, p in head.named_parameters()}
    for p in params.values():
        p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 1, 9, 5)

    def run(fused: bool):
        gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
        with fold_generators(gens), _bound(head, params):
            if fused:
                return embed_and_attend(head.embed, head.attention, x)
            h = head.embed(x)
            return h, head.attention(h)

    (h1, s1), (h2, s2) = run(True), run(False)
    assert (h1 == 0).float().mean() > 0.1  # dropout did drop
    assert torch.allclose(h1, h2, atol=1e-6) and torch.allclose(s1, s2, atol=1e-6)


class _bound:
    """Bind stacked tensors as a module's parameters for one block (as the engine does)."""

    def __init__(self, module, tensors):
        self.slots = [(module.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2], t)
                      for n, t in tensors.items()]

    def __enter__(self):
        self.saved = [(m, a, m._parameters[a]) for m, a, _ in self.slots]
        for m, a, t in self.slots:
            m._parameters[a] = t

    def __exit__(self, *exc):
        for m, a, t in self.saved:
            m._parameters[a] = t


def test_keep_scale_matches_the_mask_value():
    assert keep_scale(0.25) == 4 / 3
    assert keep_scale(0.1) == pytest.approx(1 / (1 - round(0.1 * 65536) / 65536))


def test_plain_head_outside_the_engine_keeps_torch_dropout():
    torch.manual_seed(0)
    head = build_model("abmil", 5, 2, hidden=6, attn_dim=4, dropout=0.25).train()
    x = torch.randn(9, 5)
    torch.manual_seed(1)
    h, _ = embed_and_attend(head.embed, head.attention, x)
    torch.manual_seed(1)
    assert torch.equal(h, F.dropout(torch.relu(x @ head.embed[0].weight.T + head.embed[0].bias), 0.25, True))
