"""Where wells run: an embedded LocalCluster, a LocalCUDACluster, or an existing scheduler.

``connect(cluster="cuda")`` starts a ``dask_cuda.LocalCUDACluster``: one single-threaded
worker per GPU, each offering ``resources={"GPU": 1}`` (the tasks of GPU pipelines ask for
it), with the RMM options that matter for a long run of wells and JAX's preallocation off
(:data:`CUDA_WORKER_CONFIG`). Nothing GPU is imported
at package import: :func:`check_cluster` finds out whether dask-cuda, RMM and a CUDA
device are there without importing any of them (it asks NVML, then ``nvidia-smi``, and
imports CuPy only when neither answers), so ``--cluster cuda`` on a machine without a
GPU fails at once with a :class:`ClusterError` that names what is missing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import dask
from distributed.diagnostics.plugin import WorkerPlugin

from hcs_dask import _forkserver
from hcs_dask._environ import EMBEDDED_PRE_SPAWN_ENVIRON, USER_SET_MALLOC_TRIM, drop_inherited_malloc_trim

__all__ = ["CLUSTER_KINDS", "CUDA_WORKER_CONFIG", "ClusterError", "ClusterOptionError", "EMBEDDED_LIFETIME_CONFIG",
           "EMBEDDED_PROFILE_INTERVAL", "EMBEDDED_SCHEDULER_CONFIG", "EMBEDDED_TICK_INTERVAL",
           "EMBEDDED_WORKER_PRELOAD", "embedded_config", "RMMReinitializePlugin", "available_cores",
           "check_cluster", "connect", "cuda_device_count"]

#: How the embedded scheduler treats worker deaths. hcs_dask retries a well whose
#: worker died itself (``worker_death_retries``), so the scheduler need not: with
#: ``allowed-failures`` 0 a death is reported at once as ``KilledWorker``, the driver's
#: quickest signal (on other clusters it sees the worker leave instead). The driver
#: places every well on a free slot itself (``hcs_dask.driver``), so no well is queued
#: on a worker whatever ``worker-saturation`` says; 1.0 keeps the scheduler's own
#: queue out of the way for other tasks too.
#:
#: Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in every worker. Setting it at
#: all turns off glibc's adaptive mmap threshold, so every image-sized array
#: (≥ 128 KiB) is a fresh ``mmap`` whose pages fault in one by one and go back to the
#: kernel on free: about 100 ms of a 500 ms well on the standard benchmark plate
#: (``bench/throughput.py``). hcs_dask frees a well's arrays itself (the cleanup
#: guarantee), and glibc reuses them for the next well, so the workers start without it.
#: A value the user exported in the shell is kept (see :func:`hcs_dask._environ.drop_inherited_malloc_trim`).
EMBEDDED_SCHEDULER_CONFIG = {
    "distributed.scheduler.allowed-failures": 0,
    "distributed.scheduler.worker-saturation": 1.0,
    **{f"distributed.nanny.pre-spawn-environ.{name}": value for name, value in EMBEDDED_PRE_SPAWN_ENVIRON.items()},
}

#: The embedded workers' profiler samples every 100 ms instead of distributed's 10 ms. The
#: sampling runs on the worker's event loop, holding the GIL while it walks the well's stack:
#: about a third of the event loop's time in a 1-worker run of the OpenHCS anchor plate
#: (py-spy ``--gil`` on the worker), and 4 % of the wells' span (a warm 1-worker cluster, the
#: profiler stopped and started between runs: 6.73 s against 7.00 s, medians of 4 runs). The
#: dashboard's profile keeps working, coarser.
EMBEDDED_PROFILE_INTERVAL = "100ms"

#: The embedded scheduler, nannies and workers tick every 200 ms instead of distributed's 20 ms.
#: A tick only measures how late the event loop runs (it logs an event loop unresponsive for
#: longer than ``distributed.admin.tick.limit``, 3 s, either way, and feeds the dashboard's
#: figure); at 20 ms it was most of what an idle cluster spends: a started 2-worker embedded
#: cluster, idle for 5 s, kept 8.0 % of a core busy in the client's process (scheduler and
#: nannies) and 2.8-3.2 % in each worker, 3.2 % and 1.0-1.2 % at 200 ms (``os.times``).
EMBEDDED_TICK_INTERVAL = "200ms"

#: Config key, distributed's default (s), the embedded cluster's value. A value the user set in
#: the Dask config is kept, unless it is distributed's own default, which cannot be told from it.
_EMBEDDED_INTERVALS = (
    ("distributed.worker.profile.interval", 0.01, EMBEDDED_PROFILE_INTERVAL),
    ("distributed.admin.tick.interval", 0.02, EMBEDDED_TICK_INTERVAL),
)


def embedded_config() -> dict[str, Any]:
    """The Dask config an embedded cluster is made in: :data:`EMBEDDED_SCHEDULER_CONFIG`, and
    :data:`EMBEDDED_PROFILE_INTERVAL` and :data:`EMBEDDED_TICK_INTERVAL` unless
    ``distributed.worker.profile.interval`` or ``distributed.admin.tick.interval`` was changed
    from distributed's default.

    Examples
    --------
    >>> with dask.config.set({"distributed.worker.profile.interval": "20ms"}):
    ...     config = embedded_config()
    >>> "distributed.worker.profile.interval" in config, config["distributed.admin.tick.interval"]
    (False, '200ms')
    """
    config = dict(EMBEDDED_SCHEDULER_CONFIG)
    from dask.utils import parse_timedelta

    for key, default, embedded in _EMBEDDED_INTERVALS:
        if parse_timedelta(dask.config.get(key), default="ms") == default:
            config[key] = embedded
    return config


#: What the workers of ``connect(cluster="cuda")`` start with, besides the scheduler config.
#: JAX takes 75 % of the device at its first operation unless told otherwise, which leaves
#: CuPy and RMM in the same worker too little, and JAX never gives it back: in these
#: workers JAX allocates as it needs instead. ``distributed.nanny.environ`` sets it in each worker
#: process (restarted ones too) before the worker starts, without writing it into this
#: process's environment (``pre-spawn-environ`` would); a value exported in the shell wins.
CUDA_WORKER_CONFIG = {
    "distributed.nanny.environ.XLA_PYTHON_CLIENT_PREALLOCATE": "false",
}

#: In force while an embedded cluster runs (read by its SpecCluster when a worker leaves):
#: a worker whose nanny has not brought it back after ``lost-worker-timeout`` (Dask's
#: default 15 s) is given up, nanny and all, and never replaced. Restarting a worker process
#: takes 5-15 s on a busy 2-core machine, two at once longer, so the default lost the whole
#: cluster after a well killed both workers in turn.
EMBEDDED_LIFETIME_CONFIG = {"distributed.deploy.lost-worker-timeout": "300s"}

#: The kinds of embedded cluster.
CLUSTER_KINDS = ("local", "cuda")

#: The RMM options of ``connect(cluster="cuda")`` and their defaults (see :func:`connect`).
RMM_OPTIONS: dict[str, Any] = {
    "rmm_pool_size": None,
    "rmm_maximum_pool_size": None,
    "rmm_async": False,
    "rmm_release_threshold": None,
    "rmm_managed_memory": False,
    "rmm_for_cupy": False,
    "rmm_reinitialize_pool": False,
}
_RMM_SIZES = ("rmm_pool_size", "rmm_maximum_pool_size", "rmm_release_threshold")
_RMM_FLAGS = ("rmm_async", "rmm_managed_memory", "rmm_for_cupy", "rmm_reinitialize_pool")

#: What to install for ``cluster="cuda"``.
GPU_INSTALL_HINT = "pip install 'hcs-dask[gpu]'"

#: Run in every embedded worker process at its start (and again after a nanny restart).
EMBEDDED_WORKER_PRELOAD = "hcs_dask._embedded_worker"

#: Whether the user's environment set MALLOC_TRIM_THRESHOLD_ before hcs_dask was imported
#: (read by ``import hcs_dask`` itself, in :mod:`hcs_dask._environ`, before any nanny of this
#: process can set it; this module may be imported later).
_USER_SET_MALLOC_TRIM = USER_SET_MALLOC_TRIM


def _with_preload(options: dict[str, Any]) -> dict[str, Any]:
    """The embedded workers' options with :data:`EMBEDDED_WORKER_PRELOAD` added to theirs."""
    preload = options.get("preload") or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    if EMBEDDED_WORKER_PRELOAD not in preload:
        preload.append(EMBEDDED_WORKER_PRELOAD)
    return {**options, "preload": preload}


