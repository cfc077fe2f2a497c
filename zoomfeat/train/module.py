"""``ZoomLDMLightning``: the thin LightningModule that trains a :class:`zoomfeat.model.ZoomLDM`.

Objective (the official LatentDiffusion recipe): eps-prediction MSE with ``t`` uniform over the schedule,
the whole context replaced by zeros with probability ``p_uncond`` (classifier-free dropout), the U-Net and
the Summarizer trained jointly with AdamW, the first stage frozen (eval mode, no grad, not in the optimiser),
an EMA of the U-Net updated after every optimiser step (``model_ema.*``). The random draws of a step (t,
noise, dropout mask) come from a generator seeded by ``(seed, global_step, rank)``, so resuming is exact.
A run whose loss shows it has diverged stops with a one-line error (:class:`LossWatch`).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from zoomfeat.errors import TrainingError
from zoomfeat.mags import MAGNIFICATIONS, mag_name
from zoomfeat.train.config import OptimSection, ValidationSection
from zoomfeat.train.samples import save_sample_grid


def warmup_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, start_factor: float):
    """torch's ``LinearLR``: lr x ``start_factor`` at step 0, rising linearly to lr at ``warmup_steps``, then lr."""
    if warmup_steps <= 0:
        return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=1.0, total_iters=0)
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=start_factor, end_factor=1.0,
                                             total_iters=warmup_steps)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """CPU generator for one training step's random draws."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank, 7]).generate_state(1)[0]))


def ema_context(model):
    """Context with the EMA weights in the U-Net when the model keeps an EMA; a no-op otherwise."""
    return model.ema_swap() if hasattr(model, "model_ema") else contextlib.nullcontext(model)


class LossWatch:
    """Stops a run whose eps-MSE training loss shows that it has diverged, so that it does not go on and exit 0
    with dead weights (and `extract` then read features from them). A model that predicts no noise at all
    scores E[eps^2] = 1 (``TRIVIAL``); a run is stopped on

    - a non-finite loss at any step;
    - a mean over a window of ``window`` steps above 10x that level (exploded);
    - a window mean back above 0.8x that level after a window below 0.5x (collapsed to the trivial predictor:
      a tiny model at lr 2e-3 went from 0.007 to 0.98 within 150 steps and stayed there).

    Steps are ``global_step`` values, the numbering of the checkpoint names (``step_<n>.ckpt`` holds the
    weights after n steps). The windows restart on resume."""

    TRIVIAL = 1.0
    FIX = "train into a new --out with a lower --lr or with --grad-clip"

    def __init__(self, window: int = 50):
        self.window = window
        self.values: list[float] = []
        self.best: tuple[float, int, int] | None = None  # (window mean, first step, last step)
        self.healthy = 0  # checkpoint step after the last window below 0.5x the trivial level

    def __call__(self, value: float, step: int) -> None:
        if not math.isfinite(value):
            raise TrainingError(f"training loss is {value} at step {step}: the run diverged; {self.FIX}")
        self.values.append(value)
        if len(self.values) < self.window:
            return
        mean, first = sum(self.values) / len(self.values), step - len(self.values) + 1
        self.values = []
        where = f"training loss averaged {mean:.3g} over steps {first}-{step}"
        if mean > 10 * self.TRIVIAL:
            raise TrainingError(f"{where}, over 10x the {self.TRIVIAL:g} of a model that predicts no noise: the "
                                f"run diverged; {self.FIX}")
        if self.best is not None and self.best[0] < 0.5 * self.TRIVIAL and mean > 0.8 * self.TRIVIAL:
            raise TrainingError(f"{where} after {self.best[0]:.3g} over steps {self.best[1]}-{self.best[2]}: back "
                                f"near the {self.TRIVIAL:g} of a model that predicts no noise, the run collapsed "
                                f"(checkpoints up to step_{self.healthy:07d} predate it); {self.FIX}")
        if self.best is None or mean < self.best[0]:
            self.best = (mean, first, step)
        if mean < 0.5 * self.TRIVIAL:
            self.healthy = step + 1


class ZoomLDMLightning(L.LightningModule):
    """Holds ``model`` (a ZoomLDM) and trains it; ``sample_dir`` receives validation sample PNGs."""

    def __init__(self, model, optim: OptimSection, validation: ValidationSection, seed: int = 0,
                 sample_dir: str | Path | None = None):
        super().__init__()
        self.model = model
        self.optim_cfg = optim
        self.val_cfg = validation
        self.seed = int(seed)
        self.sample_dir = Path(sample_dir) if sample_dir is not None else None
        self._freeze_first_stage()
        if optim.summarizer_lr_scale == 0:  # kept at its initialisation: no gradient is computed for it
            self.model.cond_stage_model.requires_grad_(False)
        self._val_contexts: dict[int, list[torch.Tensor]] = {}
        self.watch = LossWatch()

    # -- parameters -------------------------------------------------------------------------------
    def _freeze_first_stage(self) -> None:
        fs = self.model.first_stage_model
        fs.eval()
        for p in fs.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.first_stage_model.eval()  # stays in eval whatever Lightning asks
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """U-Net + Summarizer parameters (the first stage, the EMA buffers and a frozen Summarizer excluded)."""
        return [p for group in self._param_groups() for p in group["params"]]

    def _param_groups(self) -> list[dict]:
        """The U-Net at lr; the Summarizer, unless frozen, at lr x ``optim.summarizer_lr_scale``."""
        o = self.optim_cfg
        groups = [{"params": [p for p in self.model.model.parameters() if p.requires_grad], "lr": o.lr}]
        summarizer = [p for p in self.model.cond_stage_model.parameters() if p.requires_grad]
        if summarizer:
            groups.append({"params": summarizer, "lr": o.lr * o.summarizer_lr_scale})
        return groups

    def configure_optimizers(self):
        o = self.optim_cfg
        opt = torch.optim.AdamW(self._param_groups(), lr=o.lr, weight_decay=o.weight_decay)
        sched = warmup_scheduler(opt, o.warmup_steps, o.warmup_start_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # -- loss -------------------------------------------------------------------------------------
    def context(self, grids: list[torch.Tensor], mags: torch.Tensor) -> torch.Tensor:
        """Summarizer context [B, 65, D] from raw grids (preprocessed as the model does)."""
        prepped = [self.model.preprocess_ssl(g.to(self.device)) for g in grids]
        return self.model.summarize(prepped, mags.to(self.device))

    def diffusion_loss(self, batch: dict, gen: torch.Generator, p_uncond: float) -> torch.Tensor:
        """Per-sample eps MSE, float32 [B]."""
        z = batch["latents"].to(self.device)
        b = z.shape[0]
        t = torch.randint(0, int(self.model.num_timesteps), (b,), generator=gen).to(self.device)
        noise = torch.randn(z.shape, generator=gen).to(self.device, z.dtype)
        keep = (torch.rand(b, generator=gen) >= p_uncond).to(self.device)
        context = self.context(batch["grids"], batch["mags"])
        context = context * keep.to(context.dtype)[:, None, None]
        x_t = self.model.q_sample(z, t, noise)
        eps = self.model.unet(x_t, t, context)
        return F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        gen = step_generator(self.seed, self.global_step, self.global_rank)
        loss = self.diffusion_loss(batch, gen, self.optim_cfg.p_uncond).mean()
        # the mean over the processes (DDP), so that every rank takes the same decision and none waits for a
        # rank that stopped; checked before this step's update: a stopped run does not take it
        self.watch(float(self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")), self.global_step)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["mags"]))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=len(batch["mags"]))
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """A non-finite gradient (a finite loss can overflow in the backward pass) stops the run before the
        update would write NaN into the weights, and so into the next checkpoint. Under fp16 mixed precision
        the GradScaler skips such steps itself (and lowers its scale), so they are left to it."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
            raise TrainingError(f"the gradient is not finite at step {self.global_step}: the run diverged; "
                                f"{LossWatch.FIX}")

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimiser step, then the EMA update (here, so checkpoints saved at this step include it)."""
        super().optimizer_step(*args, **kwargs)
        if hasattr(self.model, "model_ema"):
            self.model.update_ema(self.optim_cfg.ema_decay)

    # -- validation -------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        n = len(MAGNIFICATIONS)
        self._val_sum = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros(n, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate the eps-MSE per magnification (fixed t / noise per batch, no context dropout)."""
        gen = step_generator(self.seed, 10**9 + batch_idx, self.global_rank)
        losses = self.diffusion_loss(batch, gen, 0.0).double()
        mags = batch["mags"].to(self.device)
        self._val_sum.index_add_(0, mags, losses)
        self._val_count.index_add_(0, mags, torch.ones_like(losses))
        if self.val_cfg.samples and self.sample_dir is not None:
            self._keep_contexts(batch)

    def _log_val_losses(self) -> None:
        """Reduce the sums over ranks (same keys on every rank, so DDP cannot deadlock), then log."""
        sums = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        counts = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        if float(counts.sum()) == 0:
            return
        for m in torch.nonzero(counts).flatten().tolist():
            self.log(f"val/loss_{mag_name(MAGNIFICATIONS[m])}", float(sums[m] / counts[m]), rank_zero_only=True)
        self.log("val/loss", float(sums.sum() / counts.sum()), prog_bar=True, rank_zero_only=True)

    @torch.no_grad()
    def _keep_contexts(self, batch: dict) -> None:
        want = self.val_cfg.samples_per_mag
        for m in torch.unique(batch["mags"]).tolist():
            have = self._val_contexts.setdefault(m, [])
            room = want - sum(int(c.shape[0]) for c in have)
            rows = [i for i, v in enumerate(batch["mags"].tolist()) if v == m][: max(room, 0)]
            if rows:
                have.append(self.context([batch["grids"][i] for i in rows], batch["mags"][rows]))

    def on_validation_epoch_end(self) -> None:
        self._log_val_losses()
        contexts, self._val_contexts = self._val_contexts, {}
        if not contexts or self.sample_dir is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        with torch.no_grad(), ema_context(self.model):
            for m, parts in sorted(contexts.items()):
                images = self._sample(torch.cat(parts))
                path = self.sample_dir / f"step_{self.global_step:07d}_{mag_name(MAGNIFICATIONS[m])}.png"
                save_sample_grid(images, path)

    def _sample(self, context: torch.Tensor) -> torch.Tensor:
        """Decoded DDIM samples in [-1, 1], float32 [n, 3, H, W]; x_T seeded by the step."""
        gen = step_generator(self.seed, self.global_step, 99)
        shape = (context.shape[0], *self._latent_shape())
        x_T = torch.randn(shape, generator=gen).to(self.device)
        z = self.model.sample(context, x_T, steps=self.val_cfg.sample_steps, guidance=self.val_cfg.guidance,
                              sampler="ddim")
        return self.model.decode_first_stage(z).float().clamp(-1, 1).cpu()

    def _latent_shape(self) -> tuple[int, int, int]:
        d = self.model.config.diffusion
        return (int(d.channels), int(d.image_size), int(d.image_size))
