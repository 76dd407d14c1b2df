"""How an embedded local cluster's workers start: forked from one server process that has the
worker's modules already imported (``multiprocessing``'s forkserver, Dask's
``distributed.worker.multiprocessing-method: forkserver``), instead of each worker being a fresh
interpreter that imports distributed, NumPy, zarr, ome-zarr-models and the readers again.

:func:`acquire` (called by :func:`hcs_dask.cluster.connect`) makes sure the server runs before the
cluster's nannies start their workers. The command line starts it sooner, with
:func:`prestart`, before the client itself imports distributed, so that the server's imports run
beside the client's. Each worker the cluster starts with is then a fork of the server. A worker
that its nanny restarts later (after a death) is spawned, Dask's default: the start method is
read from the config of the whole process, which a run must not change for the user's own
clusters. ``bench/openhcs.py`` and ``bench/throughput.py`` measure the whole commands.

The workers' environment is this process's environment as it is when the cluster starts, as
with freshly spawned workers. The server is started with it, plus what a nanny writes into it
before it starts a worker (``distributed.nanny.pre-spawn-environ`` as the embedded cluster sets
it: one BLAS thread, no ``MALLOC_TRIM_THRESHOLD_``, a fixed hash seed), and it is started again
when the environment has changed since and no embedded cluster of this process is using it.
While one is, a second cluster forks from the same server: its nannies hand the workers the
variables set or changed since (the nanny's ``env``, set before the worker is made) and the
names of those removed since (which the worker's preload removes before it takes a task), but
a variable read at process start (``MALLOC_*``, ``LD_PRELOAD``, ``PYTHONHASHSEED``) or at an
import of the server's (``OMP_NUM_THREADS`` at NumPy's) keeps the server's value there. The
working directory and ``sys.path`` are the client's at each worker's start (multiprocessing
sends them with every fork).

A fork server that something else in this process started first (a ``LocalCluster`` of the
user's with Dask's forkserver method) is used as it is, with its own environment and imports.

``hcs-dask.worker-start: spawn`` in the Dask config (``DASK_HCS_DASK__WORKER_START=spawn``) starts
every worker as a fresh interpreter instead (Dask's default start).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import multiprocessing
import multiprocessing.forkserver
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from hcs_dask._environ import EMBEDDED_PRE_SPAWN_ENVIRON, UNSET_VARIABLE, drop_inherited_malloc_trim

__all__ = ["START_METHODS", "WORKER_MODULES", "acquire", "prestart", "start_method"]

#: Imported by the server before it forks a worker: what every embedded worker imports before
#: its first well (Dask's worker, NumPy, the readers' and the store's libraries, the well's guard,
#: the built-in steps). Not SciPy: a step imports ``scipy.ndimage`` when it first filters
#: (``ArrayBackend.ndimage``), so a pipeline that never does (normalise, project) never pays for it.
WORKER_MODULES = (
    "distributed",
    "numpy",
    "tifffile",
    "zarr",
    "hcs_dask.store._ngff",
    "hcs_dask.guard",
    "hcs_dask.steps",
    "hcs_dask._embedded_worker",
    "hcs_dask._forkserver",
)

#: The values of ``hcs-dask.worker-start``.
START_METHODS = ("forkserver", "spawn")

_lock = threading.Lock()
_server_environ: dict[str, str] | None = None  # the environment the running server started with
_users = 0  # embedded clusters of this process whose workers fork from the server


def start_method() -> str:
    """``hcs-dask.worker-start`` from the Dask config: ``"forkserver"`` (the default; ``"spawn"``
    where the platform has no fork) or ``"spawn"``.

    Raises
    ------
    ValueError
        Any other value, naming the setting.
    """
    import dask

    method = str(dask.config.get("hcs-dask.worker-start", default="forkserver")).lower()
    if method not in START_METHODS:
        raise ValueError(f"hcs-dask.worker-start is {method!r} in the Dask config; "
                         f"it must be one of {', '.join(START_METHODS)}")
    if method == "forkserver" and "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"  # Windows has no fork
    return method


def _worker_environ(pre_spawn: dict[str, Any]) -> dict[str, str]:
    """This process's environment with what a nanny writes into it before it starts a worker.

    The nanny's rule (``distributed.nanny.Nanny``): an entry set to ``None`` is left out, a
    variable already exported keeps its value, and the hash seed is fixed unless one is set;
    it also names this process as the workers' parent. ``tests/test_worker_start.py`` holds the
    result equal to what the nannies leave, so that an unchanged environment keeps its server.
    """
    additions = {name: os.environ.get(name, str(value)) for name, value in pre_spawn.items() if value is not None}
    if additions.get("PYTHONHASHSEED") in (None, "0"):
        additions["PYTHONHASHSEED"] = "6640"
    # And before that, for the workers' process titles (distributed.proctitle):
    additions["__DASK_PARENT_PID"] = str(os.getpid())
    return {**os.environ, **additions}


def _start(environ: dict[str, str]) -> None:
    """(Re)start the server in ``environ``, which is written into ``os.environ`` as a nanny does."""
    global _server_environ

    os.environ.update(environ)
    if _server_environ is not None:
        # ``_stop`` is the standard library's one way; where it is missing, the server is kept.
        stop = getattr(multiprocessing.forkserver._forkserver, "_stop", None)
        if stop is None:
            return
        stop()
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_MODULES))
    multiprocessing.forkserver.ensure_running()
    _server_environ = environ


def acquire(pre_spawn: dict[str, Any]) -> tuple[dict[str, str], Callable[[], None]]:
    """Make sure the server runs with the workers' environment; count one more cluster using it.

    ``pre_spawn`` is ``distributed.nanny.pre-spawn-environ`` as the cluster's nannies will read
    it. Returns what the nannies must hand their workers (``env``: the variables set or changed
    since the server started, and under :data:`~hcs_dask._environ.UNSET_VARIABLE` those removed
    since; nothing unless another cluster is still using the server) and the function that ends
    this cluster's use of the server.
    """
    global _users
    import distributed.utils

    # distributed's first forkserver start (``distributed.utils.get_mp_context``) would import
    # NumPy, pandas and lz4 in this process, on the event loop while the nannies start, only to
    # give the server a preload list of its own: the server runs already, with WORKER_MODULES.
    distributed.utils._forkserver_preload_set = True
    with _lock:
        environ = _worker_environ(pre_spawn)
        if _server_environ is None or (environ != _server_environ and _users == 0):
            _start(environ)
        else:
            os.environ.update(environ)
        _users += 1
        assert _server_environ is not None
        changed = {name: value for name, value in environ.items() if _server_environ.get(name) != value}
        removed = sorted(name for name in _server_environ if name not in environ)
        if removed:
            changed[UNSET_VARIABLE] = json.dumps(removed)

    def release() -> None:
        global _users

        with _lock:
            _users -= 1

    return changed, release


def _distributed_defaults() -> dict[str, Any]:
    """distributed's default ``pre-spawn-environ``, read from its ``distributed.yaml`` without
    importing distributed (as distributed reads it when it is imported); ``{}`` where that fails."""
    import yaml

    try:
        spec = importlib.util.find_spec("distributed")
        with open(Path(spec.origin).parent / "distributed.yaml") as handle:  # type: ignore[union-attr, arg-type]
            return dict(yaml.safe_load(handle)["distributed"]["nanny"]["pre-spawn-environ"])
    except Exception:  # noqa: BLE001  (a guess only: acquire checks it)
        return {}


def prestart() -> None:
    """Start the server now, before this process imports distributed (the command line's first step).

    The environment is worked out from distributed's default config file and the user's Dask
    config, as the embedded cluster's nannies will read them; :func:`acquire` works it out again
    once distributed is imported and starts the server again if the two differ. Does nothing
    when ``hcs-dask.worker-start`` is ``spawn`` or the server runs already.
    """
    import dask

    if start_method() != "forkserver":
        return
    drop_inherited_malloc_trim()
    configured = dask.config.get("distributed.nanny.pre-spawn-environ", default=None) or {}
    with _lock:
        if _server_environ is None:
            _start(_worker_environ({**_distributed_defaults(), **configured, **EMBEDDED_PRE_SPAWN_ENVIRON}))


def _in_the_server() -> bool:
    """Whether this code runs inside the fork server's ``main`` (its preload imports do)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is multiprocessing.forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


def _exit_without_teardown(server: int) -> None:
    # The server ends when its client has gone (its pipe from the client reaches end of file):
    # with the interpreter's teardown of distributed, zarr and the rest, 0.5-0.6 s on a 2-core
    # machine, during which it still holds the client's stdout and stderr, so a pipe reading a
    # command's output would stay open that long. It has nothing to flush but those streams.
    if os.getpid() != server:  # a worker forked from the server, which inherited this function
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


if _in_the_server():
    atexit.register(_exit_without_teardown, os.getpid())
