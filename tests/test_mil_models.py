"""Every registered MIL head honours the one interface (a padded batch of bags with a mask; padding changes no
bag's numbers); ABMIL, CLAM, DSMIL and the pooling baselines against their papers' equations computed here; the
smooth top-1 SVM loss."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from mil.heads import HEADS
from mil.losses import bag_loss, smooth_top1_svm_rows
from mil.registry import MIL_MODELS, MILOutput, build_model, load_heads, register_model
from zoomfeat.commands.train_mil import MODEL_CHOICES
from zoomfeat.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"abmil": {"hidden": 16, "attn_dim": 8}, "clam_sb": {"hidden": 16, "attn_dim": 8},
         "clam_mb": {"hidden": 16, "attn_dim": 8}, "dsmil": {"query_dim": 8}, "mean": {"hidden": 16},
         "max": {"hidden": 16}, "transmil": {"dim": 16, "heads": 2}, "dtfd": {"dim": 16, "attn_dim": 8}}


def _one(model, x: torch.Tensor, y: int | torch.Tensor | None = None) -> MILOutput:
    """One bag [N, D] through a head as a batch of one."""
    return model(x[None], None, None if y is None else torch.as_tensor(y).view(1))


def test_cli_choices_and_help_are_the_registry_and_need_no_torch():
    assert set(load_heads()) == set(HEADS) == set(SMALL)
    assert tuple(sorted(MIL_MODELS)) == MODEL_CHOICES
    code = "import sys; from mil.heads import head_names, head_help; print(head_names(), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{sorted(HEADS)} False"


def test_the_head_table_of_the_docs_is_the_registrys():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "mil.md").read_text(encoding="utf-8")
    block = text[text.index("<!-- heads: mil.heads.HEADS -->"):text.index("<!-- end of heads -->")]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()[3:]]
    assert rows == [[f"`{n}`", HEADS[n][1], f"`mil/heads/{HEADS[n][0]}.py`"] for n in sorted(HEADS)]


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("n", [1, 2, 37])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_every_head_forward_backward(name, n, n_classes):
    torch.manual_seed(0)
    model = build_model(name, 12, n_classes, **SMALL[name])
    x = torch.randn(n, 12)
    y = torch.tensor(n_classes - 1)
    out = _one(model, x, y)
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (1, n_classes)
    assert out.attention.shape == (1, n)
    assert torch.isfinite(out.attention).all()
    assert out.extra_loss is None or out.extra_loss.shape == (1,)
    loss = bag_loss(model, out, y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    assert _one(model, x).extra_loss is None  # no label, no auxiliary loss


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_head_has_finite_gradients_on_features_of_large_scale(name):
    """Raw ZoomLDM U-Net features have a standard deviation of ~60 (up to ~300): a head's gradients must stay
    finite there."""
    torch.manual_seed(0)
    model = build_model(name, 12, 2, **SMALL[name])
    x = torch.randn(40, 12) * 300.0
    for label in (0, 1):
        model.zero_grad()
        bag_loss(model, _one(model, x, label), torch.tensor(label)).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), name


def _padded(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(len(bags), max(len(b) for b in bags), bags[0].shape[1])
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, :len(b)], mask[i, :len(b)] = b, True
    return x, mask


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("train", [False, True])
def test_padded_bags_give_each_bags_own_numbers(name, train):
    """Several bags per step: a padded, masked bag gets the logits, attention, loss and gradient it gets alone
    (in train mode with dropout off, and DTFD's random split drawn from the same seed)."""
    torch.manual_seed(1)
    model = build_model(name, 12, 3, **SMALL[name])
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train(train)
    bags = [torch.randn(n, 12) for n in (5, 23, 1, 9)]
    x, mask = _padded(bags)
    y = torch.tensor([0, 2, 1, 2])
    torch.manual_seed(7)
    out = model(x, mask, y)
    losses = model.bag_losses(out, y)
    losses.mean().backward()
    together = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(7)
    total = 0.0
    for i, bag in enumerate(bags):
        alone = _one(model, bag, y[i])
        assert torch.allclose(out.logits[i], alone.logits[0], atol=1e-5), name
        assert torch.allclose(out.attention[i, :len(bag)], alone.attention[0], atol=1e-5), name
        assert not out.attention[i, len(bag):].any(), name  # nothing on padded positions
        loss = bag_loss(model, alone, y[i])
        assert torch.allclose(losses[i], loss, atol=1e-5), name
        total = total + loss / len(bags)
    total.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(together[n], p.grad, atol=1e-5), (name, n)


def test_abmil_matches_its_equations():
    """Ilse et al. 2018, eqs. 7 and 9: a_k = softmax_k(w^T (tanh(V h_k) * sigm(U h_k))), z = sum_k a_k h_k, in
    float64 numpy from the head's weights."""
    torch.manual_seed(0)
    m = build_model("abmil", 6, 3, hidden=8, attn_dim=4).eval()
    x = torch.randn(11, 6)
    w = {n: p.detach().double().numpy() for n, p in m.named_parameters()}
    h = np.maximum(x.double().numpy() @ w["embed.0.weight"].T + w["embed.0.bias"], 0)
    gate = (np.tanh(h @ w["attention.tanh_gate.0.weight"].T + w["attention.tanh_gate.0.bias"])
            / (1 + np.exp(-(h @ w["attention.sigmoid_gate.0.weight"].T + w["attention.sigmoid_gate.0.bias"]))))
    e = np.exp(gate @ w["attention.score.weight"][0] + w["attention.score.bias"][0])
    a = e / e.sum()
    logits = (a @ h) @ w["classifier.weight"].T + w["classifier.bias"]
    with torch.no_grad():
        out = _one(m, x)
    assert np.allclose(out.attention[0].numpy(), a, atol=1e-6)
    assert np.allclose(out.logits[0].numpy(), logits, atol=1e-5)


def test_pooling_baselines_match_their_definitions():
    torch.manual_seed(0)
    x = torch.randn(7, 6)
    for name in ("mean", "max"):
        m = build_model(name, 6, 2, hidden=8).eval()
        w = {n: p.detach().double().numpy() for n, p in m.named_parameters()}
        h = np.maximum(x.double().numpy() @ w["embed.0.weight"].T + w["embed.0.bias"], 0)
        with torch.no_grad():
            out = _one(m, x)
        if name == "mean":
            expected = h.mean(0) @ w["classifier.weight"].T + w["classifier.bias"]
        else:
            expected = (h @ w["classifier.weight"].T + w["classifier.bias"]).max(0)
        assert np.allclose(out.logits[0].numpy(), expected, atol=1e-5), name


def test_default_dimensions_follow_the_papers():
    abmil = build_model("abmil", 1024, 2)
    assert abmil.embed[0].out_features == 512 and abmil.embed[2].p == 0.25
    assert abmil.attention.tanh_gate[0].out_features == 256
    clam = build_model("clam_mb", 1024, 2)
    assert clam.k_sample == 8 and clam.bag_weight == 0.7 and len(clam.classifiers) == 2
    dsmil = build_model("dsmil", 1024, 2)
    assert dsmil.query[0].out_features == 128 and dsmil.query[2].out_features == 128
    assert dsmil.head.kernel_size == (1024,) and dsmil.bag_weight == 0.5
    trans = build_model("transmil", 1024, 2)
    attn = trans.layer1.attn
    assert trans._fc1[0].out_features == 512 and attn.heads == 8 and attn.dim_head == 64
    assert attn.landmarks == 256 and attn.pinv_iterations == 6 and attn.to_out[1].p == 0.1
    assert attn.res_conv.kernel_size == (33, 1) and trans.pos_layer.proj.kernel_size == (7, 7)
    dtfd = build_model("dtfd", 1024, 2)
    assert dtfd.pseudo_bags == 4 and dtfd.dim_reduction.fc1.bias is None
    assert dtfd.attention.attention_V[0].out_features == 128 and set(dtfd.clip_groups.values()) == {5.0}


def test_attention_heads_sum_to_one():
    x = torch.randn(20, 12)
    for name in ("abmil", "clam_sb", "clam_mb", "dsmil", "mean", "dtfd"):
        out = _one(build_model(name, 12, 2, **SMALL[name]).eval(), x)
        assert math.isclose(float(out.attention.detach().sum()), 1.0, rel_tol=1e-5), name


@pytest.mark.parametrize("name", ["abmil", "clam_sb", "clam_mb", "dsmil", "mean", "max"])
def test_order_free_heads_do_not_read_instance_positions(name):
    """A bag is a set: reordering its instances permutes the attention and leaves the logits as they were (in
    eval mode). TransMIL (PPEG, the value convolution) and DTFD (a fixed split into pseudo-bags by position)
    read the order by design and are not in this list."""
    torch.manual_seed(4)
    x = torch.randn(37, 12)
    x[0] += 5.0  # a distinct first instance, as a position-reading head would notice
    order = torch.randperm(37)
    model = build_model(name, 12, 2, **SMALL[name]).eval()
    with torch.no_grad():
        out, shuffled = _one(model, x), _one(model, x[order])
    torch.testing.assert_close(shuffled.logits, out.logits, rtol=1e-5, atol=1e-6)
    if out.attention is not None:
        torch.testing.assert_close(shuffled.attention, out.attention[..., order], rtol=1e-5, atol=1e-6)


def _svm(scores: torch.Tensor, target: int) -> float:
    """Smooth top-1 SVM (alpha 1, tau 1) of one row, written out: log sum_j exp(1[j != y] + s_j - s_y)."""
    return math.log(sum(math.exp((0.0 if j == target else 1.0) + float(scores[j] - scores[target]))
                        for j in range(len(scores))))


def _clam_oracle(model, x: torch.Tensor, y: int, subtyping: bool) -> float:
    """CLAM's instance loss from its definition: per class, k = min(8, N // 2) top (and bottom) attended
    instances by that class's attention branch, smooth SVM with targets 1 (top) / 0 (bottom) in-class,
    0 (top) out-of-class; mean over the selected instances; summed over classes (/ C with subtyping)."""
    with torch.no_grad():
        h = model.embed(x)
        attn = torch.softmax(model.attention(h).T, dim=1)
        k = min(model.k_sample, len(x) // 2)
        total = 0.0
        for c, clf in enumerate(model.instance_classifiers):
            a = attn[c if attn.shape[0] > 1 else 0].tolist()
            ranked = sorted(range(len(a)), key=lambda i: -a[i])
            top, bottom = ranked[:k], ranked[::-1][:k]
            scores = clf(h)
            if c == y:
                total += (sum(_svm(scores[i], 1) for i in top) + sum(_svm(scores[i], 0) for i in bottom)) / (2 * k)
            elif subtyping:
                total += sum(_svm(scores[i], 0) for i in top) / k
        return total / len(model.instance_classifiers) if subtyping else total


@pytest.mark.parametrize("name,n_classes", [("clam_sb", 2), ("clam_mb", 3)])
@pytest.mark.parametrize("subtyping", [False, True])
def test_clam_instance_loss_matches_its_definition(name, n_classes, subtyping):
    torch.manual_seed(0)
    clam = build_model(name, 12, n_classes, hidden=16, attn_dim=8, subtyping=subtyping).eval()
    x, y = torch.randn(30, 12), n_classes - 1
    assert math.isclose(float(_one(clam, x, y).extra_loss), _clam_oracle(clam, x, y, subtyping),
                        rel_tol=1e-5)
    small = torch.randn(5, 12)  # k = 2
    assert math.isclose(float(_one(clam, small, 0).extra_loss), _clam_oracle(clam, small, 0, subtyping),
                        rel_tol=1e-5)
    assert _one(clam, torch.randn(1, 12), 1).extra_loss is None  # k = min(8, N // 2) = 0


def test_dsmil_matches_its_equations():
    torch.manual_seed(0)
    m = build_model("dsmil", 6, 2, query_dim=4).eval()
    x = torch.randn(9, 6)
    with torch.no_grad():
        inst = x @ m.instance_classifier.weight.T + m.instance_classifier.bias
        q = torch.tanh(torch.relu(x @ m.query[0].weight.T + m.query[0].bias) @ m.query[2].weight.T + m.query[2].bias)
        qmax = q[inst.argmax(0)]  # [C, Q]
        a = torch.softmax(q @ qmax.T / 2.0, dim=0)  # sqrt(4) = 2
        b = a.T @ x
        logits = torch.einsum("ocd,cd->o", m.head.weight, b) + m.head.bias
        maxes = inst.max(0).values
        target = torch.tensor([0.0, 1.0])
        bce = -(target * torch.log(torch.sigmoid(maxes)) + (1 - target) * torch.log(1 - torch.sigmoid(maxes))).mean()
        out = _one(m, x, 1)
    assert torch.allclose(out.logits[0], logits, atol=1e-5)
    assert torch.allclose(out.attention[0], a[:, int(logits.argmax())], atol=1e-6)
    assert torch.allclose(out.extra_loss[0], bce, atol=1e-6)


def test_dsmil_single_positive_stream_matches_its_equations():
    """DSMIL's positive/negative setting (its --num_classes 1): one instance score per instance, the critical
    instance is its argmax, and the bag's probability of class 1 is sigmoid of the one bag score."""
    torch.manual_seed(0)
    m = build_model("dsmil", 6, 2, query_dim=4, negative_stream=False).eval()
    assert m.instance_classifier.weight.shape == (1, 6) and m.head.weight.shape == (1, 1, 6)
    x = torch.randn(9, 6)
    with torch.no_grad():
        s = (x @ m.instance_classifier.weight[0] + m.instance_classifier.bias[0]).numpy()  # [N]
        w0, b0 = m.query[0].weight.numpy(), m.query[0].bias.numpy()
        w2, b2 = m.query[2].weight.numpy(), m.query[2].bias.numpy()
        q = np.tanh(np.maximum(x.numpy() @ w0.T + b0, 0) @ w2.T + b2)  # [N, 4]
        e = np.exp(q @ q[s.argmax()] / 2.0)
        a = e / e.sum()
        score = float((a @ x.numpy()) @ m.head.weight[0, 0].numpy() + m.head.bias[0])
        z = s.max()
        max_bce = -np.log(1 / (1 + np.exp(-z)))  # label 1
        out = _one(m, x, 1)
        assert math.isclose(float(torch.softmax(out.logits[0], -1)[1]), 1 / (1 + math.exp(-score)), rel_tol=1e-5)
        assert np.allclose(out.attention[0].numpy(), a, atol=1e-6)
        assert math.isclose(float(out.extra_loss), max_bce, rel_tol=1e-5)
        assert math.isclose(float(_one(m, x, 0).extra_loss), max_bce + z, rel_tol=1e-5)  # -log(1 - sig z)
        bags = [torch.randn(n, 6) for n in (5, 12, 1)]
        padded, mask = _padded(bags)
        y = torch.tensor([0, 1, 1])
        together = m(padded, mask, y)
        for i, bag in enumerate(bags):
            alone = _one(m, bag, y[i])
            assert torch.allclose(together.logits[i], alone.logits[0], atol=1e-5)
            assert torch.allclose(together.extra_loss[i], alone.extra_loss[0], atol=1e-5)
    with pytest.raises(ConfigError, match="negative_stream=False needs a binary task"):
        build_model("dsmil", 6, 3, negative_stream=False)


def test_dsmil_average_scores_a_bag_by_the_mean_of_its_two_streams():
    """``average=True`` (what train-mil builds): in eval mode the bag's class probabilities are the mean of the
    two streams', 0.5 sigmoid(max instance logit) + 0.5 sigmoid(bag logit) as DSMIL's train_tcga.py scores a
    bag (one positive stream), and the mean of the bag softmax and the class-normalised instance sigmoids with
    a stream per class; in train mode the logits, the attention and the loss are those of the plain head."""
    torch.manual_seed(0)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for negative_stream in (False, True):
        plain = build_model("dsmil", 6, 2, query_dim=4, negative_stream=negative_stream)
        both = build_model("dsmil", 6, 2, query_dim=4, negative_stream=negative_stream, average=True)
        both.load_state_dict(plain.state_dict())
        x = torch.randn(9, 6) * 3
        with torch.no_grad():
            bag_logits = _one(plain.eval(), x).logits[0].double().numpy()  # the bag stream alone (tested above)
            inst = (x @ plain.instance_classifier.weight.T + plain.instance_classifier.bias).double().numpy()
            m = inst.max(0)  # [S]
            if negative_stream:
                bag_p = np.exp(bag_logits) / np.exp(bag_logits).sum()
                expected = 0.5 * bag_p + 0.5 * sig(m) / sig(m).sum()
            else:
                p1 = 0.5 * sig(m[0]) + 0.5 * sig(bag_logits[1] - bag_logits[0])
                expected = np.array([1 - p1, p1])
            out = _one(both.eval(), x, 1)
            assert np.allclose(torch.softmax(out.logits[0].double(), -1).numpy(), expected, atol=1e-6)
            assert torch.allclose(out.attention, _one(plain, x).attention)
            both.train(), plain.train()
            trained, reference = _one(both, x, 1), _one(plain, x, 1)
            assert torch.equal(trained.logits, reference.logits) and torch.equal(trained.extra_loss,
                                                                                 reference.extra_loss)
    extreme = build_model("dsmil", 6, 2, query_dim=4, negative_stream=False, average=True).eval()
    with torch.no_grad():  # saturated sigmoids stay finite log-probabilities
        assert torch.isfinite(_one(extreme, torch.randn(9, 6) * 1e4).logits).all()


def test_smooth_top1_svm_matches_its_formula_and_bounds_the_hinge():
    scores = torch.tensor([[2.0, 0.5], [0.0, 3.0], [1.0, 1.0]])
    target = torch.tensor([0, 0, 1])
    expected = torch.stack([torch.logsumexp(torch.tensor([0.0, 1 + 0.5 - 2.0]), 0),
                            torch.logsumexp(torch.tensor([0.0, 1 + 3.0]), 0),
                            torch.logsumexp(torch.tensor([1 + 1.0 - 1.0, 0.0]), 0)]).mean()
    assert torch.allclose(smooth_top1_svm_rows(scores, target).mean(), expected)
    hinge = torch.tensor([0.0, 4.0, 1.0]).mean()  # max_j(alpha [j != y] + s_j) - s_y
    assert smooth_top1_svm_rows(scores, target).mean() >= hinge
    assert torch.allclose(smooth_top1_svm_rows(scores, target, tau=1e-3).mean(), hinge, atol=1e-2)


def test_registry_rejects_unknown_names_bad_kwargs_and_duplicates():
    with pytest.raises(ConfigError, match="unknown MIL model 'nope'"):
        build_model("nope", 8, 2)
    with pytest.raises(ConfigError, match="bad model arguments for 'abmil'"):
        build_model("abmil", 8, 2, hiden=3)
    for name, flag in (("transmil", "class_token_residual"), ("dsmil", "negative_stream"),
                       ("clam_sb", "subtyping")):
        with pytest.raises(ConfigError, match=f"{flag}='false' of '{name}' must be true or false"):
            build_model(name, 8, 2, **{flag: "false"})
    with pytest.raises(ValueError, match="registered twice"):
        register_model("abmil")(type("Dup", (torch.nn.Module,), {}))
    with pytest.raises(ValueError, match="not listed in mil.heads.HEADS"):
        register_model("unlisted")(type("Unlisted", (torch.nn.Module,), {}))
