"""The one interface of everything that turns patches into feature rows: ZoomLDM and the baseline encoders.

A :class:`Featurizer` has a ``dim`` (feature width D), a ``provenance`` (JSON-able record of what makes its
numbers: weights sha256, timestep, ..., stored as the feature files' ``extractor_config``) and is called on a
:class:`PatchBatch`, returning float32 [B, D]. The runner only ever sees this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from zoomfeat.mags import Magnification


@dataclass(frozen=True)
class PatchBatch:
    """One batch of patches of one slide at one magnification.

    ``images`` uint8 tensor [B, 3, 256, 256]; ``coords_level0`` int64 [B, 2] patch corners; ``grids`` float32
    [B, C, g, g] raw conditioning grids (None for encoders that take none)."""

    images: Any
    mag: Magnification
    coords_level0: np.ndarray
    slide_id: str
    grids: np.ndarray | None = None


@runtime_checkable
class Featurizer(Protocol):
    """Patches -> feature rows (see the module docstring)."""

    @property
    def dim(self) -> int: ...

    @property
    def provenance(self) -> dict: ...

    def __call__(self, batch: PatchBatch) -> np.ndarray: ...
