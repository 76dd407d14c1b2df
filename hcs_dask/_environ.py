"""What the process environment held when hcs_dask was imported, before anything of hcs_dask ran.

Imported by ``import hcs_dask`` itself: a Dask nanny started later in this process writes into
``os.environ``, so only a reading taken at package import tells the user's own settings apart.
Nothing here imports Dask: the command line starts the workers' fork server
(:func:`hcs_dask._forkserver.prestart`) from it before distributed is imported.
"""

from __future__ import annotations

import os

__all__ = ["EMBEDDED_PRE_SPAWN_ENVIRON", "UNSET_VARIABLE", "USER_SET_MALLOC_TRIM", "drop_inherited_malloc_trim"]

#: Whether the user's environment set MALLOC_TRIM_THRESHOLD_ (see ``hcs_dask.cluster``).
USER_SET_MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_" in os.environ

#: What the embedded clusters change in ``distributed.nanny.pre-spawn-environ`` (the variables a
#: nanny sets before it starts a worker process): no ``MALLOC_TRIM_THRESHOLD_`` (see
#: ``hcs_dask.cluster.EMBEDDED_SCHEDULER_CONFIG``).
EMBEDDED_PRE_SPAWN_ENVIRON: dict[str, object] = {"MALLOC_TRIM_THRESHOLD_": None}

#: Handed by a nanny to a worker forked from a server whose environment has variables that the
#: client's no longer has: their names, a JSON list, which the worker's preload removes
#: (:mod:`hcs_dask._forkserver`, :mod:`hcs_dask._embedded_worker`).
UNSET_VARIABLE = "HCS_DASK_UNSET_ENVIRON"


def drop_inherited_malloc_trim() -> None:
    """Forget a ``MALLOC_TRIM_THRESHOLD_`` that a Dask nanny, not the user, put in this process.

    A nanny writes its pre-spawn environment into the *parent's* ``os.environ``, so after any
    plain ``LocalCluster`` in this process (a notebook, a test session) every later worker would
    inherit the variable whatever the config says. The user's own value (present when hcs_dask
    was imported) is kept.
    """
    if not USER_SET_MALLOC_TRIM:
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
