"""Running Lightning the zoomfeat way: quiet, interruptible, with settings checked before any work.

- :func:`fit` calls ``trainer.fit``. Lightning catches Ctrl-C itself, tears down, leaves SIGINT ignored and
  calls ``sys.exit(1)``; here that becomes a ``KeyboardInterrupt`` again (the CLI prints ``interrupted`` and
  exits 130) and the previous SIGINT handler is restored.
- :func:`load_checkpoint` reads a training checkpoint (a MIL fold's ``model.ckpt``, a Lightning ``last.ckpt``)
  with ``weights_only=True``; a file that is not one (empty, text, random or truncated bytes) is a one-line
  CheckpointError naming it and the fix, never a KeyError from deep inside torch.
- :func:`atomic_checkpoint_io` is Lightning's checkpoint plugin writing through :func:`zoomfeat.store.atomic_write`
  (Lightning's own writes the final file in place: a kill mid-write would leave a truncated ``last.ckpt``).
- :func:`make_trainer` builds a ``lightning.Trainer`` after :func:`zoomfeat.log.quiet_third_party`, with
  Lightning's own parsing of accelerator / devices / precision; what it refuses (``devices=0``, an unknown
  accelerator, a GPU that is not there) is a one-line ConfigError naming the option.
"""

from __future__ import annotations

import signal
from typing import Any

from zoomfeat.errors import ConfigError, one_line


def load_checkpoint(path, fix: str, *, mmap: bool = False) -> dict:
    """The dict saved at ``path`` (tensors and plain values only); CheckpointError ending with ``fix``."""
    import torch

    from zoomfeat.errors import CheckpointError
    from zoomfeat.model.checkpoint import check_checkpoint_file

    check_checkpoint_file(path)  # empty / text / random bytes, before torch unpickles anything
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch.load raises many types (RuntimeError, KeyError, EOFError ...) for bad bytes
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason}); {fix}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict; {fix}")
    return ckpt


def atomic_checkpoint_io():
    """A :class:`lightning.pytorch.plugins.io.TorchCheckpointIO` whose files appear complete or not at all."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from zoomfeat.store import atomic_write

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            with atomic_write(path) as tmp:
                super().save_checkpoint(checkpoint, tmp, storage_options)

    return AtomicCheckpointIO()


def make_trainer(*, options: dict[str, str] | None = None, **kwargs: Any):
    """``lightning.Trainer(**kwargs)``; ``options`` maps Trainer argument names to the CLI option that set them
    (``{"devices": "--devices"}``) for the error message."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from zoomfeat.log import quiet_third_party

    quiet_third_party()
    try:
        return L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, TypeError) as exc:
        names = options or {}
        given = ", ".join(f"{names.get(k, k)} {kwargs[k]!r}" for k in ("accelerator", "devices", "num_nodes",
                                                                          "precision", "strategy") if k in kwargs)
        reason = one_line(exc)
        raise ConfigError(f"Lightning refuses {given}: {reason}") from exc


def fit(trainer, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit(*args, **kwargs)``; Ctrl-C raises KeyboardInterrupt (not Lightning's ``sys.exit(1)``)."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(*args, **kwargs)
    except SystemExit as exc:
        if trainer.interrupted:  # Lightning's KeyboardInterrupt handler ends in sys.exit(1)
            raise KeyboardInterrupt from exc
        raise
    except Exception:
        _close_progress_bars(trainer)  # the error line then starts on a line of its own, not after the bar
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _close_progress_bars(trainer) -> None:
    bars = trainer.progress_bar_callback
    for name in ("_train_progress_bar", "_val_progress_bar"):
        bar = getattr(bars, name, None)
        if bar is not None:
            bar.close()
