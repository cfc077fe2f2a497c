"""ZoomLDM training: the multi-magnification training set, its DataModule, the LightningModule and the run.

Modules, one stage each:

- :mod:`zoomfeat.train.config`  -- typed frozen configs (``PrepareConfig``, ``TrainConfig``) read from YAML;
- :mod:`zoomfeat.train.prepare` -- ``prepare_training_set``: slides -> HDF5 shards of latents + UNI grids;
- :mod:`zoomfeat.train.dataset` -- ``TrainingSet`` (reads the shards) and ``ZoomLDMDataModule``;
- :mod:`zoomfeat.train.ema`     -- the U-Net EMA update (LitEma semantics over ``model_ema.*``);
- :mod:`zoomfeat.train.module`  -- ``ZoomLDMLightning``: loss, optimiser, EMA, validation samples;
- :mod:`zoomfeat.train.run`     -- ``train``: Trainer, loggers, checkpoints, resume, official export.

Nothing heavy is imported here, so ``import zoomfeat.train`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
EXAMPLE_TRAIN_YAML = PACKAGE_DIR / "example_train.yaml"
TINY_ZOOMLDM_YAML = PACKAGE_DIR / "tiny_zoomldm.yaml"

__all__ = ["EXAMPLE_TRAIN_YAML", "PACKAGE_DIR", "TINY_ZOOMLDM_YAML"]
