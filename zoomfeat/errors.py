"""Exception types for problems the user can fix.

The CLI prints these as one line (``error: <message>``) without a traceback; anything else is a bug and
keeps its traceback. Messages name the offending value (file, row, option) and the fix.
"""


class ZoomfeatError(Exception):
    """Base class of every user-facing error."""


class ConfigError(ZoomfeatError, ValueError):
    """An invalid option or configuration value (a bad ``--mags`` string, a missing weight file, ...)."""


class SlideError(ZoomfeatError):
    """A slide that cannot be opened, read or tiled (unopenable file, bogus metadata, unreadable tiles)."""


class DataError(ZoomfeatError, ValueError):
    """A bad table or data file (labels CSV, split file, feature file with a wrong dimension, ...)."""


class CheckpointError(ZoomfeatError):
    """A weight file that does not match the architecture it is loaded into."""


class TrainingError(ZoomfeatError):
    """A training run that diverged (a non-finite loss, or a loss that exploded or collapsed)."""
