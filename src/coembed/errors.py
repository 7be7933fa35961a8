"""The one family of errors a user can cause.

The command line turns a ``CoembedError`` into one line on stderr and the exit code it carries
(2 for usage mistakes, 1 for everything else); nothing a user does should print a traceback.
"""

from __future__ import annotations


class CoembedError(Exception):
    """A mistake in what the user gave us: a path, a file, a value. The message says what to do."""

    exit_code = 1


class UsageError(CoembedError):
    """Bad command-line usage or configuration value (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """An unknown key or an invalid value in a config or a ``--set`` override."""


class DataError(CoembedError):
    """A dataset that cannot be read: missing file, missing column, nothing usable."""


class ImageError(CoembedError):
    """An image that cannot be decoded: missing, empty, truncated, corrupt or too large."""


class ModelDirError(CoembedError):
    """A model directory or checkpoint file that is missing, truncated or does not match."""


class IndexError_(CoembedError):
    """An index directory that is missing, truncated or built with another model."""


class LockHeld(CoembedError):
    """Another process is writing the same model, run folder, index or export right now."""


class DiskFull(CoembedError):
    """The disk (or the user's quota) filled up while a file was written; nothing was replaced."""
