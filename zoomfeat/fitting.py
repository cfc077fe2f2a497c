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

from zoomfeat.errors import CheckpointError, ConfigError, one_line
from zoomfeat.torch_files import load_torch_file


def load_checkpoint(path, fix: str, *, mmap: bool = False) -> dict:
    """The dict saved at ``path`` (tensors and plain values only); CheckpointError ending with ``fix``."""
    ckpt = load_torch_file(path, "checkpoint", fix=fix, mmap=mmap)  # empty / text / random bytes: one line
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict; {fix}")
    return ckpt


def atomic_checkpoint_io():
    """A :class:`lightning.pytorch.plugins.io.TorchCheckpointIO` whose files appear complete or not at all."""
    from zoomfeat.trainer_parts import AtomicCheckpointIO

    return AtomicCheckpointIO()


def make_trainer(*, options: dict[str, str] | None = None, **kwargs: Any):
    """``lightning.Trainer(**kwargs)``; ``options`` maps Trainer argument names to the CLI option that set them
    (``{"devices": "--devices"}``) for the error message."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import ProgressBar

    from zoomfeat.log import quiet_third_party
    from zoomfeat.trainer_parts import StepProgressBar

    quiet_third_party()
    callbacks = list(kwargs.get("callbacks") or [])
    if kwargs.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        kwargs["callbacks"] = [*callbacks, StepProgressBar()]  # no empty "Training: 0/?" bar
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
    if kwargs.get("ckpt_path"):  # a resumed checkpoint is read weights-only first: a pickle that is not is one line
        load_checkpoint(kwargs["ckpt_path"], "pass a checkpoint this command wrote (--resume), or --resume none",
                        mmap=True)
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
