"""Encoder specs, torch-free: what each registered encoder is (output size, preprocessing, weight-file layout).

This is the metadata half of the encoder registry: CLI choices, help texts and docs read it without importing
torch (``zoomfeat --help`` stays instant). The networks half (:mod:`zoomfeat.encoders.registry`) registers one
``Encoder`` class per spec with ``@register_encoder(SPEC)``; a test checks that both halves hold the same names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zoomfeat import hub
from zoomfeat.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder is: output size, preprocessing and weight-file layout.

    ``input_size`` is the side in px of the square image ``forward`` takes; ``mean``/``std`` are per RGB
    channel on the [0, 1] scale; ``weight_files`` are the official file names, any one of which a weight
    folder may hold (Phikon also needs ``config_files``); ``magnification`` is the objective power the
    encoder was trained at (20.0 for 20x).
    """

    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weight_files: tuple[str, ...]
    magnification: float = 20.0
    config_files: tuple[str, ...] = ()
    architecture: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.dim < 1 or self.input_size < 1:
            raise ConfigError(f"encoder {self.name!r}: dim and input_size must be >= 1, got "
                              f"{self.dim} and {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"encoder {self.name!r}: mean and std need 3 values with std > 0")


SPECS: dict[str, EncoderSpec] = {}


def _spec(spec: EncoderSpec) -> EncoderSpec:
    if spec.name in SPECS:
        raise ValueError(f"encoder spec {spec.name!r} is defined twice")
    SPECS[spec.name] = spec
    return spec


def encoder_names() -> list[str]:
    """Registered encoder names, sorted (the CLI's choices)."""
    return sorted(SPECS)


def encoder_help() -> str:
    """One line per encoder for --help texts: ``name (dim-d): description``."""
    return "; ".join(f"{s.name} ({s.dim}-d): {s.description}" for s in (SPECS[n] for n in encoder_names()))


UNI = _spec(EncoderSpec(
    name="uni",
    dim=1024,
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    weight_files=("pytorch_model.bin",),
    architecture="timm vit_large_patch16_224, init_values 1e-5, dynamic_img_size, CLS token",
    description="MahmoodLab UNI (ViT-L/16, DINOv2, 20x)",
))

PHIKON = _spec(EncoderSpec(
    name="phikon",
    dim=768,
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    weight_files=("model.safetensors", "pytorch_model.bin"),
    config_files=("config.json",),
    architecture="HF ViTModel ViT-B/16 (built as timm VisionTransformer), CLS of last hidden state",
    description="Owkin Phikon (iBOT ViT-B/16, 20x)",
))

CTRANSPATH = _spec(EncoderSpec(
    name="ctranspath",
    dim=768,
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    weight_files=("ctranspath.pth",),
    architecture="timm swin_tiny_patch4_window7_224 with ConvStem patch embedding, token mean",
    description="CTransPath (Swin-T + ConvStem, 20x)",
))

DINOV2 = _spec(EncoderSpec(
    name="dinov2",
    dim=1024,
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    weight_files=("model.safetensors", "dinov2_vitl14_reg4_pretrain.pth", "pytorch_model.bin"),
    architecture="timm vit_large_patch14_reg4_dinov2, dynamic_img_size, CLS token",
    description="DINOv2 ViT-L/14 with registers (natural images; the NAIP ZoomLDM conditioner)",
))

CONCH = _spec(EncoderSpec(
    name="conch",
    dim=512,
    input_size=448,
    mean=(0.48145466, 0.4578275, 0.40821073),  # OpenAI CLIP's, as CONCH's transform uses
    std=(0.26862954, 0.26130258, 0.27577711),
    weight_files=("pytorch_model.bin",),
    architecture="CoCa vision tower: timm ViT-B/16 at 448 px + attentional pooler (1 query) + LayerNorm",
    description="MahmoodLab CONCH image encoder (ViT-B/16, vision-language, 20x)",
))

TOY = _spec(EncoderSpec(
    name="toy",
    dim=64,
    input_size=64,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    weight_files=(),
    architecture="3 conv (stride 2) + global average pool + linear; random, seeded",
    description="tiny random seeded encoder for tests and the demo (not a pathology model)",
))


def encoder_weights(name: str, value: str | Path | None, option: str = "--weights") -> Path | None:
    """The local weight path of encoder ``name`` for an option's value: a local path unchanged; a registered
    name (``uni``) or ``hf-hub:ORG/NAME[/SUBFOLDER][@REVISION]`` resolved (:mod:`zoomfeat.hub`) to its weight
    file in the hub cache, fetched with the files it needs beside it (Phikon's ``config.json``)."""
    if value is None:
        return None
    spec = SPECS[name]
    return hub.local_file(value, spec.weight_files, option, extra=tuple((c,) for c in spec.config_files))


def parse_conditioner(value: str, option: str = "--conditioner") -> tuple[str, str | None]:
    """The one parser of ``--conditioner``: ``toy`` -> ("toy", None); ``NAME=WEIGHTS`` -> (NAME, local path) for
    any registered encoder that has weight files (``uni=weights/uni``, ``uni=uni``, ``uni=hf-hub:MahmoodLab/UNI``:
    hub references are resolved to their local file here)."""
    name, sep, path = str(value).partition("=")
    name = name.strip().lower()
    if name in SPECS and not SPECS[name].weight_files and not sep:
        return name, None
    if name in SPECS and SPECS[name].weight_files and sep and path.strip():
        return name, str(encoder_weights(name, path.strip(), f"{option} {name}="))
    with_weights = [n for n in encoder_names() if SPECS[n].weight_files]
    if name in SPECS and SPECS[name].weight_files:
        hubname = f" or {name}={name} (the hub weights: zoomfeat fetch-weights {name})" if name in hub.KNOWN else ""
        raise ConfigError(f"{option} {value!r}: {name} needs its weights: write {name}=PATH{hubname}")
    raise ConfigError(f"bad {option} {value!r}: use NAME=PATH with NAME one of {', '.join(with_weights)}, or toy")
