"""Per-slide feature extraction: ZoomLDM (conditioned on 20x UNI grids) and baseline encoders.

``extract(cfg, slides)`` runs the whole batch (see :mod:`zoomfeat.extract.runner`); the per-batch
computations live in :mod:`zoomfeat.extract.zoomldm` and :mod:`zoomfeat.extract.baseline`. Heavy imports
(torch, HDF5, openslide) happen in the submodules, not here.
"""

from zoomfeat.extract.config import ExtractConfig

__all__ = ["ExtractConfig", "extract"]


def extract(cfg, slides):
    """Extract features of ``slides`` (files or folders) with ``cfg``; returns the exit code."""
    from zoomfeat.extract.runner import extract as _extract

    return _extract(cfg, slides)
