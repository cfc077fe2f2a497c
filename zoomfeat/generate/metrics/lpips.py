"""LPIPS (Zhang et al. 2018, "The unreasonable effectiveness of deep features as a perceptual metric"), v0.1,
from LOCAL weight files: a torchvision AlexNet or VGG16 backbone state_dict and the LPIPS linear-layer file.

For images x, y in [-1, 1]: both are shifted and scaled per channel (shift (-0.030, -0.088, -0.188), scale
(0.458, 0.448, 0.450)), passed through the backbone; at each tap l (AlexNet: the 5 ReLUs; VGG16: relu1_2, 2_2,
3_3, 4_3, 5_3) the activations are unit-normalised over channels (f / (|f| + 1e-10)), their squared difference is
weighted per channel by the non-negative linear weights w_l and averaged over space; LPIPS is the sum over taps.

Linear weights: the LPIPS v0.1 file (keys ``lin{l}.model.1.weight`` [1, C_l, 1, 1]); when none is given, the copy
that ships inside the installed torchmetrics wheel (``torchmetrics/functional/image/lpips_models/<net>.pth``, the
same v0.1 weights) is used: a local file, never downloaded. The backbone has no such copy and must be given
(torchvision's ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``).
"""

from __future__ import annotations

from importlib import util as importlib_util
from pathlib import Path

import torch
from torch import nn

from zoomfeat.encoders.weights import load_strict, read_state_dict
from zoomfeat.errors import CheckpointError, ConfigError, DataError

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


def bundled_linear_weights(net: str) -> Path | None:
    """The LPIPS v0.1 linear weights shipped in the installed torchmetrics, or None."""
    found = importlib_util.find_spec("torchmetrics")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "functional" / "image" / "lpips_models" / f"{net}.pth"
    return path if path.is_file() else None


def _backbone(net: str) -> nn.Sequential:
    import torchvision

    model = torchvision.models.alexnet(weights=None) if net == "alex" else torchvision.models.vgg16(weights=None)
    return model.features


class LPIPS(nn.Module):
    """LPIPS distance per image pair: ``forward(x, y)`` with x, y float [B, 3, H, W] in [-1, 1] -> [B]."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in TAPS:
            raise ConfigError(f"LPIPS backbone {net!r} unknown: use one of {', '.join(TAPS)}")
        self.net_name = net
        self.features = _backbone(net)[: TAPS[net][-1] + 1]
        for module in self.features:
            if isinstance(module, nn.ReLU):
                module.inplace = False
        channels = [self.features[i - 1].out_channels for i in TAPS[net]]
        self.lins = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in channels])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, module in enumerate(self.features):
            x = module(x)
            if i in TAPS[self.net_name]:
                out.append(x)
        return out

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(len(x), device=x.device)
        for fx, fy, w in zip(self.taps(x), self.taps(y), self.lins):
            nx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
            ny = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
            total = total + ((nx - ny) ** 2 * w).sum(dim=1).mean(dim=(1, 2))
        return total


def load_lpips(backbone: str | Path, linear: str | Path | None = None, net: str = "alex") -> LPIPS:
    """LPIPS with a local torchvision backbone state_dict (``features.*`` keys; a full classifier file is fine) and
    a local v0.1 linear-weight file (default: torchmetrics' bundled copy)."""
    model = LPIPS(net)
    backbone = Path(backbone).expanduser()
    if not backbone.is_file():
        raise CheckpointError(f"LPIPS backbone {backbone} not found: pass --lpips-backbone with a local "
                              f"{BACKBONE_FILES[net]} (torchvision's ImageNet {net} weights); nothing is downloaded")
    state = read_state_dict(backbone)
    keep = {f"features.{i}." for i in range(len(model.features))}
    feats = {k: v for k, v in state.items() if any(k.startswith(p) for p in keep)}
    load_strict(model, {**{k: v for k, v in model.state_dict().items() if k.startswith("lins.")}, **feats},
                backbone, f"torchvision {net} features")
    lin_path = Path(linear).expanduser() if linear is not None else bundled_linear_weights(net)
    if lin_path is None or not lin_path.is_file():
        raise CheckpointError(f"LPIPS linear weights {lin_path or '(none bundled with torchmetrics)'} not found: "
                              f"pass --lpips-linear with the LPIPS v0.1 {net}.pth")
    lin = read_state_dict(lin_path)
    for i, param in enumerate(model.lins):
        key = f"lin{i}.model.1.weight"
        if key not in lin or tuple(lin[key].shape) != tuple(param.shape):
            raise CheckpointError(f"{lin_path} is not an LPIPS v0.1 {net} linear-weight file (no {key} of shape "
                                  f"{list(param.shape)})")
        param.data.copy_(lin[key].float())
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def lpips_uint8(model: LPIPS, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS of uint8 image batches [B, 3, H, W] (mapped to [-1, 1])."""
    if a.shape != b.shape:
        raise DataError(f"LPIPS needs images of one size, got {list(a.shape)} and {list(b.shape)}")
    dev = model.shift.device
    return model(a.to(dev).float() / 127.5 - 1.0, b.to(dev).float() / 127.5 - 1.0)
