"""The one reader of torch and safetensors files: weights-only loading, one-line errors.

:func:`load_torch_file` loads with ``torch.load(weights_only=True)`` (tensors and plain containers: no pickled
code runs) or, for ``.safetensors``, with safetensors. A file that is missing, a folder, empty, text, random
or truncated bytes, or that holds objects a weights-only load refuses is one line naming the file, what it
should have been and the fix (``torch.load`` itself raises KeyError / IndexError / EOFError / UnpicklingError
on such files). Torch is imported on first use, so importing this module is light.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from zoomfeat.errors import CheckpointError, one_line
from zoomfeat.hub import hub_source

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_MAGIC = b"\x80"  # a pickle protocol >= 2 (legacy torch.save)


def check_torch_file(path: str | Path, what: str = "weight file", kinds: str = "a PyTorch checkpoint (torch.save)",
                     fix: str = "pass the released checkpoint file", error: type[Exception] = CheckpointError) -> None:
    """``error`` when ``path`` is plainly not a torch file (empty, text, random bytes), before torch tries to
    unpickle it."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from e
    if not head:
        raise error(f"cannot read {what} {path}: it is empty, not {kinds} (cut short?): {fix}")
    if path.suffix == ".safetensors":
        return
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "not a checkpoint"
        raise error(f"cannot read {what} {path}: it is {kind} (starts {head[:8]!r}), not {kinds}: {fix}")


def load_torch_file(path: str | Path, what: str = "weight file", *, fix: str = "pass the released, unmodified file",
                    error: type[Exception] = CheckpointError, mmap: bool = False,
                    allowed: Iterable[type] = (), unsafe: bool = False):
    """The object saved at ``path`` (``.safetensors``: its flat name -> tensor dict), on the CPU.

    ``what`` names the expected file in messages ("ZoomLDM weights", "feature file"); ``fix`` ends them;
    ``error`` is the exception type (CheckpointError for weights, DataError for data files). ``allowed`` are
    classes a weights-only load may rebuild (the official CDM's ``argparse.Namespace``). ``unsafe`` unpickles
    everything (a trusted local file of your own; refused for a file from the hub cache).
    """
    import torch

    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a folder: pass the file inside it")
    if not path.is_file():
        raise error(f"{what} {path} not found: {fix}")
    if unsafe:

        if hub_source(path) is not None:
            raise error(f"{what} {path} comes from the hub cache: it is loaded weights-only, never unpickled; "
                        "drop unsafe")
    kinds = "a torch or .safetensors file" if what == "weight file" else f"a {what}"
    check_torch_file(path, what, kinds, fix, error)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=not unsafe, mmap=mmap)
    except Exception as e:  # torch raises many types (KeyError, IndexError, EOFError ...) for foreign bytes
        lines = str(e).strip().splitlines()
        reason = one_line(lines[0] if lines else e)
        if "weights only load failed" in reason.lower() or "weights_only" in str(e):
            unsupported = one_line(next((x for x in lines if "Unsupported global" in x), reason))
            reason = f"it holds pickled objects that a weights-only load refuses ({unsupported})"
        raise error(f"cannot read {what} {path}: {reason}; {fix}") from e
