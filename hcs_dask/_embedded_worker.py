"""Preloaded into every worker of an embedded cluster (``--preload`` of the nanny's worker).

The embedded workers are child processes in the client's process group, so an interrupt
sent to the group (a notebook's stop button, Ctrl-C in a terminal) would reach them too
and print ``KeyboardInterrupt`` tracebacks from inside the wells. The run's client
cancels the run cleanly instead; the workers ignore SIGINT and end when their cluster
is closed.

Each worker also imports the well task's modules (``_forkserver.WORKER_MODULES``: zarr, ome-zarr-models,
the readers, the built-in steps) as it starts,
while the client scans and compiles the plate, instead of in its first well (a worker forked
from :mod:`hcs_dask._forkserver`'s server has them already), and removes the environment
variables that its server has but the client no longer has. Then it freezes what exists
(``gc.freeze``: the modules, the worker's own machinery), as CPython advises for a forked
process: the garbage collector no longer walks those objects, so a full collection in a well
walks only what the wells made (about 90,000 objects frozen; each of the two full collections
of a 96-well anchor run took 46-72 ms before), and the collector no longer writes to the pages
this process shares with its server.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
from typing import Any

from hcs_dask._environ import UNSET_VARIABLE

__all__ = ["dask_setup"]


def dask_setup(worker: Any) -> None:
    """Ignore SIGINT in this worker process, remove the variables its nanny names under
    :data:`~hcs_dask._environ.UNSET_VARIABLE`, import what its wells will (runs in its main
    thread, before it takes tasks; a forked worker has them from its server already), and
    freeze the objects that exist by then out of the garbage collector's reach."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing can be done here
        pass
    unset = os.environ.pop(UNSET_VARIABLE, None)
    for name in json.loads(unset) if unset else ():
        os.environ.pop(name, None)
    from hcs_dask._forkserver import WORKER_MODULES

    for module in WORKER_MODULES:
        importlib.import_module(module)
    gc.freeze()
