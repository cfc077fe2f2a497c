"""Device and precision: resolve ``auto`` and build the autocast context used around every network."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from zoomfeat.errors import ConfigError, one_line

_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Runtime:
    """Where and how networks run: ``device`` ("cpu", "cuda", "cuda:1"), ``precision`` ("fp32"|"bf16"|"fp16")."""

    device: str
    precision: str

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def autocast(self) -> Callable[[], contextlib.AbstractContextManager]:
        """Factory of the autocast context (a no-op for fp32)."""
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext
        dtype = getattr(torch, _DTYPES[self.precision])
        device_type = "cuda" if self.is_cuda else "cpu"
        return lambda: torch.autocast(device_type=device_type, dtype=dtype)


def resolve_runtime(device: str, precision: str) -> Runtime:
    """``auto`` device = CUDA when available; ``auto`` precision = bf16 on CUDA (fp16 if bf16 is unsupported),
    fp32 on the CPU. The GPU of a rank is picked later by Lightning Fabric (``fabric.device``)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA GPU is visible: use --device cpu (or auto)")
    if precision == "auto":
        if device.startswith("cuda"):
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    return Runtime(device=device, precision=precision)


def on_device(runtime: Runtime, device) -> Runtime:
    """The same precision on a rank's own device (``fabric.device``: ``cpu`` or ``cuda:<local rank>``)."""
    return Runtime(device=str(device), precision=runtime.precision)


_DEVICE_RE = r"^(cpu|cuda|cuda:\d+)$"


def check_device(device: str, option: str = "--device") -> str:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``) that exists here; ConfigError naming the fix."""
    import re

    value = str(device).strip().lower()
    if not re.match(_DEVICE_RE, value):
        raise ConfigError(f"bad {option} {device!r}: use cpu, cuda or cuda:N")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {device} but no CUDA GPU is visible: use {option} cpu")
        index = int(value.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{option} {device}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0...)")
    return value


def check_devices(devices: int, device: str, num_nodes: int = 1) -> int:
    """Processes per node for ``--devices``, checked by Lightning's own device parsing for the accelerator."""
    from lightning.fabric.accelerators import CPUAccelerator, CUDAAccelerator
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    kind = CUDAAccelerator if str(device).startswith("cuda") else CPUAccelerator
    try:
        parsed = kind.parse_devices(int(devices))
    except (MisconfigurationException, ValueError, TypeError) as exc:
        raise ConfigError(f"bad --devices {devices!r}: {one_line(exc)}") from exc
    count = len(parsed) if isinstance(parsed, (list, tuple)) else int(parsed or 0)
    if count < 1:
        raise ConfigError(f"bad --devices {devices!r}: use the number of processes per node, 1 or more")
    return count
