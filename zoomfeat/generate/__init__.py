"""Generation wing: images from ZoomLDM (see docs/ARCHITECTURE.md and docs/generation.md).

One module per stage, data flowing one way:

* :mod:`~zoomfeat.generate.conditions` -- where conditions come from (slide + coordinates, tile store, saved
  conditioning file): raw 20x grids under patches, and the context sources registry
  (``CONTEXT_SOURCES``; a source is ``fn(model, request) -> Conditions`` giving contexts [B, 65, D] for one
  magnification; ``zoomfeat.generate.conditions.contexts_for_mag`` is the grid -> context function);
* :mod:`~zoomfeat.generate.interpolate` -- slerp and the 20x condition at a window position;
* :mod:`~zoomfeat.generate.guidance` -- classifier-free guidance in the standard and the large-image form, and
  the 0-/1-based timestep conventions;
* :mod:`~zoomfeat.generate.samplers` -- batch patch sampling (contexts in, latents out), DDIM/PLMS;
* :mod:`~zoomfeat.generate.windows` -- Gaussian window, MultiDiffusion window sampler (``grid`` method) and the
  official refinement pass;
* :mod:`~zoomfeat.generate.joint` -- ZoomLDM §3.2 joint multi-scale sampling (a sampled or a fixed guide);
* :mod:`~zoomfeat.generate.resize` -- antialiased bicubic Resizer; :mod:`~zoomfeat.generate.decode` --
  sliding-window decoder for large latents;
* :mod:`~zoomfeat.generate.images` -- PNG, contact sheet, pyramidal TIFF; :mod:`~zoomfeat.generate.manifest`
  -- provenance so any image can be regenerated exactly.

Importing a submodule imports torch; this package file does not.
"""
