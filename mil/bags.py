"""Bags of instance features read lazily from the per-slide feature files (format: docs/formats.md).

A feature-set spec names a folder and one or more magnifications: ``DIR@20x`` is a bag of 20x features,
``DIR@20x+5x`` a bag of 20x instances, each concatenated with the feature of its parent 5x tile (found
through ``20x/parent_5x``). Any finer+coarser list works the same way; the finest magnification must come first
(``DIR@5x+20x`` is refused) and decides the instances and their coordinates. Other tools' layouts
(``trident:DIR@20x``, detected when unprefixed) and fusions across folders (``A@20x+B@5x``) are read through
:func:`zoomfeat.store.layouts.read_spec_bag`, which links instances by containment; a bag without coordinates (eva,
CLAM ``pt_files``) has ``coords_level0`` filled with -1.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from zoomfeat.errors import ConfigError, DataError
from zoomfeat.features import FeatureSpec
from zoomfeat.store import FeatureFile
from zoomfeat.store.layouts import detect_layout, read_spec_bag

__all__ = ["Bag", "BagStore", "FeatureSpec", "MILDataWarning", "ScanResult", "is_native", "load_bag",
           "read_extractor", "scan_bags"]


class MILDataWarning(UserWarning):
    """Slides left out of a run (no features, no label, empty bag): reported once, with a count."""


@dataclass(frozen=True)
class Bag:
    """One slide's instances: ``features`` float32 [N, D]; ``coords_level0`` int64 [N, 2] (x, y) of the
    finest magnification's tiles, top-left corners in level-0 pixels."""

    slide_id: str
    features: torch.Tensor
    coords_level0: np.ndarray


def is_native(spec: FeatureSpec) -> bool:
    """True when the whole bag comes from one folder of zoomfeat feature files (read by the store directly)."""
    if not spec.single_folder or spec.sources[0].layout not in (None, "zoomfeat"):
        return False
    if spec.sources[0].layout == "zoomfeat" or not spec.directory.is_dir():
        return True
    try:
        return detect_layout(spec.directory) == "zoomfeat"
    except ConfigError:
        return True  # an empty or unknown folder: the zoomfeat reader names what is missing


def _read(spec: FeatureSpec, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    path = spec.path(slide_id)
    if not path.is_file():
        raise DataError(f"{path}: feature file not found; extract slide {slide_id} or drop it from the split")
    if not is_native(spec):
        feats, coords = read_spec_bag(spec, slide_id)
        return feats, (np.full((len(feats), 2), -1, np.int64) if coords is None else coords)
    with FeatureFile(path) as f:
        f.require_complete(slide_id).fused_shape(spec.mags)
        return f.fused(spec.mags)


def load_bag(spec: FeatureSpec, slide_id: str) -> Bag:
    """Read one slide's fused bag; float16 storage is upcast to float32. DataError for a missing,
    incomplete, empty or non-finite file."""
    path = spec.path(slide_id)
    feats, coords = _read(spec, slide_id)
    n = len(feats)
    if n == 0:
        raise DataError(f"{path}: empty bag (0 instances at {spec.names[0]}); check the tissue mask or drop the slide")
    if not np.isfinite(feats).all():
        bad = int((~np.isfinite(feats)).any(axis=1).sum())
        raise DataError(f"{path}: {bad} of {n} instances of slide {slide_id} have NaN or inf features; "
                        "extract the slide again (and run `zoomfeat verify`) or drop it")
    return Bag(slide_id, torch.from_numpy(feats), coords)


def read_extractor(spec: FeatureSpec, slide_id: str) -> tuple[str | None, dict | None]:
    """(``extractor``, parsed ``extractor_config``) root attributes of one feature file; for another tool's
    layout, (``"<layout>:<encoder or folder>"``, a record of the layout and folder)."""
    if not is_native(spec):
        source = spec.sources[0]
        layout = source.layout or detect_layout(source.directory)
        folder = spec.path(slide_id).parent  # e.g. TRIDENT's features_<encoder> folder inside the one given
        name = folder.name if folder.name.startswith("features_") else source.directory.name
        encoder = name[len("features_"):] if name.startswith("features_") else name
        return f"{layout}:{encoder}", {"layout": layout, "folder": str(source.directory), "spec": str(spec)}
    with FeatureFile(spec.path(slide_id)) as f:
        return f.extractor, f.extractor_config


@dataclass(frozen=True)
class ScanResult:
    """Outcome of :func:`scan_bags`: usable slides, the fused dimension, and the slides left out."""

    usable: tuple[str, ...]
    dim: int
    missing: tuple[str, ...]
    empty: tuple[str, ...]


def _report(kind: str, ids: list[str], spec: FeatureSpec) -> None:
    if ids:
        examples = ", ".join(ids[:3])
        warnings.warn(f"{len(ids)} slide(s) {kind} in {spec.directory} (left out), e.g. {examples}",
                      MILDataWarning, stacklevel=3)


def scan_bags(spec: FeatureSpec, slide_ids: Iterable[str]) -> ScanResult:
    """Check every slide's file from its shapes only: complete, right groups, one feature dimension.

    Slides without a file or with an empty bag are reported once (a MILDataWarning with the count) and
    left out; an incomplete file or a dimension that differs from the first file raises DataError; a
    feature folder that does not exist raises ConfigError.
    """
    for folder in dict.fromkeys(s.directory for s in spec.sources):
        if not folder.is_dir():
            raise ConfigError(f"feature folder {folder} not found (from feature set {spec}); check --features DIR@MAG")
    usable, missing, empty = [], [], []
    dim, first = None, None
    native = is_native(spec)
    for slide_id in sorted(set(slide_ids)):
        path = spec.path(slide_id)
        if not all(p.is_file() for p in spec.files(slide_id)):
            missing.append(slide_id)
            continue
        if native:
            with FeatureFile(path) as f:
                n, d = f.require_complete(slide_id).fused_shape(spec.mags)
        else:
            n, d = _read(spec, slide_id)[0].shape
        if dim is None:
            dim, first = d, path
        elif d != dim:
            raise DataError(f"feature dimension differs: {first} has {dim}, {path} has {d}; "
                            "use features from one extractor and one magnification set")
        (usable if n > 0 else empty).append(slide_id)
    _report("have no feature file", missing, spec)
    _report("have an empty bag", empty, spec)
    if not usable:
        raise DataError(f"{spec.directory}: no non-empty feature file for any slide of the run; check --features")
    return ScanResult(tuple(usable), dim, tuple(missing), tuple(empty))


class BagStore:
    """Lazy per-slide access to bags with an optional in-memory cache (no whole-cohort load needed)."""

    def __init__(self, spec: FeatureSpec, cache: bool = True):
        self.spec = spec
        self.cache = cache
        self._bags: dict[str, Bag] = {}

    def get(self, slide_id: str) -> Bag:
        bag = self._bags.get(slide_id)
        if bag is None:
            bag = load_bag(self.spec, slide_id)
            if self.cache:
                self._bags[slide_id] = bag
        return bag
