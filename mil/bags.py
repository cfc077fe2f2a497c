"""Bags of instance features read lazily from the per-slide HDF5 feature files (DESIGN.md, binding format).

A feature-set spec names a folder and one or more magnifications: ``DIR@20x`` is a bag of 20x features,
``DIR@20x+5x`` a bag of 20x instances, each concatenated with the feature of its parent 5x tile (found
through ``20x/parent_5x``). Any finer+coarser list works the same way; the finest magnification must come first
(``DIR@5x+20x`` is refused) and decides the instances and their coordinates.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np
import torch

from zoomfeat.errors import ConfigError, DataError
from zoomfeat.mags import mag_name, parse_mag


class MILDataWarning(UserWarning):
    """Slides left out of a run (no features, no label, empty bag): reported once, with a count."""


@dataclass(frozen=True)
class FeatureSpec:
    """A feature set: ``directory`` of ``<slide_id>.h5`` files and the magnifications fused, finest first."""

    directory: Path
    mags: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "FeatureSpec":
        """``"feats/zoomldm@20x+5x"`` -> FeatureSpec(Path("feats/zoomldm"), ("20x", "5x"))."""
        folder, sep, mags_text = str(text).rpartition("@")
        if not sep or not folder or not mags_text:
            raise ConfigError(f"feature set {text!r} lacks a magnification: write DIR@20x or DIR@20x+5x")
        names = [mag_name(parse_mag(m)) for m in mags_text.split("+") if m.strip()]
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"feature set {text!r}: repeated or empty magnification; write e.g. DIR@20x+5x")
        ordered = tuple(sorted(names, key=parse_mag, reverse=True))
        if tuple(names) != ordered:
            raise ConfigError(f"feature set {text!r}: magnifications go finest first (the first one gives the "
                              f"instances); write {folder}@{'+'.join(ordered)}")
        return cls(Path(folder), ordered)

    def __str__(self) -> str:
        return f"{self.directory}@{'+'.join(self.mags)}"

    def path(self, slide_id: str) -> Path:
        return self.directory / f"{slide_id}.h5"


@dataclass(frozen=True)
class Bag:
    """One slide's instances: ``features`` float32 [N, D]; ``coords_level0`` int64 [N, 2] (x, y) of the
    finest magnification's tiles, top-left corners in level-0 pixels."""

    slide_id: str
    features: torch.Tensor
    coords_level0: np.ndarray


def _group(fh: h5py.File, mag: str, path: Path) -> h5py.Group:
    if mag not in fh or "features" not in fh[mag]:
        present = ", ".join(k for k in fh.keys()) or "none"
        raise DataError(f"{path}: no features at {mag} (groups present: {present}); "
                        f"extract {mag} or change the feature set")
    return fh[mag]


def _check_complete(fh: h5py.File, path: Path) -> None:
    if not bool(fh.attrs.get("complete", False)):
        raise DataError(f"{path}: incomplete feature file (no 'complete' attribute); rerun the extraction")


def _bag_shape(fh: h5py.File, spec: FeatureSpec, path: Path) -> tuple[int, int]:
    """(N instances, fused dimension D) from dataset shapes only (no feature data is read)."""
    _check_complete(fh, path)
    groups = [_group(fh, m, path) for m in spec.mags]
    n = int(groups[0]["features"].shape[0])
    for coarse in spec.mags[1:]:
        if f"parent_{coarse}" not in groups[0]:
            raise DataError(f"{path}: group {spec.mags[0]} has no parent_{coarse}; extract with both "
                            f"magnifications ({'+'.join(spec.mags)}) in one run")
    return n, sum(int(g["features"].shape[1]) for g in groups)


def _read_fused(fh: h5py.File, spec: FeatureSpec, path: Path) -> tuple[np.ndarray, np.ndarray]:
    fine = _group(fh, spec.mags[0], path)
    parts = [np.asarray(fine["features"][()], dtype=np.float32)]
    for coarse in spec.mags[1:]:
        parents = np.asarray(fine[f"parent_{coarse}"][()], dtype=np.int64)
        coarse_feats = np.asarray(_group(fh, coarse, path)["features"][()], dtype=np.float32)
        if parents.size and (parents.min() < 0 or parents.max() >= len(coarse_feats)):
            raise DataError(f"{path}: {spec.mags[0]}/parent_{coarse} points outside {coarse}/features "
                            f"({len(coarse_feats)} rows); rerun the extraction")
        parts.append(coarse_feats[parents])
    coords = np.asarray(fine["coords"][()], dtype=np.int64)
    return np.concatenate(parts, axis=1), coords


def load_bag(spec: FeatureSpec, slide_id: str) -> Bag:
    """Read one slide's fused bag; float16 storage is upcast to float32. DataError for a missing,
    incomplete or empty file."""
    path = spec.path(slide_id)
    if not path.is_file():
        raise DataError(f"{path}: feature file not found; extract slide {slide_id} or drop it from the split")
    try:
        with h5py.File(path, "r") as fh:
            n, _ = _bag_shape(fh, spec, path)
            if n == 0:
                raise DataError(f"{path}: empty bag (0 instances at {spec.mags[0]}); "
                                "check the tissue mask or drop the slide")
            feats, coords = _read_fused(fh, spec, path)
    except OSError as exc:
        raise DataError(f"{path}: unreadable HDF5 file ({exc}); rerun the extraction") from exc
    return Bag(slide_id, torch.from_numpy(feats), coords)


def read_extractor(spec: FeatureSpec, slide_id: str) -> tuple[str | None, dict | None]:
    """(``extractor``, parsed ``extractor_config``) root attributes of one feature file."""
    with h5py.File(spec.path(slide_id), "r") as fh:
        name = fh.attrs.get("extractor")
        raw = fh.attrs.get("extractor_config")
    name = name.decode() if isinstance(name, bytes) else name
    raw = raw.decode() if isinstance(raw, bytes) else raw
    try:
        config = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        config = {"raw": str(raw)}
    return (str(name) if name is not None else None), config


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
    if not spec.directory.is_dir():
        raise ConfigError(f"feature folder {spec.directory} not found (from feature set {spec}); "
                          "check --features DIR@MAG")
    usable, missing, empty = [], [], []
    dim, first = None, None
    for slide_id in sorted(set(slide_ids)):
        path = spec.path(slide_id)
        if not path.is_file():
            missing.append(slide_id)
            continue
        with h5py.File(path, "r") as fh:
            n, d = _bag_shape(fh, spec, path)
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
