"""The one error type of the plate readers.

It lives in its own module so that the readers can import it without importing
:mod:`hcs_dask.formats` (whose ``__init__`` imports the readers).
"""

from __future__ import annotations

__all__ = ["PlateError"]


class PlateError(ValueError):
    """A plate cannot be opened: missing path, unknown layout, inconsistent images.

    The message always names the path or the files at fault, so that a user can
    act on it without a traceback.
    """