class ClusterError(RuntimeError):
    """A cluster that cannot be started or reached, with what is missing."""


class ClusterOptionError(ClusterError, ValueError):
    """Cluster options that are malformed or contradict each other; nothing was started.

    A :class:`ValueError` (a wrong argument) and a :class:`ClusterError` (so that the
    command line reports it like any cluster that cannot start: exit status 2).
    """


def available_cores() -> int:
    """Cores this process may use (CPU affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------- checks
def check_cluster(
    cluster: str = "local",
    *,
    client: Any = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    **cluster_options: Any,
) -> None:
    """Raise now what :func:`connect` with these arguments would raise before starting anything.

    Starts nothing, reaches no scheduler, and imports no GPU library (CuPy only as the
    last way to count devices, when neither NVML nor ``nvidia-smi`` can). Call it
    before writing any output; :func:`connect` calls it too.

    Parameters
    ----------
    cluster : {"local", "cuda", "slurm", "pbs", "lsf", "sge"}
        The kind of embedded cluster, or a batch system (checked by
        :func:`hcs_dask.hpc.check_hpc_options`).
    client, scheduler, n_workers, threads_per_worker, **cluster_options
        As given to :func:`connect`.

    Raises
    ------
    ClusterOptionError
        (a ``ValueError``) An unknown kind; ``cluster="cuda"`` or RMM options together
        with ``client`` or ``scheduler``; RMM options with ``cluster="local"``;
        malformed or contradicting RMM options; more than one thread per GPU worker.
    ClusterError
        For ``"cuda"``: what is missing, all of it in one message: dask-cuda (with
        the ``pip install`` line), RMM or CuPy where the options need them, a CUDA
        device, or as many devices as ``n_workers``.
    """
    # RMM options left at their defaults (None, False: as the command line passes them) are no options.
    given = [f"{name}={value!r}" for name, value in cluster_options.items()
             if name.startswith("rmm_") and value not in (None, False)]
    if client is not None or scheduler is not None:
        if cluster != "local":
            given.insert(0, f"cluster={cluster!r}")
        if given:
            raise ClusterOptionError(
                f"{', '.join(given)} configure(s) an embedded cluster; it cannot be combined with an "
                f"existing {'client' if client is not None else 'scheduler'}"
            )
        return
    from hcs_dask import hpc  # batch systems through dask-jobqueue

    if cluster in hpc.HPC_KINDS:
        hpc.check_hpc_options(cluster, n_workers=n_workers, threads_per_worker=threads_per_worker,
                              **cluster_options)
        return
    if cluster not in CLUSTER_KINDS:
        raise ClusterOptionError(f"unknown cluster kind {cluster!r}; use 'local', 'cuda' or a batch system "
                                 f"({', '.join(hpc.HPC_KINDS)})")
    if cluster == "local":
        if given:
            raise ClusterOptionError(
                f"{', '.join(given)}: RMM options apply to cluster='cuda' (--cluster cuda) only"
            )
        return
    options = _cuda_options(threads_per_worker, cluster_options)
    missing = _cuda_missing(options, n_workers)
    if missing:
        raise ClusterError(
            "cannot start a LocalCUDACluster (--cluster cuda): " + "; ".join(missing)
            + ". Without a GPU, run with --cluster local and --device cpu"
        )


def _cuda_options(threads_per_worker: int, cluster_options: dict[str, Any]) -> dict[str, Any]:
    """The RMM options with their defaults filled in, validated; raises ClusterOptionError."""
    unknown = sorted(n for n in cluster_options if n.startswith("rmm_") and n not in RMM_OPTIONS)
    if unknown:
        raise ClusterOptionError(f"unknown RMM option(s) {', '.join(unknown)}; the options are "
                                 f"{', '.join(RMM_OPTIONS)}")
    if threads_per_worker != 1:
        # One well at a time per GPU anyway (each task asks for the worker's one GPU), and
        # only a single-threaded worker may run the exclusive cleaners (RMM re-initialisation).
        raise ClusterOptionError(
            f"cluster='cuda' runs one single-threaded worker per GPU; threads_per_worker={threads_per_worker} "
            "is not supported"
        )
    options = {name: cluster_options.get(name, default) for name, default in RMM_OPTIONS.items()}
    for name in _RMM_FLAGS:
        if not isinstance(options[name], bool):
            raise ClusterOptionError(f"{name} must be True or False, not {options[name]!r}")
    for name in _RMM_SIZES:
        _check_size(name, options[name])
    pool, maximum, threshold = (options[name] for name in _RMM_SIZES)
    if options["rmm_async"] and options["rmm_managed_memory"]:
        raise ClusterOptionError("rmm_async and rmm_managed_memory cannot be combined: the asynchronous "
                                 "allocator does not allocate managed memory")
    if threshold is not None and not options["rmm_async"]:
        raise ClusterOptionError("rmm_release_threshold needs rmm_async: only the asynchronous allocator "
                                 "gives memory above a threshold back to the driver")
    if pool is not None and options["rmm_async"]:
        raise ClusterOptionError(
            "rmm_pool_size cannot be combined with rmm_async: the asynchronous allocator grows its own "
            "pool (bound it with rmm_maximum_pool_size, give memory back with rmm_release_threshold)"
        )
    if maximum is not None and pool is None and not options["rmm_async"]:
        raise ClusterOptionError("rmm_maximum_pool_size needs rmm_pool_size (or rmm_async): it bounds a pool")
    if options["rmm_reinitialize_pool"] and pool is None:
        raise ClusterOptionError(
            "rmm_reinitialize_pool needs rmm_pool_size: only an RMM pool keeps its memory until it is "
            "re-initialised (the asynchronous allocator returns it by rmm_release_threshold)"
        )
    return options


def _check_size(name: str, value: Any) -> None:
    """Bytes (int), a fraction of the device's memory (float in (0, 1]), or a string like "4GB"."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ClusterOptionError(f"{name} must be bytes (int), a fraction of the device's memory (float) "
                                 f"or a size like '4GB', not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ClusterOptionError(f"{name} must not be negative, got {value}")
        return
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ClusterOptionError(f"{name}={value!r}: a float is a fraction of the device's memory, "
                                     "0 < f <= 1; give bytes as an int or a size like '4GB'")
        return
    try:
        fraction = float(value)
    except ValueError:
        fraction = None
    if fraction is not None and "." in value:
        if not 0.0 < fraction <= 1.0:
            raise ClusterOptionError(f"{name}={value!r}: a fraction of the device's memory must be in (0, 1]")
        return
    try:
        dask.utils.parse_bytes(value)
    except ValueError as error:
        raise ClusterOptionError(f"{name}={value!r} is not a size: {error}") from None


