"""How an embedded local cluster's workers start: forked from one server process that has the
worker's modules already imported (``multiprocessing``'s forkserver, Dask's
``distributed.worker.multiprocessing-method: forkserver``), instead of each worker being a fresh
interpreter that imports distributed, NumPy, zarr, ome-zarr-models and the readers again.

:func:`acquire` (called by :func:`hcs_dask.cluster.connect`) makes sure the server runs before the
cluster's nannies start their workers: a fresh interpreter that imports :data:`WORKER_MODULES`.
The command line starts it sooner, with :func:`prestart`, before it imports distributed: it
writes the workers' environment into its own, imports the modules itself (it needs them as the
client too) and forks the server from itself, so that the server costs no imports of its own.
Each worker the cluster starts with is then a fork of the server. A worker
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
sends them with every fork). A server forked from the command line's process has that
process's start: its ``MALLOC_*`` and ``LD_PRELOAD`` are the user's, as a spawned server's are,
but its string hashes are seeded as the command's own, not with the nanny's ``PYTHONHASHSEED``
(which its workers' ``os.environ`` still shows): its workers hash alike, and a worker that its
nanny restarts (spawned) hashes with the nanny's seed.

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
#: the built-in steps). ``numpy.ma`` too: NumPy imports it lazily, on the first ``np.unique``
#: (inside ``np.percentile``, so inside ``percentile_normalize``): 18 ms that every worker's first
#: well paid (132 ms under ``-X importtime`` in a 1-worker run). Not SciPy: a step imports
#: ``scipy.ndimage`` when it first filters (``ArrayBackend.ndimage``), so a pipeline that never
#: does (normalise, project) never pays for it.
WORKER_MODULES = (
    "distributed",
    "numpy",
    "numpy.ma",
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


def _start(environ: dict[str, str], *, here: bool = False) -> None:
    """(Re)start the server in ``environ``, which is written into ``os.environ`` as a nanny does.

    ``here``: make the server a fork of this process (:func:`_fork_server_here`) where it can be.
    """
    global _server_environ

    os.environ.update(environ)
    if _server_environ is not None:
        # ``_stop`` is the standard library's one way; where it is missing, the server is kept.
        stop = getattr(multiprocessing.forkserver._forkserver, "_stop", None)
        if stop is None:
            return
        stop()
    if not (here and _fork_server_here()):
        multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_MODULES))
        multiprocessing.forkserver.ensure_running()
    _server_environ = environ


#: Libraries of the server's that read the environment as they are imported (NumPy's BLAS its
#: thread counts, distributed its config).
_READ_THE_ENVIRONMENT = ("numpy", "distributed", "zarr", "numcodecs", "tifffile")

#: The standard library's fork server as :func:`_fork_server_here` drives it (CPython 3.11-3.13).
_SERVER_MAIN_PARAMETERS = ("listener_fd", "alive_r", "preload", "main_path", "sys_path")
_SERVER_STATE = ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid")


def _flush_output() -> None:
    """Flush this process's stdout and stderr; a closed pipe is passed over."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _native_threads() -> int:
    """How many threads this process has, the interpreter's and any a library started (Linux);
    0 where that cannot be read."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _fork_server_here() -> bool:
    """Import :data:`WORKER_MODULES` here, then make ``multiprocessing``'s fork server a fork of
    this process instead of a fresh interpreter that imports them again. True where it did.

    The command line imports the same modules for itself, so the server then costs no imports of
    its own, and the first workers fork as soon as the cluster asks for them (a spawned server's
    imports, 1.5-1.7 CPU-s on a 2-core machine, ended just when the workers were forked). The
    server is the standard library's own loop (``multiprocessing.forkserver.main``), listening
    where the standard start would have it listen; only how it came to run differs. It ends at
    once when this process has gone (end of file on its pipe), without a teardown.

    Only a process with a single thread can be forked safely: where another thread runs (the
    interpreter's or a library's, such as BLAS threads of a ``pre-spawn-environ`` that allows
    them), off Linux, or where the standard library's server is not the one this was written
    against (its ``main``'s parameters, its state), nothing is forked and the caller starts the
    server as usual.
    """
    import importlib
    import inspect
    import socket
    from multiprocessing import connection, resource_tracker, util

    server = multiprocessing.forkserver._forkserver
    try:
        parameters = tuple(inspect.signature(multiprocessing.forkserver.main).parameters)
    except (TypeError, ValueError):
        return False
    if (parameters != _SERVER_MAIN_PARAMETERS or not all(hasattr(server, name) for name in _SERVER_STATE)
            or server._forkserver_pid is not None or sys.platform != "linux"):
        return False
    for name in WORKER_MODULES:
        importlib.import_module(name)
    if threading.active_count() != 1 or _native_threads() != 1:
        return False
    resource_tracker.ensure_running()  # as the standard start does: the workers are handed its pipe
    with socket.socket(socket.AF_UNIX) as listener:
        address = connection.arbitrary_address("AF_UNIX")
        listener.bind(address)
        if not util.is_abstract_socket_namespace(address):
            os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()  # end of file there: this process has gone
        _flush_output()  # text still buffered here would be written again by the server and every worker
        pid = os.fork()
        if pid == 0:  # the server: it serves until this process has gone, then ends at once
            code = 0
            try:
                os.close(alive_w)
                multiprocessing.forkserver.main(listener.fileno(), alive_r, [])
            except SystemExit:
                pass
            except BaseException:  # noqa: BLE001  (reported, then the server ends)
                sys.excepthook(*sys.exc_info())
                code = 1
            finally:
                try:
                    sys.stderr.flush()
                finally:
                    os._exit(code)  # not this process's teardown, nor the command's code above
        os.close(alive_r)
    server._forkserver_address = address
    server._forkserver_alive_fd = alive_w
    server._forkserver_pid = pid
    return True


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
    config, as the embedded cluster's nannies will read them, and written into this process's;
    then the server's modules are imported here and the server is forked from this process
    (:func:`_fork_server_here`; a fresh interpreter where that cannot be, or where NumPy,
    distributed or zarr was imported before the environment was written). :func:`acquire` works
    the environment out again once distributed is imported and starts the server again (a fresh
    interpreter) if the two differ. Does nothing when ``hcs-dask.worker-start`` is ``spawn`` or
    the server runs already.
    """
    import dask

    if start_method() != "forkserver":
        return
    drop_inherited_malloc_trim()
    configured = dask.config.get("distributed.nanny.pre-spawn-environ", default=None) or {}
    # A fork of this process keeps what its libraries read from the environment when they were
    # imported: it can be the server only if they are imported after the environment is written.
    fresh = not any(name in sys.modules for name in _READ_THE_ENVIRONMENT)
    with _lock:
        if _server_environ is None:
            _start(_worker_environ({**_distributed_defaults(), **configured, **EMBEDDED_PRE_SPAWN_ENVIRON}),
                   here=fresh)


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
    _flush_output()
    os._exit(0)


if _in_the_server():
    atexit.register(_exit_without_teardown, os.getpid())
