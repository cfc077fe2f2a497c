"""CDM: the Conditioning Diffusion Model of ZoomLDM (paper §3.1, supplement §8.1; official ``cdm_dit/``).

A Diffusion Transformer learns the distribution of the Summarizer's output, the ``[65, D]`` context that
conditions ZoomLDM, given the magnification, so images can be drawn at any scale without a reference slide.
Modules, one stage each:

- :mod:`zoomfeat.cdm.dit`           -- ``DiT`` over the 65 context tokens (official state-dict names);
- :mod:`zoomfeat.cdm.diffusion`     -- Gaussian diffusion: cosine schedule, x0-prediction, learned-range
  variance, hybrid loss, respacing, DDIM;
- :mod:`zoomfeat.store.contexts` (in the store package) -- the HDF5 file of Summarizer contexts;
- :mod:`zoomfeat.cdm.config`        -- typed frozen configs of ``prepare-cdm`` and ``train-cdm``;
- :mod:`zoomfeat.cdm.prepare`       -- ``prepare_contexts``: a prepare-train set -> Summarizer contexts;
- :mod:`zoomfeat.cdm.data`          -- ``ContextSet`` and its step-keyed DataModule;
- :mod:`zoomfeat.cdm.module`        -- ``CDM`` (DiT + EMA, official export) and ``CDMLightning``;
- :mod:`zoomfeat.cdm.run`           -- ``train_cdm``: Trainer, step checkpoints, resume, official export;
- :mod:`zoomfeat.cdm.sample`        -- ``load_cdm`` and ``sample_contexts``.

Nothing heavy is imported here.
"""
