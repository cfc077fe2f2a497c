"""The one ZoomLDM resolver (``tiny``, a folder, a hub reference, or a config + weights), torch-free, used by
every command.

``--zoomldm`` takes ``tiny`` (the packaged CPU-sized config, random or given weights), a folder holding
``config.yaml`` and a checkpoint, the path of a ``config.yaml``, a registered name (``zoomldm-brca``) or
``hf-hub:ORG/NAME[/SUBFOLDER][@REVISION]`` (:mod:`zoomfeat.hub`: resolved to files in the hub cache, offline
first); ``--weights`` names the checkpoint when it is not beside the config (a path or a hub reference).
Paths are checked here, at the boundary, with one-line errors naming the fix. :func:`zoomldm_config_path` is
the one "config.yaml or its folder" rule.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from zoomfeat import hub
from zoomfeat.errors import ConfigError

WEIGHT_NAMES = ("weights.ckpt", "model.ckpt", "last.ckpt")
TINY = "tiny"


def tiny_config_path() -> Path:
    """The official-format config of the tiny ZoomLDM shipped with the package (CPU-sized, for demos/tests)."""
    return Path(str(resources.files("zoomfeat.train").joinpath("tiny_zoomldm.yaml")))


def zoomldm_config_path(value: str | Path, option: str = "--zoomldm") -> Path:
    """The official ``config.yaml`` named by ``value``: ``tiny`` (the packaged one), the file, the folder that
    holds it, or a hub reference / registered name (its ``config.yaml``, fetched alone)."""
    if str(value).strip().lower() == TINY:
        return tiny_config_path()
    if hub.is_reference(value):
        return hub.resolve_files(value, (("config.yaml",),), option).files[0]
    path = Path(value)
    config = path / "config.yaml" if path.is_dir() else path
    if not config.is_file():
        raise ConfigError(f"ZoomLDM config {config} not found: pass {option} with the config.yaml, its folder, "
                          f"'tiny', a weights name ({hub.known_names()}) or {hub.FORM}")
    return config


@dataclass(frozen=True)
class ZoomLDMSource:
    """Where a ZoomLDM comes from: its official-format ``config`` and its checkpoint (None = random init)."""

    config: Path
    weights: Path | None

    @property
    def is_tiny(self) -> bool:
        return self.config == tiny_config_path()


def resolve_zoomldm(zoomldm: str | Path, weights: str | Path | None = None, *,
                    require_weights: bool = True) -> ZoomLDMSource:
    """Resolve ``--zoomldm`` (+ ``--weights``) to a :class:`ZoomLDMSource`.

    ``require_weights=False`` allows a config without a checkpoint (random init: training from scratch,
    benchmarks, ``tiny``). A weights path that is a folder is searched for one of :data:`WEIGHT_NAMES`.
    """
    if hub.is_reference(weights):
        weights = hub.local_file(weights, WEIGHT_NAMES, "--weights")
    if str(zoomldm).strip().lower() != TINY and hub.is_reference(zoomldm):
        entries = (("config.yaml",),) if weights is not None else (("config.yaml",), WEIGHT_NAMES)
        files = hub.resolve_files(zoomldm, entries, "--zoomldm").files
        config, search_dir = files[0], None
        if weights is None:
            return ZoomLDMSource(config, files[1])
    elif str(zoomldm).strip().lower() == TINY:
        config = tiny_config_path()
        search_dir = None
    else:
        config = zoomldm_config_path(zoomldm)
        search_dir = config.parent
    if weights is not None:
        wpath = Path(weights)
        if wpath.is_dir():
            found = [wpath / n for n in WEIGHT_NAMES if (wpath / n).is_file()]
            if not found:
                raise ConfigError(f"--weights {wpath} is a folder without {' / '.join(WEIGHT_NAMES)}: pass the "
                                  f"checkpoint file itself")
            wpath = found[0]
        elif not wpath.is_file():
            raise ConfigError(f"ZoomLDM checkpoint {wpath} not found: pass --weights with an existing file")
        return ZoomLDMSource(config, wpath)
    if search_dir is not None:
        for name in WEIGHT_NAMES:
            if (search_dir / name).is_file():
                return ZoomLDMSource(config, search_dir / name)
    if require_weights:
        where = f"beside {config} ({' / '.join(WEIGHT_NAMES)})" if search_dir else "for the tiny model"
        raise ConfigError(f"no ZoomLDM checkpoint {where}: pass --weights CKPT")
    return ZoomLDMSource(config, None)


def file_sha256(path: str | Path | None) -> str | None:
    """sha256 of a file (of every file, in sorted order, for a folder); None for None."""
    if path is None:
        return None
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
