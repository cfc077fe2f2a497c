"""Feature-set specs (torch-free): ``DIR@20x`` or a fusion ``DIR@20x+5x``, parsed here and nowhere else.

A spec names a folder of ``<slide_id>.h5`` feature files and one or more magnifications, finest first: the
finest gives the instances and their coordinates, every coarser one is concatenated to each instance through
its ``parent_<coarser>`` link. ``str(spec)`` is the canonical form (``DIR@20x+5x``, canonical magnification
names), which is what run records store; :meth:`FeatureSpec.parse` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zoomfeat.errors import ConfigError
from zoomfeat.mags import Magnification, parse_mag


@dataclass(frozen=True)
class FeatureSpec:
    """A feature set: ``directory`` of ``<slide_id>.h5`` files and the magnifications fused, finest first."""

    directory: Path
    mags: tuple[Magnification, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))
        object.__setattr__(self, "mags", tuple(parse_mag(m) for m in self.mags))

    @classmethod
    def parse(cls, text: str | FeatureSpec) -> FeatureSpec:
        """``"feats/zoomldm@20x+5x"`` -> FeatureSpec(Path("feats/zoomldm"), (20x, 5x)); ConfigError otherwise."""
        if isinstance(text, FeatureSpec):
            return text
        folder, sep, mags_text = str(text).rpartition("@")
        if not sep or not folder or not mags_text:
            raise ConfigError(f"feature set {text!r} lacks a magnification: write DIR@20x or DIR@20x+5x")
        try:
            mags = [parse_mag(m) for m in mags_text.split("+") if m.strip()]
        except ConfigError as exc:
            raise ConfigError(f"feature set {text!r}: {exc}") from exc
        if len(set(mags)) != len(mags) or not mags:
            raise ConfigError(f"feature set {text!r}: repeated or empty magnification; write e.g. DIR@20x+5x")
        ordered = tuple(sorted(mags, reverse=True))
        if tuple(mags) != ordered:
            raise ConfigError(f"feature set {text!r}: magnifications go finest first (the first one gives the "
                              f"instances); write {folder}@{'+'.join(m.name for m in ordered)}")
        return cls(Path(folder), ordered)

    @property
    def names(self) -> tuple[str, ...]:
        """Canonical magnification names, finest first (``("20x", "5x")``)."""
        return tuple(m.name for m in self.mags)

    @property
    def mags_text(self) -> str:
        """``"20x+5x"``."""
        return "+".join(self.names)

    def __str__(self) -> str:
        return f"{self.directory}@{self.mags_text}"

    def path(self, slide_id: str) -> Path:
        return self.directory / f"{slide_id}.h5"
