"""Feature-set specs (torch-free): ``DIR@20x``, a fusion ``DIR@20x+5x``, parsed here and nowhere else.

A spec names one or more *sources* (a folder, its layout, one magnification), finest first: the finest gives
the instances and their coordinates, every coarser one is concatenated to each instance (its containing tile).

* ``DIR@20x`` / ``DIR@20x+5x``: zoomfeat feature files ``DIR/<slide_id>.h5``; the coarser rows come through the
  stored ``parent_<coarser>`` links.
* ``LAYOUT:DIR@20x`` names another tool's layout (``clam``, ``trident``, ``stamp``, ``slide2vec``, ``eva``; see
  :mod:`zoomfeat.store.layouts`); without a prefix a folder's layout is detected from its files.
* ``A@20x+B@5x`` fuses two folders (even of two layouts, e.g. ``trident:T@20x+zf@5x``): instances are linked by
  containment of their level-0 coordinates.

``str(spec)`` is the canonical form (canonical magnification names; a layout prefix only when one was given),
which is what run records store; :meth:`FeatureSpec.parse` reads it back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from zoomfeat.errors import ConfigError
from zoomfeat.mags import Magnification, parse_mag

LAYOUT_NAMES = ("zoomfeat", "clam", "trident", "stamp", "slide2vec", "eva")


@dataclass(frozen=True)
class FeatureSource:
    """One magnification of one folder: ``layout`` None means detected from the folder's files."""

    directory: Path
    mag: Magnification
    layout: str | None = None

    def __str__(self) -> str:
        prefix = f"{self.layout}:" if self.layout else ""
        return f"{prefix}{self.directory}@{self.mag.name}"


@dataclass(frozen=True)
class FeatureSpec:
    """A feature set: ``directory`` of the finest source, the magnifications fused (finest first), and, for
    layouts other than zoomfeat's or fusions across folders, the ``sources`` (one per magnification)."""

    directory: Path
    mags: tuple[Magnification, ...]
    sources: tuple[FeatureSource, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))
        object.__setattr__(self, "mags", tuple(parse_mag(m) for m in self.mags))
        if not self.sources:
            object.__setattr__(self, "sources", tuple(FeatureSource(self.directory, m) for m in self.mags))

    @classmethod
    def parse(cls, text: str | FeatureSpec) -> FeatureSpec:
        """``"feats/zoomldm@20x+5x"`` -> FeatureSpec(Path("feats/zoomldm"), (20x, 5x)); ConfigError otherwise."""
        if isinstance(text, FeatureSpec):
            return text
        parts = [p for p in str(text).split("+")]
        if not parts or "@" not in parts[0]:
            raise ConfigError(f"feature set {text!r} lacks a magnification: write DIR@20x or DIR@20x+5x")
        sources: list[FeatureSource] = []
        for part in parts:
            if not part.strip():
                raise ConfigError(f"feature set {text!r}: empty magnification; write e.g. DIR@20x+5x")
            if "@" in part:
                folder, _, mag_text = part.rpartition("@")
                layout, folder = _split_layout(folder)
                if not folder or not mag_text.strip():
                    raise ConfigError(f"feature set {text!r} lacks a folder or magnification: write DIR@20x")
            else:
                layout, folder, mag_text = sources[-1].layout, str(sources[-1].directory), part
            try:
                sources.append(FeatureSource(Path(folder), parse_mag(mag_text), layout))
            except ConfigError as exc:
                raise ConfigError(f"feature set {text!r}: {exc}") from exc
        mags = [s.mag for s in sources]
        if len(set(mags)) != len(mags):
            raise ConfigError(f"feature set {text!r}: repeated magnification; write e.g. DIR@20x+5x")
        ordered = sorted(sources, key=lambda s: s.mag, reverse=True)
        if ordered != sources:
            raise ConfigError(f"feature set {text!r}: magnifications go finest first (the first one gives the "
                              f"instances); write {_text(tuple(ordered))}")
        return cls(sources[0].directory, tuple(mags), tuple(sources))

    @property
    def names(self) -> tuple[str, ...]:
        """Canonical magnification names, finest first (``("20x", "5x")``)."""
        return tuple(m.name for m in self.mags)

    @property
    def mags_text(self) -> str:
        """``"20x+5x"``."""
        return "+".join(self.names)

    @property
    def single_folder(self) -> bool:
        """All magnifications from one folder, in one (given or detected) layout."""
        return len({(s.directory, s.layout) for s in self.sources}) == 1

    @property
    def layouts(self) -> tuple[str | None, ...]:
        return tuple(s.layout for s in self.sources)

    def __str__(self) -> str:
        return _text(self.sources)

    def path(self, slide_id: str) -> Path:
        """The finest source's file of a slide (zoomfeat layout: ``DIR/<slide_id>.h5``)."""
        return self.files(slide_id)[0]

    def files(self, slide_id: str) -> list[Path]:
        """Every file a slide's bag is read from (one per distinct source folder), finest first."""
        out: list[Path] = []
        seen: set[tuple[Path, str | None]] = set()
        for source in self.sources:
            key = (source.directory, source.layout)
            if key in seen:
                continue
            seen.add(key)
            out.append(_source_file(source, slide_id))
        return out


def _split_layout(folder: str) -> tuple[str | None, str]:
    head, sep, rest = folder.partition(":")
    if sep and head.strip().lower() in LAYOUT_NAMES:
        return head.strip().lower(), rest
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]+", head.strip()) and not Path(folder).exists():
        raise ConfigError(f"unknown feature layout {head.strip()!r} in {folder!r}: use one of "
                          f"{', '.join(sorted(LAYOUT_NAMES))} (or no prefix for a zoomfeat folder)")
    return None, folder


def _text(sources: tuple[FeatureSource, ...] | list[FeatureSource]) -> str:
    """Canonical text: ``[layout:]DIR@20x+5x`` for one folder, ``A@20x+B@5x`` across folders."""
    if len({(s.directory, s.layout) for s in sources}) == 1:
        first = sources[0]
        prefix = f"{first.layout}:" if first.layout else ""
        return f"{prefix}{first.directory}@{'+'.join(s.mag.name for s in sources)}"
    return "+".join(str(s) for s in sources)


def _source_file(source: FeatureSource, slide_id: str) -> Path:
    layout = source.layout
    if layout in (None, "zoomfeat"):
        native = source.directory / f"{slide_id}.h5"
        if layout == "zoomfeat" or native.is_file() or not source.directory.is_dir():
            return native
        from zoomfeat.store.layouts import detect_layout

        layout = detect_layout(source.directory)
        if layout == "zoomfeat":
            return native
    from zoomfeat.store.layouts import layout_files

    return layout_files(layout, source.directory).get(slide_id, source.directory / f"{slide_id}.missing")


SYNTHETIC_SEP = "~syn"
_SYNTHETIC_RE = re.compile(r"^(?P<source>.+)~syn(?P<k>\d+)$")


def synthetic_id(slide_id: str, copy: int) -> str:
    """``("TCGA-01", 2) -> "TCGA-01~syn2"``: the slide id of a synthetic copy (also its file stem)."""
    return f"{slide_id}{SYNTHETIC_SEP}{int(copy)}"


def source_of(slide_id: str) -> str | None:
    """The real slide a synthetic id copies (``"a~syn0" -> "a"``), None for a real slide id."""
    match = _SYNTHETIC_RE.match(slide_id)
    return match.group("source") if match else None
