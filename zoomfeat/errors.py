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


def one_line(error: BaseException | str, limit: int | None = 200) -> str:
    """An exception's message (or a text) as one line: every run of whitespace, line breaks included, becomes one
    space; an empty message gives the exception's type name; a message longer than ``limit`` characters is cut
    and ends with ``...`` (``limit=None``: never cut). The one way an error from a library is quoted in ours."""
    text = " ".join(str(error).split())
    if not text:
        text = type(error).__name__ if isinstance(error, BaseException) else ""
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 3, 0)].rstrip() + "..."
    return text
