"""Inception-v3 pool3 features (2048-d) for FID, from a LOCAL weight file (never downloaded).

Two layouts of torchvision's ``Inception3`` state_dict are accepted (told apart by ``fc.weight``):

* ``fc`` with 1008 outputs: the TensorFlow FID network ported to PyTorch, the file pytorch-fid and clean-fid's
  ``legacy_pytorch`` mode use (``pt_inception-2015-12-05-6726825d.pth``). That network differs from torchvision's
  blocks in its pooling branches: the average pools of Mixed_5b-5d, 6b-6e and 7b do not count the zero padding
  (``count_include_pad=False``) and Mixed_7c pools by a 3x3 max instead of an average. FID values in papers are
  computed with this network.
* ``fc`` with 1000 outputs: torchvision's own ImageNet Inception-v3 (``inception_v3_google-*.pth``); its FIDs are
  not comparable to published ones (about 1.5 lower in the literature) and a warning says so.

Input: uint8 RGB [B, 3, H, W]; scaled to [0, 1], resized to 299x299 (bilinear, no antialias, as pytorch-fid),
mapped to [-1, 1]; output float32 [B, 2048] (global average pool after Mixed_7c).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import BasicConv2d, Inception3, InceptionE

from zoomfeat.encoders.weights import load_strict, read_state_dict
from zoomfeat.errors import CheckpointError, DataError
from zoomfeat.log import warn

FID_CLASSES = 1008  # the TF graph's classifier: marks the FID port
TORCHVISION_CLASSES = 1000
INPUT_SIZE = 299
FID_WEIGHT_FILE = "pt_inception-2015-12-05-6726825d.pth"


class PadExcludedPoolConv(BasicConv2d):
    """The 1x1 conv of a pooling branch, fed by torchvision's ``avg_pool2d(x, 3, 1, 1)`` (padding counted),
    rescaled first to the average without the padding: multiplied by 9 / (number of real pixels in the window)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ones = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
        count = F.avg_pool2d(ones, kernel_size=3, stride=1, padding=1, count_include_pad=True) * 9.0
        return super().forward(x * (9.0 / count))


class MaxPoolInceptionE(InceptionE):
    """InceptionE whose pooling branch is a 3x3 max pool (stride 1, padding 1): the FID network's Mixed_7c."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = super()._forward(x)  # computes the average-pool branch too; it is replaced below
        outs[-1] = self.branch_pool(F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
        return outs


def _pad_excluded(block: nn.Module) -> None:
    old = block.branch_pool
    new = PadExcludedPoolConv(old.conv.in_channels, old.conv.out_channels, kernel_size=1)
    block.branch_pool = new


def fid_inception(num_classes: int = FID_CLASSES) -> Inception3:
    """Randomly initialised network with the FID port's architecture (``num_classes`` 1008) or torchvision's
    (``num_classes`` 1000); no auxiliary head."""
    net = Inception3(num_classes=num_classes, aux_logits=False, transform_input=False, init_weights=False)
    if num_classes == FID_CLASSES:
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b"):
            _pad_excluded(getattr(net, name))
        old = net.Mixed_7c
        net.Mixed_7c = MaxPoolInceptionE(old.branch1x1.conv.in_channels)
    return net


class InceptionFeatures(nn.Module):
    """uint8 images -> 2048-d pool3 features of an Inception-v3 (eval mode, frozen)."""

    dim = 2048

    def __init__(self, net: Inception3, name: str = "inception"):
        super().__init__()
        self.net = net.eval()
        self.name = name
        for p in self.net.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"Inception features need uint8 [B, 3, H, W] images, got {images.dtype} "
                            f"{list(images.shape)}")
        device = next(self.net.parameters()).device
        x = images.to(device=device, dtype=torch.float32) / 255.0
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return x.mean(dim=(2, 3))


def load_inception(path: str | Path) -> InceptionFeatures:
    """The Inception feature network from a local state_dict (layout from ``fc.weight``; strict load)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Inception weight file {path} not found: pass --weights with a local copy of "
                              f"{FID_WEIGHT_FILE} (pytorch-fid's FID Inception); nothing is downloaded")
    state = read_state_dict(path)
    fc = state.get("fc.weight")
    classes = int(fc.shape[0]) if fc is not None else -1
    if classes not in (FID_CLASSES, TORCHVISION_CLASSES):
        raise CheckpointError(f"{path} is not an Inception-v3 state_dict (fc.weight with 1008 outputs for the FID "
                              f"port, 1000 for torchvision's), found {classes}: pass {FID_WEIGHT_FILE}")
    net = fid_inception(classes)
    load_strict(net, state, path, "Inception-v3 (torchvision Inception3 layout, no aux head)")
    if classes == TORCHVISION_CLASSES:
        warn(f"{path}: torchvision's ImageNet Inception, not the FID network: values are not comparable to "
             f"published FIDs (use {FID_WEIGHT_FILE})")
        return InceptionFeatures(net, "inception-torchvision")
    return InceptionFeatures(net, "inception-fid")
