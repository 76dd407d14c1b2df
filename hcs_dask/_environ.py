"""What the process environment held when hcs_dask was imported, before anything of hcs_dask ran.

Imported by ``import hcs_dask`` itself: a Dask nanny started later in this process writes into
``os.environ``, so only a reading taken at package import tells the user's own settings apart.
"""

from __future__ import annotations

import os

__all__ = ["USER_SET_MALLOC_TRIM"]

#: Whether the user's environment set MALLOC_TRIM_THRESHOLD_ (see ``hcs_dask.cluster``).
USER_SET_MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_" in os.environ
