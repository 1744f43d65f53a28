"""The one exception type of the data package."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Data on disk (or in memory) that does not have the expected layout, shape, dtype or values.

    The message is one line: the path of the first offending file or folder, what was wrong, and what is allowed.
    It is a ``ValueError``, so command-line scripts turn it into a one-line error and a non-zero exit.
    """
