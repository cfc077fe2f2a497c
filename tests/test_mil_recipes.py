"""Head recipes within protocols: what each run trains with, printed at its start; the schedules against
PyTorch's schedulers; the per-fold optimisers against torch.optim; CLAM's early stopping counted as CLAM's
EarlyStopping class counts it (re-implemented here from its definition)."""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import pytest
import torch

from mil.config import RECIPES, MILConfig, make_protocol, plan_rows, training_plan
from mil.optim import clip_groups, lr_at, make_optimizer
from mil.train import Selection

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(model: str, protocol: str = "hipt", instance_sample: float = 1.0, **kw) -> MILConfig:
    return MILConfig(features="f@20x", labels="l.csv", splits="s", out="o", model=model,
                     protocol=make_protocol(protocol, **kw), instance_sample=instance_sample)


def test_protocols_fix_their_settings_and_heads_bring_the_rest():
    dsmil = _cfg("dsmil")
    plan = training_plan(dsmil)
    assert (dsmil.protocol.epochs, dsmil.protocol.selection) == (20, "last")  # hipt
    assert (dsmil.protocol.lr, dsmil.protocol.weight_decay) == (2e-4, 5e-3)  # DSMIL's train_tcga.py
    assert plan.recipe.betas == (0.5, 0.9) and plan.recipe.schedule == "cosine" and plan.recipe.eta_min == 5e-6
    abmil = _cfg("abmil", "simil")
    assert (abmil.protocol.lr, abmil.protocol.weight_decay, abmil.protocol.epochs) == (5e-4, 1e-4, 40)
    assert training_plan(_cfg("transmil")).recipe.optimizer == "radam_lookahead"
    dtfd = training_plan(_cfg("dtfd", "clam"))
    assert dtfd.clip_groups and dtfd.protocol.patience == 20 and dtfd.protocol.min_epochs == 50
    assert training_plan(_cfg("dtfd")).bags_per_step == 1
    given = _cfg("dsmil", lr=1e-3, weight_decay=0.0, epochs=7)
    assert (given.protocol.lr, given.protocol.weight_decay, given.protocol.epochs) == (1e-3, 0.0, 7)
    assert set(RECIPES) >= {"abmil", "clam_sb", "clam_mb", "dsmil", "transmil", "dtfd", "mean", "max"}


