"""The one channel for warnings and notes: the ``zoomfeat`` logger.

Library code calls :func:`warn` / :func:`note` (or ``logging.getLogger("zoomfeat")``); the CLI installs
:func:`setup_cli_logging`, which prints warnings as ``warning: ...`` and notes as plain lines on stderr, and
routes Python ``warnings`` raised by zoomfeat through the same channel. Third-party chatter (Lightning tips,
litlogger, eval-mode and pytree deprecation lines) is silenced by :func:`quiet_third_party`, which commands
call before they build a Lightning trainer.
"""

from __future__ import annotations

import logging
import sys
import warnings

LOGGER_NAME = "zoomfeat"
logger = logging.getLogger(LOGGER_NAME)

# messages of third-party libraries that say nothing a zoomfeat user can act on
_THIRD_PARTY_NOISE = (
    r".*does not have many workers.*",
    r".*litlogger.*",
    r".*LitLogger.*",
    r".*is in eval mode.*",
    r".*modules in eval mode.*",
    r".*module\(s\) in eval mode.*",
    r".*resuming from a checkpoint that ended before the epoch ended.*",  # zoomfeat's batches are step-keyed
    r".*pytree.*",
    r".*_register_pytree_node.*",
    r".*GPU available but not used.*",
    r".*TPU available.*",
    r".*Trainer.fit` stopped: `max_.*",
    r".*The number of training batches.*",
    r".*Total length of `DataLoader` across ranks is zero.*",  # a run without validation batches
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*LightningModule.*has parameters that were not used.*",
    r".*upgrade your.*checkpoint.*",
    r".*torch.cuda.amp.*deprecated.*",
    r".*Precision .* is not supported by the model summary.*",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
)
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                      "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                      "lightning.pytorch.accelerators.cuda", "litlogger")


def warn(message: str) -> None:
    """A warning the user should read (printed as ``warning: <message>``)."""
    logger.warning(message)


def note(message: str) -> None:
    """An informational line (printed as is)."""
    logger.info(message)


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (not the stream at install time: tests and redirections swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_cli_logging(debug: bool = False) -> None:
    """Print the zoomfeat logger on stderr in the CLI's one-line form; idempotent."""
    if not any(getattr(h, "_zoomfeat_cli", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_CliFormatter())
        handler._zoomfeat_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    logging.captureWarnings(False)
    _previous = warnings.showwarning

    def _show(message, category, filename, lineno, file=None, line=None):  # zoomfeat's own warnings -> logger
        if "zoomfeat" in str(filename) or "/mil/" in str(filename) or "/splits/" in str(filename):
            logger.warning(str(message))
        else:
            _previous(message, category, filename, lineno, file, line)

    warnings.showwarning = _show


def quiet_third_party() -> None:
    """Silence library chatter that is not actionable (call before building a Lightning trainer)."""
    for pattern in _THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
