"""A tiny CDM learns a known mixture of contexts, one Gaussian component per magnification.

Data: contexts [65, 4]; at magnification m every token is ``mu_m + L_m z`` (z standard normal), with a
per-magnification mean ``mu_m`` and a channel covariance ``L_m L_m^T`` whose leading axis turns with m.
The tiny CDM (2 blocks, width 32) is trained through the real pipeline (context store, step-keyed DataModule
with uniform magnification sampling, Lightning, EMA) for 300 CPU steps and sampled with 20 DDIM steps.

Statistic: the Frechet distance between Gaussian summaries of two sets of contexts, each summarised by its
per-token mean [65, 4] and its channel covariance pooled over tokens [4, 4]:
``FD = mean_k |M_a[k] - M_b[k]|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)`` (scipy's sqrtm).
For every magnification, FD(CDM samples at m, training set at m) must be below a quarter of FD(one Gaussian
fitted to all magnifications together, training set at m), and the leading axis of the samples' channel
covariance must be that of the training component (|cos| > 0.9), which the pooled Gaussian's is not.

The run uses the fixed-variance objective (``--fixed-variance``, the official ``learn_sigma=False``): with
the official hybrid loss the vb term's gradients at small t (thousands of bits) keep a 300-step model's
t = 0 prediction, which DDIM's last step returns, from using x_t (samples collapse to the component means;
measured: covariance trace below 1 % of the data's), which only a much longer training fixes.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import sqrtm

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

T, D, N = 65, 4, 384
MAGS = {0: "20x", 2: "5x", 4: "1.25x"}


def component(m: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [4], channel factor L [4, 4]) of magnification index m."""
    mu = 1.5 * np.cos(1.7 * m + 1.3 * np.arange(D))
    theta = 0.6 * m
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    factor = np.eye(D) * 0.1
    factor[:2, :2] = rot @ np.diag([0.8, 0.2]) @ rot.T
    return mu, factor


def summary(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    r = (x - mean).reshape(-1, x.shape[-1])
    return mean, r.T @ r / (len(r) - 1)


def frechet(a, b) -> float:
    (ma, ca), (mb, cb) = a, b
    root = sqrtm(ca)
    cross = sqrtm(root @ cb @ root).real
    return float(((ma - mb) ** 2).sum(1).mean() + np.trace(ca + cb - 2 * cross))


def leading_axis(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    return vectors[:, -1]


def test_tiny_cdm_matches_each_magnification_better_than_one_gaussian(tmp_path):
    from zoomfeat.cdm.config import DataSection, ModelSection, OptimSection, TrainCDMConfig, TrainerSection
    from zoomfeat.store.contexts import ContextWriter
    from zoomfeat.cdm.run import train_cdm
    from zoomfeat.cdm.sample import load_cdm, sample_contexts

    rng = np.random.default_rng(0)
    parts = []
    for m in MAGS:
        mu, factor = component(m)
        parts.append(mu + rng.standard_normal((N, T, D)) @ factor.T)
    x = np.concatenate(parts).astype(np.float32)
    mags = np.repeat(list(MAGS), N)
    writer = ContextWriter(tmp_path / "ctx", settings="synthetic mixture", mags=mags, source_shard=np.zeros(len(x)),
                           source_row=np.arange(len(x)), context_shape=(T, D))
    writer.write(0, x)
    writer.commit()
    cfg = TrainCDMConfig(
        data=DataSection(path=tmp_path / "ctx", batch_size=32, workers=0),
        model=ModelSection(depth=2, hidden_size=32, num_heads=2, learn_sigma=False),
        optim=OptimSection(lr=3e-3, ema_decay=0.99),
        trainer=TrainerSection(out=tmp_path / "run", accelerator="cpu", devices="1", max_steps=300,
                               every_n_steps=300, log_every_n_steps=50))
    cdm = load_cdm(train_cdm(cfg))
    pooled = summary(x)
    for m, name in MAGS.items():
        target = summary(x[mags == m])
        drawn = summary(sample_contexts(cdm, name, 128, steps=20, seed=1).numpy())
        fd_cdm, fd_pooled = frechet(drawn, target), frechet(pooled, target)
        assert fd_cdm < 0.25 * fd_pooled, (name, fd_cdm, fd_pooled)
        axis = leading_axis(target[1])
        print(f"{name}: FD cdm {fd_cdm:.3f} pooled {fd_pooled:.3f}; |cos| leading axis cdm "
              f"{abs(leading_axis(drawn[1]) @ axis):.3f} pooled {abs(leading_axis(pooled[1]) @ axis):.3f}")
        assert abs(leading_axis(drawn[1]) @ axis) > 0.9, name
        assert abs(leading_axis(pooled[1]) @ axis) < abs(leading_axis(drawn[1]) @ axis), name
