"""``CDM`` (the DiT, its EMA and the official export) and ``CDMLightning``, the thin module that trains it.

Objective (official ``train_cdm.py``): t uniform over the 1000 steps, the hybrid loss ``mse + vb`` of
:mod:`zoomfeat.cdm.diffusion`, AdamW at a constant learning rate, an EMA of the weights after every optimiser
step. The EMA reuses :class:`zoomfeat.model.ema.LitEma` without its warm-up (``use_num_updates=False``), which
is the official plain ``ema = decay * ema + (1 - decay) * w``. The random draws of a step (t, noise, label
dropout) come from :func:`zoomfeat.train.module.step_generator` keyed by ``(seed, global_step, rank)``, so a
resumed run is exact.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from torch import nn

from zoomfeat.cdm.config import OptimSection
from zoomfeat.cdm.diffusion import create_diffusion
from zoomfeat.cdm.dit import DiT, DiTConfig
from zoomfeat.model.ema import LitEma


class CDM(nn.Module):
    """The trained network ``dit`` and its EMA shadows ``ema`` (buffers, so Lightning checkpoints hold them)."""

    def __init__(self, cfg: DiTConfig, ema_decay: float = 0.9999):
        super().__init__()
        self.cfg = cfg
        self.dit = DiT(cfg)
        self.ema = LitEma(self.dit, decay=ema_decay, use_num_updates=False)

    @torch.no_grad()
    def update_ema(self) -> None:
        self.ema.update(self.dit)

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The DiT state_dict with the EMA weights (what the official evaluation samples with)."""
        state = self.dit.state_dict()
        for name, shadow in self.ema.names.items():
            state[name] = getattr(self.ema, shadow).detach().clone()
        return state

    @contextmanager
    def ema_weights(self):
        """The body runs with the EMA weights in ``dit``; the trained weights come back afterwards."""
        raw = {k: v.detach().clone() for k, v in self.dit.state_dict().items()}
        self.dit.load_state_dict(self.ema_state_dict())
        try:
            yield self.dit
        finally:
            self.dit.load_state_dict(raw)

    def save_official(self, path: str | Path) -> Path:
        """The official training-checkpoint layout ``{"model", "ema", "opt", "args"}`` (the official FID script
        loads ``["ema"]``); ``opt`` is left empty (the Lightning checkpoints hold the optimiser) and ``args``
        is the architecture as a plain dict."""
        from zoomfeat.store import save_torch

        cpu = lambda sd: {k: v.detach().cpu().contiguous() for k, v in sd.items()}  # noqa: E731
        checkpoint = {"model": cpu(self.dit.state_dict()), "ema": cpu(self.ema_state_dict()), "opt": {},
                      "args": asdict(self.cfg)}
        return save_torch(checkpoint, path)


class CDMLightning(L.LightningModule):
    def __init__(self, model: CDM, optim: OptimSection, seed: int = 0):
        super().__init__()
        self.model = model
        self.optim_cfg = optim
        self.seed = int(seed)
        self.diffusion = create_diffusion(learn_sigma=model.cfg.learn_sigma)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.dit.parameters(), lr=self.optim_cfg.lr,
                                 weight_decay=self.optim_cfg.weight_decay)

    def losses(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample ``mse``, ``vb``, ``loss`` [B] of one batch with the draws of ``gen``."""
        from zoomfeat.errors import DataError

        x = batch["contexts"].to(self.device).transpose(1, 2)
        if not torch.isfinite(x).all():
            raise DataError("non-finite contexts in a training batch: rebuild the store with prepare-cdm")
        b = x.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (b,), generator=gen).to(self.device)
        noise = torch.randn(x.shape, generator=gen).to(self.device)
        p = self.model.cfg.class_dropout_prob
        drop = (torch.rand(b, generator=gen) < p).to(self.device) if p > 0 else None
        y = batch["mags"].to(self.device)
        cond = batch["cond"].to(self.device) if self.model.cfg.cond_dim else None
        dit = self.model.dit
        return self.diffusion.training_losses(lambda x_t, tt: dit(x_t, tt, y, cond, drop), x, t, noise)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        from zoomfeat.train.module import step_generator

        from zoomfeat.errors import DataError

        terms = self.losses(batch, step_generator(self.seed, self.global_step, self.global_rank))
        n = len(batch["mags"])
        loss = terms["loss"].mean()
        if not bool(torch.isfinite(loss.detach())):  # never a run that goes on (and exits 0) with a NaN model
            raise DataError(f"non-finite CDM loss at step {self.global_step}: lower --lr, set --grad-clip, or "
                            "check the scale of the contexts in the store")
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/mse", terms["mse"].mean(), batch_size=n)
        if "vb" in terms:
            self.log("train/vb", terms["vb"].mean(), batch_size=n)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimiser step, then the EMA update (so step checkpoints include it)."""
        super().optimizer_step(*args, **kwargs)
        self.model.update_ema()