def test_the_plan_is_printed_at_the_start_of_a_run(tmp_path, caplog):
    from mil_data import planted_cohort

    paths = planted_cohort(tmp_path / "c", n_slides=10, dim=4, sizes=(3, 5))
    from mil.cv import run_cv

    cfg = MILConfig(features=f"{paths['features']}@20x", labels=str(paths["labels"]), splits=str(paths["splits"]),
                    out=str(tmp_path / "run"), model="dsmil", model_kwargs={"query_dim": 4}, folds=(0,),
                    protocol=make_protocol("hipt", epochs=1))
    with caplog.at_level(logging.INFO, logger="zoomfeat"):
        run_cv(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training plan")]
    assert len(lines) == 1
    for part in ("dsmil under preset hipt", "epochs (max)        1  [--epochs (departs from preset hipt: 20)]",
                 "the last epoch's model  [preset hipt: HIPT", "betas 0.5/0.9  [dsmil recipe: Li et al. 2021",
                 "cosine to 5e-06 over 200 epochs", "learning rate       0.0002", "weight decay        0.005",
                 "bags per step       1", "fp32", "init seeds          0  [default (one seed, 0)]"):
        assert part in lines[0], (part, lines[0])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["plan"]
    assert [row["setting"] for row in saved] == [line.split("  ")[1].strip() for line in lines[0].splitlines()[1:]]
    assert all(row["source"] for row in saved)


@pytest.mark.parametrize("name", ["hipt", "clam", "simil"])
def test_presets_are_their_references_and_departures_are_named_options(name):
    """hipt: 20 epochs, last epoch (HIPT); clam: at most 200 epochs, CLAM's EarlyStopping(patience=20,
    stop_epoch=50) on the validation loss; simil: 40 epochs (SI-MIL's train.py default), best (AUC + acc) / 2.
    Without options every setting's source is the preset or the head's recipe; an option is named as one."""
    expected = {"hipt": (20, "last", None, 1), "clam": (200, "val_loss", 20, 50), "simil": (40, "val_auc", None, 1)}
    p = make_protocol(name)
    assert (p.epochs, p.selection, p.patience, p.min_epochs) == expected[name]
    rows = {k: src for k, _, src in plan_rows(_cfg("abmil", name))}
    assert not any(src.startswith("--") for src in rows.values()), rows
    assert rows["epochs (max)"].startswith(f"preset {name}: ") and rows["model evaluated"] == rows["epochs (max)"]
    assert rows["learning rate"].startswith("abmil recipe: Ilse et al. 2018")
    departed = {k: src for k, _, src in plan_rows(_cfg("abmil", name, epochs=3, lr=1e-3, instance_sample=0.5))}
    assert departed["epochs (max)"] == f"--epochs (departs from preset {name}: {expected[name][0]})"
    assert departed["learning rate"] == "--lr (recipe: 0.0005)"
    assert departed["instances per step"].startswith("--instance-sample")


def test_schedules_follow_torchs_schedulers():
    dsmil, dtfd = RECIPES["dsmil"], RECIPES["dtfd"]
    p = torch.nn.Parameter(torch.zeros(1))
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.Adam([p], lr=2e-4), T_max=200, eta_min=5e-6)
    opt = torch.optim.Adam([p], lr=1e-4)
    step = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[100], gamma=0.2)
    for epoch in range(200):
        assert math.isclose(lr_at(dsmil, 2e-4, epoch, 200), cos.get_last_lr()[0], rel_tol=1e-9)
        cos.step()
        assert math.isclose(lr_at(dtfd, 1e-4, epoch, 200), step.get_last_lr()[0], rel_tol=1e-9)
        step.step()


def test_adam_is_torch_adam_with_the_recipes_betas():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    opt = make_optimizer(model, RECIPES["dsmil"], lr=1e-2, weight_decay=5e-3)
    assert isinstance(opt, torch.optim.Adam)
    group = opt.param_groups[0]
    assert group["betas"] == (0.5, 0.9) and group["weight_decay"] == 5e-3 and group["lr"] == 1e-2


