"""Errors a user can cause, each carrying the exit status the command line returns.

Everything the package raises on bad input derives from :class:`MnistlabError`, so
the CLI can print one line and exit instead of showing a traceback.
"""


class MnistlabError(Exception):
    """Base class: a message meant for the user, plus the CLI exit status."""

    exit_code = 1


class UsageError(MnistlabError, ValueError):
    """A bad argument or option value (exit status 2)."""

    exit_code = 2


class DataError(MnistlabError):
    """Data files that are missing, unreadable or malformed (exit status 1)."""

    exit_code = 1


class RunError(MnistlabError):
    """A run directory that is missing or incomplete (exit status 1)."""

    exit_code = 1


class TrainingDiverged(MnistlabError):
    """Training went wrong: the loss became NaN or infinite, or the network collapsed to outputs
    that no longer depend on the image (exit status 1). The last good epoch's checkpoint stays."""

    exit_code = 1


def first_line(exc: object, limit: int | None = None) -> str:
    """The first line of an exception's text (its type's name if it has none), for a one-line message."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:limit] if limit else line