def _rmm_requested(options: dict[str, Any]) -> bool:
    return any(options[name] != default for name, default in RMM_OPTIONS.items())


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a broken __spec__
        return False


def _cuda_missing(options: dict[str, Any], n_workers: int | None) -> list[str]:
    missing = []
    if not _installed("dask_cuda"):
        missing.append(f"dask-cuda is not installed ({GPU_INSTALL_HINT})")
    if _rmm_requested(options) and not _installed("rmm"):
        given = [name for name, default in RMM_OPTIONS.items() if options[name] != default]
        missing.append(f"RMM is not installed and {', '.join(given)} need(s) it ({GPU_INSTALL_HINT})")
    if options["rmm_for_cupy"] and not _installed("cupy"):
        missing.append(f"CuPy is not installed and rmm_for_cupy needs it ({GPU_INSTALL_HINT})")
    count, source = cuda_device_count()
    if count == 0:
        missing.append(f"no CUDA device found ({source})")
    elif n_workers is not None and n_workers > count:
        missing.append(f"n_workers={n_workers} but {count} CUDA device(s) ({source}): one worker per GPU")
    return missing


# ---------------------------------------------------------------------- devices
def cuda_device_count() -> tuple[int, str]:
    """How many CUDA devices this process may use, and how that was found out.

    Asks the cheapest source that answers: ``CUDA_VISIBLE_DEVICES`` when it hides
    every device, then NVML (``pynvml``, from nvidia-ml-py, a dependency of
    dask-cuda; creates no CUDA context), then ``nvidia-smi -L``, and only then CuPy
    (an import of a second or more). Never raises.

    Returns
    -------
    count : int
        Devices found (0 when none, or when no source could tell).
    source : str
        The source that answered, or why each one could not.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0, f"CUDA_VISIBLE_DEVICES={visible!r} hides every device"
    notes = []
    for ask in (_devices_from_nvml, _devices_from_nvidia_smi, _devices_from_cupy):
        count, note = ask()
        if count is None:
            notes.append(note)
            continue
        if visible is not None and count > 0:
            count = min(count, len([entry for entry in visible.split(",") if entry.strip()]))
            note += f", CUDA_VISIBLE_DEVICES={visible!r}"
        return count, note
    return 0, "; ".join(notes)


def _devices_from_nvml() -> tuple[int | None, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the old `pynvml` wrapper warns that it is deprecated
            import pynvml
    except ImportError:
        return None, "NVML: nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as error:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return None, f"NVML: {type(error).__name__}: {error}"
    try:
        return int(pynvml.nvmlDeviceGetCount()), "NVML"
    except Exception as error:
        return None, f"NVML: {type(error).__name__}: {error}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # nothing left to undo
            pass


def _devices_from_nvidia_smi() -> tuple[int | None, str]:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None, "nvidia-smi: not on PATH"
    try:
        listed = subprocess.run([executable, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"nvidia-smi: {type(error).__name__}: {error}"
    if listed.returncode != 0:
        last = (listed.stderr or listed.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"nvidia-smi -L exited {listed.returncode}: {last[0]}"
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines()), "nvidia-smi"


def _devices_from_cupy() -> tuple[int | None, str]:
    try:
        import cupy
    except ImportError:
        return None, "CuPy: not installed"
    except Exception as error:  # a CuPy whose CUDA libraries fail to load
        return None, f"CuPy: {type(error).__name__}: {error}"
    try:
        return int(cupy.cuda.runtime.getDeviceCount()), "CuPy"
    except Exception as error:  # CUDARuntimeError without a driver
        return None, f"CuPy: {type(error).__name__}: {error}"


# ---------------------------------------------------------------------- connect
@contextmanager
def connect(
    *,
    client: Any = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | float | None = "auto",
    cluster: str = "local",
    **cluster_options: Any,
) -> Iterator[Any]:
    """Yield a ``distributed.Client``: the given one, one for ``scheduler``, or an embedded cluster.

    Only what this function started is closed on exit; a client passed in stays open.
    An external scheduler keeps its own ``allowed-failures`` (dask's default 3): it
    retries a dead worker's tasks itself before hcs_dask sees ``KilledWorker``.

    Parameters
    ----------
    client : distributed.Client, optional
        Use this client.
    scheduler : str, optional
        An address (``tcp://host:8786``) or the path of a scheduler file.
    n_workers, threads_per_worker, memory_limit
        The embedded cluster's workers (``"local"``: default one per core;
        ``"cuda"``: default one per visible GPU, and one thread each) and their host
        memory limit.
    cluster : {"local", "cuda", "slurm", "pbs", "lsf", "sge"}
        ``"local"``: ``distributed.LocalCluster(processes=True)``. ``"cuda"``:
        ``dask_cuda.LocalCUDACluster``, whose workers offer ``resources={"GPU": 1}``
        and start with :data:`CUDA_WORKER_CONFIG` (JAX's preallocation off).
        A batch system: :func:`hcs_dask.hpc.hpc_client` with ``cluster_options`` (``jobs``
        and dask-jobqueue's options); its jobs are cancelled on exit.
    **cluster_options
        Passed to the cluster class (e.g. ``resources``, ``CUDA_VISIBLE_DEVICES``),
        except these RMM options of ``"cuda"``:

        ``rmm_pool_size``
            An RMM pool of this size per worker (bytes, a fraction of the device's
            memory as a float, or a size such as ``"8GB"``).
        ``rmm_maximum_pool_size``
            The most the pool (or, with ``rmm_async``, the allocator) may hold.
        ``rmm_async``
            Use the CUDA asynchronous allocator (``cudaMallocAsync``) instead of a pool.
        ``rmm_release_threshold``
            With ``rmm_async``: memory the allocator keeps; above it, freed memory goes
            back to the driver at the cleanup's device synchronisation.
        ``rmm_managed_memory``
            Allocate managed (unified) memory, which can exceed the device's.
        ``rmm_for_cupy``
            Make RMM CuPy's allocator on every worker, so that CuPy's memory lives in
            (and is cleaned through) RMM instead of CuPy's own pool.
        ``rmm_reinitialize_pool``
            With ``rmm_pool_size``: re-initialise the pool after every well, giving
            back what it grew by, on every worker including restarted ones
            (:class:`RMMReinitializePlugin`).

    Yields
    ------
    distributed.Client

    Raises
    ------
    ClusterOptionError
        (a ``ValueError``) Malformed or contradicting options; ``cluster="cuda"`` or
        RMM options together with ``client`` or ``scheduler``.
    ClusterError
        A scheduler that cannot be reached, or a CUDA cluster that cannot start,
        naming what is missing (see :func:`check_cluster`).
    """
    from distributed import Client, LocalCluster

    check_cluster(cluster, client=client, scheduler=scheduler, n_workers=n_workers,
                  threads_per_worker=threads_per_worker, **cluster_options)
    if client is not None:
        yield client
        return
    if scheduler is not None:
        # Dask's connect timeout (distributed.comm.timeouts.connect, default 30 s) bounds the wait.
        timeout = dask.config.get("distributed.comm.timeouts.connect")
        try:
            if Path(scheduler).is_file():
                remote = Client(scheduler_file=scheduler, timeout=timeout)
            else:
                remote = Client(scheduler, timeout=timeout)
        except (OSError, ValueError, TimeoutError) as error:
            raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {error}") from error
        try:
            yield remote
        finally:
            remote.close()
        return
    from hcs_dask import hpc  # batch systems through dask-jobqueue

    if cluster in hpc.HPC_KINDS:
        hpc.check_hpc_options(cluster, memory_limit=memory_limit, **cluster_options)
        with hpc.hpc_client(cluster, **cluster_options) as batch_client:
            yield batch_client
        return
    if cluster == "cuda":
        with _cuda_client(n_workers, memory_limit, cluster_options) as cuda_client:
            yield cuda_client
        return
    passed = _with_preload({name: value for name, value in cluster_options.items() if not name.startswith("rmm_")})
    drop_inherited_malloc_trim()
    with ExitStack() as stack:
        # Dask reads the start method whenever a nanny starts a worker process, from the config
        # of the whole process: it is set while the cluster is made, not while it runs, so that
        # a LocalCluster of the user's made meanwhile starts its workers as it would anyway. A
        # worker that its nanny restarts later is spawned.
        start = _forkserver.start_method()
        if start == "forkserver":
            with dask.config.set(embedded_config()):
                changed, release = _forkserver.acquire(dask.config.get("distributed.nanny.pre-spawn-environ"))
            stack.callback(release)
            if changed:
                passed["env"] = {**changed, **(passed.get("env") or {})}
        with dask.config.set({**embedded_config(), "distributed.worker.multiprocessing-method": start}):
            local_cluster = LocalCluster(
                n_workers=n_workers or available_cores(),
                threads_per_worker=threads_per_worker,
                processes=True,
                memory_limit=memory_limit,
                scheduler_port=0,
                dashboard_address=":0",
                silence_logs=logging.ERROR,
                **passed,
            )
        stack.callback(local_cluster.close)
        # Not `with Client(...)`: a run's driver thread closes the cluster, and the client's
        # context manager may only be left in the context (thread) that entered it.
        local = Client(local_cluster)
        stack.callback(local.close)
        with dask.config.set(EMBEDDED_LIFETIME_CONFIG):
            yield local


@contextmanager
def _cuda_client(n_workers: int | None, memory_limit: str | float | None,
                 cluster_options: dict[str, Any]) -> Iterator[Any]:
    from distributed import Client

    options = _cuda_options(1, cluster_options)
    passed = _with_preload({name: value for name, value in cluster_options.items() if name not in RMM_OPTIONS})
    resources = {"GPU": 1, **passed.pop("resources", {})}
    try:
        import dask_cuda
    except Exception as error:  # ImportError, or a CUDA library of its dependencies that fails to load
        raise ClusterError(f"dask-cuda cannot be imported: {type(error).__name__}: {error} "
                           f"({GPU_INSTALL_HINT})") from error
    drop_inherited_malloc_trim()
    # The nannies read both configs when they are made, here, and keep them for restarts.
    with dask.config.set({**embedded_config(), **CUDA_WORKER_CONFIG}):
        try:
            cuda_cluster = dask_cuda.LocalCUDACluster(
                n_workers=n_workers,
                threads_per_worker=1,
                memory_limit=memory_limit,
                scheduler_port=0,
                dashboard_address=":0",
                silence_logs=logging.ERROR,
                resources=resources,
                rmm_pool_size=options["rmm_pool_size"],
                rmm_maximum_pool_size=options["rmm_maximum_pool_size"],
                rmm_async=options["rmm_async"],
                rmm_release_threshold=options["rmm_release_threshold"],
                rmm_managed_memory=options["rmm_managed_memory"],
                rmm_allocator_external_lib_list=["cupy"] if options["rmm_for_cupy"] else None,
                **passed,
            )
        except Exception as error:
            raise ClusterError(f"the LocalCUDACluster did not start: {type(error).__name__}: {error}") from error
    cuda_client = Client(cuda_cluster)
    try:
        if options["rmm_reinitialize_pool"]:
            # The scheduler keeps the plugin and sets it up on every worker that
            # joins, after dask-cuda's own RMM set-up there: restarted ones too.
            cuda_client.register_plugin(RMMReinitializePlugin(
                options["rmm_pool_size"], options["rmm_maximum_pool_size"], options["rmm_managed_memory"]))
        with dask.config.set(EMBEDDED_LIFETIME_CONFIG):
            yield cuda_client
    finally:
        cuda_client.close()
        cuda_cluster.close()


class RMMReinitializePlugin(WorkerPlugin):
    """Make every worker's well cleanup re-create the RMM pool that dask-cuda gave it.

    Registered by ``connect(cluster="cuda", rmm_pool_size=..., rmm_reinitialize_pool=True)``.
    The scheduler keeps it and sets it up on every worker that joins, so a worker that
    the nanny restarts (after a death or a timeout) re-creates its pool after each well
    too. ``setup`` parses the sizes as dask-cuda parsed them for the worker's device
    (``dask_cuda.utils.parse_device_bytes``), so the re-created pool is the pool the
    worker started with, and hands them to
    :func:`hcs_dask.memory.gpu.configure_rmm_cleanup`.

    Parameters
    ----------
    pool_size : int, float or str
        ``rmm_pool_size`` as given to the cluster (bytes, a fraction of the device's
        memory, or a size such as ``"8GB"``).
    maximum_pool_size : int, float, str or None, default None
        ``rmm_maximum_pool_size`` as given to the cluster.
    managed_memory : bool, default False
        ``rmm_managed_memory`` as given to the cluster.

    Raises
    ------
    ClusterOptionError
        (a ``ValueError``) No pool size, a malformed size, or a flag that is not a bool.
    """

    name = "hcs-dask-rmm-reinitialize"
    idempotent = True

    def __init__(self, pool_size: Any, maximum_pool_size: Any = None, managed_memory: bool = False) -> None:
        if pool_size is None:
            raise ClusterOptionError("RMMReinitializePlugin needs the pool size (rmm_pool_size)")
        _check_size("rmm_pool_size", pool_size)
        _check_size("rmm_maximum_pool_size", maximum_pool_size)
        if not isinstance(managed_memory, bool):
            raise ClusterOptionError(f"rmm_managed_memory must be True or False, not {managed_memory!r}")
        self.pool_size = pool_size
        self.maximum_pool_size = maximum_pool_size
        self.managed_memory = managed_memory

    def setup(self, worker: Any) -> None:
        """Configure this worker process's cleanup (again, on a restarted worker)."""
        from hcs_dask.memory import gpu

        gpu.configure_rmm_cleanup(reinitialize_pool=True, **self.reinitialize_options())

    def teardown(self, worker: Any) -> None:
        from hcs_dask.memory import gpu

        gpu.configure_rmm_cleanup(reinitialize_pool=False)

    def reinitialize_options(self) -> dict[str, Any]:
        """The ``rmm.reinitialize`` options for this process's device (needs dask-cuda)."""
        from dask_cuda.utils import parse_device_bytes

        return {
            "pool_allocator": True,
            "managed_memory": self.managed_memory,
            "initial_pool_size": parse_device_bytes(self.pool_size, alignment_size=256),
            "maximum_pool_size": parse_device_bytes(self.maximum_pool_size, alignment_size=256),
        }