def test_radam_lookahead():
    """TransMIL's optimiser: timm's Lookahead(RAdam) with k 6, alpha 0.5; weight decay decoupled and only on
    weights of 2+ dimensions (its factory's no-decay group holds biases and 1-d parameters)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, RECIPES["transmil"], lr=1e-2, weight_decay=0.1)
    fast = {n: torch.nn.Parameter(t.clone()) for n, t in start.items()}
    ref = torch.optim.RAdam([{"params": [fast["0.weight"]], "weight_decay": 0.1},
                             {"params": [fast["0.bias"], fast["1.weight"], fast["1.bias"]], "weight_decay": 0.0}],
                            lr=1e-2, decoupled_weight_decay=True)
    slow = {n: t.clone() for n, t in start.items()}
    for step in range(1, 14):
        g = {n: torch.randn_like(t) for n, t in start.items()}
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
            fast[n].grad = g[n].clone()
        opt.step()
        ref.step()
        if step % 6 == 0:  # Lookahead (Zhang et al. 2019), timm's k = 6: slow += 0.5 (fast - slow); fast = slow
            for n in fast:
                slow[n] += 0.5 * (fast[n].detach() - slow[n])
                fast[n].data.copy_(slow[n])
    for n, p in model.named_parameters():
        assert torch.allclose(p.detach(), fast[n].detach(), atol=1e-6), n
    assert not torch.allclose(model[0].weight, start["0.weight"])


def test_gradient_clipping_is_per_group():
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 1, bias=False), "b": torch.nn.Linear(2, 1, bias=False)})
    model["a"].weight.grad = torch.tensor([[3.0, 4.0]])
    model["b"].weight.grad = torch.tensor([[0.3, 0.4]])
    clip_groups(model, {"a": 1.0, "b": 1.0})
    assert torch.allclose(model["a"].weight.grad.norm(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(model["b"].weight.grad, torch.tensor([[0.3, 0.4]]))  # norm 0.5 <= 1: untouched


class ClamEarlyStopping:
    """CLAM's utils/core_utils.py EarlyStopping, written from its definition: score = -val_loss; the first
    score is the best; a lower score adds 1 to the counter and stops once counter >= patience and
    epoch > stop_epoch; otherwise the score is the new best (saved) and the counter resets."""

    def __init__(self, patience: int, stop_epoch: int):
        self.patience, self.stop_epoch = patience, stop_epoch
        self.best, self.counter, self.stop, self.saved = None, 0, False, None

    def __call__(self, epoch: int, val_loss: float) -> None:
        score = -val_loss
        if self.best is None:
            self.best, self.saved = score, epoch
        elif score < self.best:
            self.counter += 1
            if self.counter >= self.patience and epoch > self.stop_epoch:
                self.stop = True
        else:
            self.best, self.saved, self.counter = score, epoch, 0


@pytest.mark.parametrize("patience,stop_epoch", [(3, 5), (2, 0), (20, 50)])
def test_clam_early_stopping_counts_as_clam(patience, stop_epoch):
    torch.manual_seed(patience)
    losses = (1.0 + 0.3 * torch.rand(120) - torch.linspace(0, 0.5, 120)).tolist()
    losses[10] = losses[9]  # a tie: CLAM saves it
    protocol = make_protocol("clam", patience=patience, min_epochs=stop_epoch, epochs=120)
    fold = Selection()
    ref = ClamEarlyStopping(patience, stop_epoch)
    for epoch, loss in enumerate(losses):
        fold.update(epoch, loss, None, protocol, None, lambda: {"epoch": epoch})
        ref(epoch, loss)
        assert fold.stopped == ref.stop
        assert fold.best_epoch == ref.saved + 1  # 1-based
        if ref.stop:
            break
    assert ref.stop or patience == 20



def test_simil_selection_scores_as_simil():
    """SI-MIL's train.py, written from its definition: score = (val AUC + val accuracy) / 2 after every epoch;
    ``score >= best`` saves the model (ties go to the later epoch)."""
    aucs = [0.5, 1.0, 1.0, 0.75, 1.0, 0.875]
    accs = [0.5, 0.5, 0.75, 1.0, 0.875, 1.0]
    protocol = make_protocol("simil", epochs=len(aucs))
    fold = Selection()
    best, saved = 0.0, None
    for epoch, (auc, acc) in enumerate(zip(aucs, accs)):
        fold.update(epoch, 0.3, auc, protocol, acc, lambda: {"epoch": epoch})
        if (auc + acc) / 2 >= best:
            best, saved = (auc + acc) / 2, epoch
        assert fold.best_epoch == saved + 1
    assert saved == 5  # scores 0.5, 0.75, 0.875, 0.875, 0.9375, 0.9375: each tie replaced the best


def test_planted_bags_balance_their_mean_unless_told_not_to():
    """The robustness cohorts' positive bags: the other instances move by -7 k / (n - k) along u, so the bag's
    mean along u is the noise's alone (expected 0, as in a negative bag); with ``matched=False`` the same draws
    without that shift, so the bag mean along u is 7 k / n (k witnesses of n) plus the same noise."""
    from mil_data import planted_bag

    n, dim, share = 150, 16, 0.02
    k = round(share * n)
    u = np.zeros(dim)
    u[:4] = 0.5
    matched = planted_bag(np.random.default_rng(4), 1, n, dim, share=share)
    plain = planted_bag(np.random.default_rng(4), 1, n, dim, share=share, matched=False)
    moved = ~np.isclose(matched, plain).all(axis=1)
    assert moved.sum() == n - k  # the witnesses are the same rows with the same values
    assert np.allclose((plain - matched)[moved], 7.0 * k / (n - k) * u, atol=1e-5)
    assert np.isclose((plain.mean(0) - matched.mean(0)) @ u / (u @ u), 7.0 * k / n, atol=1e-5)


def _planted_cv(tmp_path, model: str, seed: int, instance_sample: float = 1.0) -> float:
    from mil_data import planted_cohort

    from mil.cv import run_cv

    cohort = tmp_path / f"c{seed}"
    paths = ({"features": cohort / "feats", "labels": cohort / "labels.csv", "splits": cohort / "splits"}
             if (cohort / "labels.csv").exists() else
             planted_cohort(cohort, n_slides=60, dim=64, seed=seed, share=0.05))
    cfg = MILConfig(features=f"{paths['features']}@20x", labels=str(paths["labels"]), splits=str(paths["splits"]),
                    out=str(tmp_path / f"{model}{seed}_{instance_sample:g}"), model=model,
                    protocol=make_protocol("hipt"), instance_sample=instance_sample)
    summary = run_cv(cfg)  # one seed: its mean over folds is the row seed "mean", fold "mean"
    return float(summary[(summary.seed == "mean") & (summary.fold == "mean")].test_auc.iloc[0])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ZOOMFEAT_MIL_CLAIM") != "1",
                    reason="planted-witness claims of the MIL heads (~5 CPU minutes together, over CI's suite budget); "
                           "run with ZOOMFEAT_MIL_CLAIM=1")
def test_heads_find_planted_witnesses_under_the_default_preset(tmp_path):
    """Issue 20's bar, a cheap slice: DTFD-MIL (0.73 in an earlier measurement) and DSMIL (0.66 in the issue)
    at their default widths and recipes under hipt (20 epochs, last epoch) on two planted cohorts with 5%
    witness instances (5 folds each) reach mean test AUC >= 0.95; mean pooling, which the cohort is built to
    defeat (both classes have the same expected bag mean), stays clearly below. Measured: DTFD 1.00 / 1.00,
    DSMIL 0.99 / 1.00 (scored by both streams; 0.97 / 1.00 by its bag stream), mean 0.75 / 0.69. The whole
    grid: benchmarks/bench_mil_robustness.py (RESULTS.md). This checks train-mil's seed 0, one draw of the
    initial weights that every fold of a run starts from: from seeds 1 / 2 the first cohort gave DTFD 0.73 /
    0.97 (RESULTS.md, "One train seed is one draw of the init")."""
    for model in ("dtfd", "dsmil"):
        auc = sum(_planted_cv(tmp_path, model, seed) for seed in (0, 1)) / 2
        assert auc >= 0.95, (model, auc)
    mean = sum(_planted_cv(tmp_path, "mean", seed) for seed in (0, 1)) / 2
    assert mean <= 0.85, mean


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ZOOMFEAT_MIL_CLAIM") != "1",
                    reason="planted-witness claims of the MIL heads (~5 CPU minutes together, over CI's suite budget); "
                           "run with ZOOMFEAT_MIL_CLAIM=1")
def test_instance_sampling_stops_the_hipt_overfitting_of_abmil_and_clam_sb(tmp_path):
    """Under hipt (20 epochs, last epoch) ABMIL and CLAM-SB memorise 36 training bags and lose the witnesses
    by the last epoch (measured 0.85 / 0.96 and 0.94 / 0.84 on these two cohorts); with a seeded random half of
    each bag per training step they keep them (measured ABMIL 1.00 / 1.00, CLAM-SB 1.00 / 0.97; RESULTS.md).
    Like the test above, this checks the draw of train-mil's seed 0."""
    for model in ("abmil", "clam_sb"):
        auc = sum(_planted_cv(tmp_path, model, seed, instance_sample=0.5) for seed in (0, 1)) / 2
        assert auc >= 0.95, (model, auc)
