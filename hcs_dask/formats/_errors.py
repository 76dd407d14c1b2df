"""The error and warning types of the plate readers.

They live in their own module so that the readers can import them without importing
:mod:`hcs_dask.formats` (whose ``__init__`` imports the readers).
"""

from __future__ import annotations

__all__ = ["PlateError", "PlateWarning"]


class PlateError(ValueError):
    """A plate cannot be opened: missing path, unknown layout, inconsistent images.

    The message always names the path or the files at fault, so that a user can
    act on it without a traceback.
    """


class PlateWarning(UserWarning):
    """A plate that opens, but with less than its vendor metadata would give (e.g. no index file)."""
