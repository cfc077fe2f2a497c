"""The typed, frozen configuration of ``zoomfeat extract``, validated before any slide is touched."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from zoomfeat.errors import ConfigError
from zoomfeat.mags import Magnification, mag_name, parse_mags
from zoomfeat.slides import check_scale_overrides
from zoomfeat.tissue import TissueParams

POOLINGS = ("mean", "meanmax")
NOISES = ("seeded", "none")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CONFIG_NAME = "extract_config.json"
_SHARD_RE = re.compile(r"^(\d+)/(\d+)$")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything one extraction run needs. ``encoder`` is ``"zoomldm"`` or a baseline encoder name.

    ZoomLDM runs use ``zoomldm_config`` (official config.yaml), ``weights`` (its checkpoint, None = random
    init, for benchmarks only), ``conditioner`` (``"uni"`` with ``conditioner_weights``, or ``"toy"``);
    baselines use ``weights`` for the encoder. ``mags`` are finest first. ``conditioning_out`` is where the
    conditioner's 20x embeddings are written as feature files (default ``<out>/../<conditioner>``);
    ``conditioning_dir`` reads them back instead of recomputing. ``devices`` x ``num_nodes`` processes
    (Lightning Fabric, DDP) each take one slide shard; ``shard`` ("i/n") is applied before that split.
    """

    out_dir: Path
    encoder: str = "zoomldm"
    mags: tuple[Magnification, ...] = parse_mags("20x,5x")
    zoomldm_config: Path | None = None
    weights: Path | None = None
    conditioner: str = "uni"
    conditioner_weights: Path | None = None
    timestep: int = 50
    block: int = 3
    pooling: str = "mean"
    noise: str = "seeded"
    batch_size: int = 32
    workers: int = 2
    device: str = "auto"
    precision: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    shard: str | None = None
    tiles_dir: Path | None = None
    conditioning_dir: Path | None = None
    conditioning_out: Path | None = None
    base_mag: float | None = None
    mpp: float | None = None
    min_tissue: float = 0.25
    saturation_threshold: float | None = None
    min_saturation: float = 20.0
    mask_mag: float = 1.25
    toy_seed: int = 0

    def __post_init__(self) -> None:
        if self.mags:
            object.__setattr__(self, "mags", parse_mags(self.mags))
        validate(self)

    @property
    def is_zoomldm(self) -> bool:
        return self.encoder == "zoomldm"

    @property
    def mag_names(self) -> tuple[str, ...]:
        return tuple(mag_name(m) for m in self.mags)

    @property
    def tissue(self):
        """The tissue detection settings (the same flags and rules as ``zoomfeat tile``)."""
        return TissueParams(min_tissue=self.min_tissue, mask_mag=self.mask_mag,
                            saturation_threshold=self.saturation_threshold, min_saturation=self.min_saturation)

    @property
    def slide_kwargs(self) -> dict:
        """Overrides passed to every ``Slide`` / dataset (``base_mag``, ``mpp``)."""
        return {"base_mag": self.base_mag, "mpp": self.mpp}

    def writes_conditioning(self) -> bool:
        """True when a ZoomLDM run computes (and so writes) the conditioner's 20x embeddings."""
        return self.is_zoomldm and self.conditioning_dir is None

    def conditioning_out_dir(self) -> Path:
        return self.conditioning_out or self.out_dir.parent / self.conditioner


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    match = _SHARD_RE.match(shard.strip())
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"bad --shard {shard!r}: use i/n with 0 <= i < n, e.g. 0/4")
    return int(match.group(1)), int(match.group(2))


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"bad --{name} {value!r}: use one of {', '.join(choices)}")


def _existing(option: str, path: Path | None) -> None:
    if path is not None and not Path(path).exists():
        raise ConfigError(f"{option} {path} does not exist: give an existing path")


def _validate_zoomldm(c: ExtractConfig) -> None:
    if c.zoomldm_config is None:
        raise ConfigError("--encoder zoomldm needs --zoomldm CONFIG_OR_DIR (the official config.yaml or its folder)")
    _existing("--zoomldm", c.zoomldm_config)
    if c.conditioning_dir is None:
        from zoomfeat.encoders.specs import parse_conditioner

        parse_conditioner(c.conditioner if c.conditioner_weights is None
                          else f"{c.conditioner}={c.conditioner_weights}")  # the one --conditioner rule
        _existing("--conditioner weights", c.conditioner_weights)
    else:
        _existing("--conditioning", c.conditioning_dir)
    if c.timestep < 0:
        raise ConfigError(f"bad --timestep {c.timestep}: use a step in [0, number of diffusion steps)")
    if c.block < 0:
        raise ConfigError(f"bad --block {c.block}: use a U-Net output block index >= 0 (default 3)")
    _choice("pooling", c.pooling, POOLINGS)
    _choice("noise", c.noise, NOISES)
    if c.writes_conditioning() and Path(c.conditioning_out_dir()).resolve() == Path(c.out_dir).resolve():
        raise ConfigError(f"--conditioning-out {c.conditioning_out_dir()} (default <out>/../<conditioner>) is --out "
                          "itself: the conditioning files would overwrite the features; pass another --conditioning-out")


def validate(c: ExtractConfig) -> None:
    """Raise ConfigError naming the first bad value and its fix."""
    if not c.mags:
        raise ConfigError("no magnification given: use e.g. --mags 20x,5x")
    if c.is_zoomldm:
        _validate_zoomldm(c)
    elif c.weights is None and c.encoder != "toy":
        raise ConfigError(f"--encoder {c.encoder} needs --weights PATH (a local weight file; nothing is downloaded)")
    _existing("--weights", c.weights)
    _existing("--tiles", c.tiles_dir)
    if c.batch_size < 1:
        raise ConfigError(f"bad --batch-size {c.batch_size}: use a positive number")
    if c.workers < 0:
        raise ConfigError(f"bad --workers {c.workers}: use 0 or more")
    _choice("device", c.device, DEVICES)
    _choice("precision", c.precision, PRECISIONS)
    if c.devices < 1:
        raise ConfigError(f"bad --devices {c.devices}: use the number of processes per node, 1 or more")
    if c.num_nodes < 1:
        raise ConfigError(f"bad --num-nodes {c.num_nodes}: use 1 or more")
    if c.shard is not None:
        parse_shard(c.shard)
    check_scale_overrides(c.base_mag, c.mpp)
    c.tissue  # ConfigError naming the bad tissue flag
