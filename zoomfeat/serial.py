"""Plain JSON values of the package's objects: the one conversion every saved record and config goes through.

The lowest layer of the package's files: the store (:mod:`zoomfeat.store.files`) and the config system
(:mod:`zoomfeat.config`) both use it, and it imports nothing of the package but :mod:`zoomfeat.mags`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from zoomfeat.mags import Magnification


def to_jsonable(value: Any) -> Any:
    """Convert dataclasses, paths, tuples and numpy scalars into plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Magnification):  # stored canonically, by name
        return value.name
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value
