"""GPU memory pools: a registry of per-framework cleaners, and their statistics.

A well leaves GPU memory behind in the *pools* of the frameworks it used: CuPy
keeps freed blocks for reuse, RMM keeps its pool, PyTorch its caching
allocator, JAX its BFC pool. :func:`release_gpu_pools` hands back what each
framework can hand back and measures what each one held before and after. It is
the GPU half of the cleanup contract (docs/ARCHITECTURE.md, "The cleanup
contract"): the cleanup in the well's own thread after every well, the worker
plugin's safety net, and the per-well pool figures. A framework that cannot say
what it holds is reported as ``None`` (unknown), never as 0.

Each cleaner is tied to a module name and runs only when that module is
already in :data:`sys.modules`. Cleanup never imports a framework: importing
CuPy or PyTorch costs seconds and, on a GPU, a CUDA context of several hundred
megabytes, which is exactly the kind of memory this module exists to give back.
With nothing loaded, :func:`release_gpu_pools` is a loop over a small tuple of
dictionary look-ups (well under a microsecond per cleaner).

This module's state: the cleaner registry, the :func:`configure_rmm_cleanup`
options, the measurement switch (see :func:`cleanup_enabled`) and a per-process
note of whether CuPy sees a device. :func:`reset_cleaner_registry` restores all
four. It is not the package's only module-level state: the memory backend keeps
its scopes (:mod:`hcs_dask.memory.backend`, reset by ``reset_memory_backend``),
and other modules keep caches of their own.

Examples
--------
Register a cleaner for another library (it runs only once ``mylib`` is imported):

>>> from hcs_dask.memory import gpu
>>> gpu.register_cleaner(
...     "mylib", module="mylib", release=lambda: None, measure=lambda: 0, order=60
... )
>>> "mylib" in gpu.registered_cleaners()
True
>>> gpu.unregister_cleaner("mylib")
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Final

__all__ = [
    "CleanerReport",
    "cleanup_enabled",
    "configure_rmm_cleanup",
    "pool_bytes",
    "register_cleaner",
    "registered_cleaners",
    "release_gpu_pools",
    "reset_cleaner_registry",
    "unregister_cleaner",
]


@dataclass(frozen=True)
class CleanerReport:
    """What one framework's cleaner did during one :func:`release_gpu_pools` call.

    Attributes
    ----------
    framework : str
        The cleaner's registered name (``"cupy"``, ``"rmm"``, ...).
    bytes_before, bytes_after : int or None
        Bytes held by the framework's pools, measured just before and just after
        the release. None where the figure is unknown: the cleaner has no
        measure, the measure failed (see ``error``), or the framework cannot
        tell (RMM's asynchronous allocator, JAX without allocator statistics).
    seconds : float
        Wall time of measure + release + measure.
    error : str or None
        ``"ExceptionType: message"`` of the first failure (measure or release),
        None when everything worked.
    """

    framework: str
    bytes_before: int | None
    bytes_after: int | None
    seconds: float
    error: str | None = None

    @property
    def freed(self) -> int | None:
        """Bytes handed back (never negative: a pool that grew meanwhile freed 0).

        None when either figure is unknown.
        """
        if self.bytes_before is None or self.bytes_after is None:
            return None
        return max(0, self.bytes_before - self.bytes_after)


@dataclass(frozen=True)
class _Cleaner:
    name: str
    framework: str  # the name in reports; differs from `name` only for rmm-reinitialize
    module: str
    release: Callable[[], None] | None  # None: the framework gives nothing back (measured only)
    measure: Callable[[], int | None] | None
    order: int
    exclusive: bool
    last: bool  # runs after every other cleaner, whatever their order
    sequence: int


_registry_lock = threading.Lock()
_registry: dict[str, _Cleaner] = {}
# Rebuilt on every (un)registration, read without the lock: the hot path only
# ever sees a complete tuple (assigning a module global is atomic).
_ordered: tuple[_Cleaner, ...] = ()
_sequence = 0
# The cleaner configure_rmm_cleanup adds; it always runs last.
_RMM_REINITIALIZE: Final = "rmm-reinitialize"

# MEASUREMENT SWITCH. False only while the memory-stability benchmark measures
# what happens *without* cleanup; nothing else may turn it off.
_cleanup_enabled = True


# ---------------------------------------------------------------------------
# registry


def register_cleaner(
    name: str,
    *,
    module: str,
    release: Callable[[], None],
    measure: Callable[[], int | None] | None = None,
    order: int = 100,
    exclusive: bool = False,
) -> None:
    """Register (or replace) the cleaner of one framework.

    Parameters
    ----------
    name : str
        Name of the cleaner, used as ``framework`` in reports and statistics.
        Registering an existing name replaces that cleaner.
    module : str
        The cleaner runs only while ``sys.modules[module]`` is loaded. Cleanup
        never imports it.
    release : callable
        ``release() -> None``: give the framework's cached memory back. Import the
        framework inside it (it is loaded whenever ``release`` runs).
    measure : callable, optional
        ``measure() -> int | None``: bytes currently held by the framework's
        pools, or None when the framework cannot tell. It must not release
        anything.
    order : int, default 100
        Cleaners run in increasing ``order`` (ties: registration order). The
        built-ins use 10 (RMM) to 50 (TensorFlow). The RMM re-initialisation of
        :func:`configure_rmm_cleanup` runs after every cleaner, whatever its order.
    exclusive : bool, default False
        Run only when :func:`release_gpu_pools` is called with
        ``exclusive=True``, i.e. when no other thread of the process can be using
        the framework. For process-wide resets that would break a concurrently
        running task.

    Raises
    ------
    TypeError
        If a callable is not callable or ``order`` is not an int.
    ValueError
        If ``name`` or ``module`` is empty.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"cleaner name must be a non-empty string, got {name!r}")
    if not isinstance(module, str) or not module:
        raise ValueError(f"cleaner {name!r}: module must be a non-empty module name, got {module!r}")
    if not callable(release):
        raise TypeError(f"cleaner {name!r}: release must be callable, got {release!r}")
    if measure is not None and not callable(measure):
        raise TypeError(f"cleaner {name!r}: measure must be callable or None, got {measure!r}")
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"cleaner {name!r}: order must be an int, got {order!r}")
    _add_cleaner(name, name, module, release, measure, order, exclusive)


def _add_cleaner(
    name: str,
    framework: str,
    module: str,
    release: Callable[[], None] | None,
    measure: Callable[[], int | None] | None,
    order: int,
    exclusive: bool,
    last: bool = False,
) -> None:
    global _sequence
    with _registry_lock:
        _sequence += 1
        _registry[name] = _Cleaner(
            name=name,
            framework=framework,
            module=module,
            release=release,
            measure=measure,
            order=order,
            exclusive=bool(exclusive),
            last=last,
            sequence=_sequence,
        )
        _rebuild_order()


def unregister_cleaner(name: str) -> None:
    """Remove the cleaner ``name``.

    Raises
    ------
    KeyError
        If no cleaner of that name is registered.
    """
    with _registry_lock:
        if name not in _registry:
            raise KeyError(f"no GPU cleaner named {name!r}; registered: {sorted(_registry)}")
        del _registry[name]
        _rebuild_order()


def registered_cleaners() -> list[str]:
    """Names of the registered cleaners, in the order they run."""
    return [cleaner.name for cleaner in _ordered]


def reset_cleaner_registry() -> None:
    """Restore the built-in cleaners (RMM, CuPy, PyTorch, JAX, TensorFlow) only.

    Also forgets :func:`configure_rmm_cleanup` options (and its
    ``"rmm-reinitialize"`` cleaner), turns the measurement switch back on and
    forgets whether CuPy sees a device (asked again when next needed): all of
    this module's state. Meant for tests.
    """
    global _cleanup_enabled, _cupy_has_device_cached
    with _registry_lock:
        _registry.clear()
        _rmm_config.clear()
        _rebuild_order()
    _cleanup_enabled = True
    _cupy_has_device_cached = None
    _register_builtins()


def _rebuild_order() -> None:
    global _ordered
    _ordered = tuple(sorted(_registry.values(), key=lambda c: (c.last, c.order, c.sequence)))


# ---------------------------------------------------------------------------
# running the cleaners


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _measured(measure: Callable[[], int | None]) -> int | None:
    held = measure()
    return None if held is None else int(held)


def _run_cleaner(cleaner: _Cleaner) -> CleanerReport:
    start = time.perf_counter()
    error: str | None = None
    before = after = None
    if cleaner.measure is not None:
        try:
            before = _measured(cleaner.measure)
        except Exception as exc:  # a broken measure must not stop the release
            error = f"measure: {_describe(exc)}"
    if cleaner.release is not None:
        try:
            cleaner.release()
        except Exception as exc:
            error = error or _describe(exc)
    if cleaner.measure is not None:
        try:
            after = _measured(cleaner.measure)
        except Exception as exc:
            error = error or f"measure: {_describe(exc)}"
    return CleanerReport(
        framework=cleaner.framework,
        bytes_before=before,
        bytes_after=after,
        seconds=time.perf_counter() - start,
        error=error,
    )


def release_gpu_pools(*, exclusive: bool = False) -> list[CleanerReport]:
    """Release the memory pools of every framework that is already imported.

    Cleaners run in their registered order; each one is measured, released,
    measured again and timed. A cleaner that raises is recorded in its report's
    ``error`` and never stops the others; this function never raises.

    Parameters
    ----------
    exclusive : bool, default False
        The caller guarantees that no other thread of this process is using a GPU
        framework right now (the well's own guard on a single-threaded worker).
        Only then do the cleaners registered ``exclusive`` run: process-wide
        resets (RMM re-initialisation, Keras ``clear_session``) that would break
        a task running in another thread. The worker plugin, which cleans from a
        background thread while the next task may already run, never passes it.

    Returns
    -------
    list of CleanerReport
        One report per cleaner that ran, in run order; empty when no framework
        is loaded, or while the measurement switch has cleanup disabled. RMM
        gives a second ``"rmm"`` report on an exclusive call once a
        re-initialisation is configured (see :func:`configure_rmm_cleanup`). It
        comes last, after every other framework released what it held from the
        pool, and measures the pool just before and after re-initialising.

    Examples
    --------
    >>> reports = release_gpu_pools()
    >>> sum(report.freed or 0 for report in reports) >= 0
    True
    """
    if not _cleanup_enabled:
        return []
    modules = sys.modules
    reports: list[CleanerReport] = []
    for cleaner in _ordered:
        # `sys.modules[name] = None` blocks an import: that is "not loaded" too.
        if modules.get(cleaner.module) is None or (cleaner.exclusive and not exclusive):
            continue
        try:
            reports.append(_run_cleaner(cleaner))
        except Exception as exc:  # pragma: no cover - _run_cleaner already catches
            reports.append(CleanerReport(cleaner.framework, None, None, 0.0, _describe(exc)))
    return reports


def pool_bytes() -> dict[str, int | None]:
    """Bytes held per loaded framework, measured without releasing anything.

    Returns
    -------
    dict
        ``{framework: bytes}`` for every loaded framework whose cleaner has a
        measure; None where the framework cannot tell or the measure fails.
        Empty when nothing is loaded.
    """
    modules = sys.modules
    held: dict[str, int | None] = {}
    for cleaner in _ordered:
        if cleaner.measure is None or cleaner.framework in held or modules.get(cleaner.module) is None:
            continue
        try:
            held[cleaner.framework] = _measured(cleaner.measure)
        except Exception:
            held[cleaner.framework] = None
    return held


# ---------------------------------------------------------------------------
# the measurement switch


def cleanup_enabled() -> bool:
    """Whether cleanup runs (True except inside the memory-stability benchmark)."""
    return _cleanup_enabled


def _set_cleanup_enabled(enabled: bool) -> bool:
    """MEASUREMENT SWITCH: turn all cleanup of this process off or on again.

    Only the memory-stability benchmark calls this, to measure the memory a run
    accumulates *without* cleanup next to the same run with it. While it is off,
    :func:`release_gpu_pools` returns ``[]`` without touching any pool and the
    worker plugin skips its safety net. Returns the previous value.
    """
    global _cleanup_enabled
    previous = _cleanup_enabled
    _cleanup_enabled = bool(enabled)
    return previous


# ---------------------------------------------------------------------------
# built-in cleaners. Every framework import happens inside a function and is
# only reached when the framework is already in sys.modules.


def _loaded(name: str) -> ModuleType:
    module = sys.modules.get(name)
    if module is None:
        raise RuntimeError(f"{name} is not loaded")  # the registry checked; a race with unloading
    return module


def _status_ok(status: Any) -> bool:
    """Whether a CUDA status (an enum of cuda-python, or an int) is success."""
    return int(getattr(status, "value", status)) == 0


def _synchronize_device() -> None:
    """cudaDeviceSynchronize through a binding that is already loaded (never import one)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        runtime: Any = sys.modules.get(name)
        if runtime is not None and hasattr(runtime, "cudaDeviceSynchronize"):
            result = runtime.cudaDeviceSynchronize()
            status = result[0] if isinstance(result, tuple) else result
            if not _status_ok(status):
                raise RuntimeError(f"cudaDeviceSynchronize failed: {status!r}")
            return
    cupy: Any = sys.modules.get("cupy")
    if cupy is not None:
        cupy.cuda.runtime.deviceSynchronize()
        return
    raise RuntimeError("no loaded CUDA binding (cuda-python or CuPy) to synchronise the device")


# CuPy ----------------------------------------------------------------------

# Whether CuPy sees a device; asked once (cudaGetDeviceCount creates no context;
# reset_cleaner_registry forgets the answer) so that a CPU-only worker that
# merely imported CuPy does not get an error in every report.
_cupy_has_device_cached: bool | None = None


def _cupy_has_device(cupy: Any) -> bool:
    global _cupy_has_device_cached
    if _cupy_has_device_cached is None:
        try:
            _cupy_has_device_cached = int(cupy.cuda.runtime.getDeviceCount()) > 0
        except Exception:
            _cupy_has_device_cached = False
    return _cupy_has_device_cached


def _cupy_allocator_is_rmm(cupy: Any) -> bool:
    get_allocator = getattr(cupy.cuda, "get_allocator", None)
    if get_allocator is None:
        return False
    allocator = get_allocator()
    return getattr(allocator, "__name__", "") == "rmm_cupy_allocator" or str(
        getattr(allocator, "__module__", "") or ""
    ).startswith("rmm")


def _measure_cupy() -> int:
    cupy: Any = _loaded("cupy")
    if not _cupy_has_device(cupy):
        return 0
    held = int(cupy.get_default_memory_pool().total_bytes())
    # PinnedMemoryPool has no byte count in most CuPy versions; use one where it exists.
    pinned_total = getattr(cupy.get_default_pinned_memory_pool(), "total_bytes", None)
    if callable(pinned_total):
        held += int(pinned_total())
    return held


def _release_cupy() -> None:
    cupy: Any = _loaded("cupy")
    if not _cupy_has_device(cupy):
        return
    pool = cupy.get_default_memory_pool()
    # Synchronise first so kernels still in flight finish with their blocks
    # before the blocks go back to the driver. Only when the device was used:
    # cudaDeviceSynchronize would otherwise create a CUDA context (hundreds of
    # MB) in a process that only imported CuPy. With RMM as CuPy's allocator the
    # memory lives in RMM (its cleaner ran first and reports it); the default
    # pool is then empty and freeing it is harmless.
    if pool.total_bytes() > 0 or _cupy_allocator_is_rmm(cupy):
        cupy.cuda.Device().synchronize()
    pool.free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()
    # The FFT plan cache holds work areas on the device. It is per thread and per
    # device, so this clears the calling thread's cache (the well's guard runs in
    # the task's thread). Only touch it when cupy.fft is already imported.
    fft_config: Any = sys.modules.get("cupy.fft.config")
    if fft_config is not None:
        fft_config.get_plan_cache().clear()


# RMM -----------------------------------------------------------------------

_ASYNC_RESOURCES: Final = frozenset(
    {"CudaAsyncMemoryResource", "CudaAsyncViewMemoryResource", "CudaAsyncManagedMemoryResource"}
)
# Resources and adaptors that keep no memory once it is freed: their pool holds 0 bytes.
_RMM_UNPOOLED: Final = frozenset({
    "CudaMemoryResource", "ManagedMemoryResource", "SystemMemoryResource", "SamHeadroomMemoryResource",
    "PinnedHostMemoryResource", "StatisticsResourceAdaptor", "TrackingResourceAdaptor",
    "LoggingResourceAdaptor", "LimitingResourceAdaptor", "PrefetchResourceAdaptor",
    "FailureCallbackResourceAdaptor",
})
# Options given to configure_rmm_cleanup (empty: never re-initialise).
_rmm_config: dict[str, Any] = {}


def _rmm_device_resources() -> list[Any] | None:
    """RMM's memory resource of every device it holds one for; None where this RMM cannot say.

    ``rmm.is_initialized()`` cannot tell: it is ``all(...)`` over RMM's per-device
    resources, True when there are none. ``get_log_filenames()`` lists that same
    per-device dictionary on the host, so it creates no CUDA context, and it is empty
    in a process that never set a resource (distributed imports RMM wherever it is
    installed). ``get_current_device_resource()`` would ask the CUDA runtime for the
    current device instead, and make a default resource for it.
    """
    rmm: Any = _loaded("rmm")
    mr = getattr(rmm, "mr", None)
    listing = getattr(mr, "get_log_filenames", None) or getattr(rmm, "get_log_filenames", None)
    get_resource = getattr(mr, "get_per_device_resource", None)
    if not callable(listing) or not callable(get_resource):
        return None
    return [get_resource(int(device)) for device in listing()]


def _rmm_chain(resource: Any) -> list[Any]:
    """``resource`` and its upstream resources, adaptors first."""
    chain: list[Any] = []
    while resource is not None and len(chain) < 16:
        chain.append(resource)
        get_upstream = getattr(resource, "get_upstream", None)  # newer RMM
        resource = get_upstream() if callable(get_upstream) else getattr(resource, "upstream_mr", None)
    return chain


def _is_async(resource: Any) -> bool:
    return type(resource).__name__ in _ASYNC_RESOURCES


def _has_pool(chain: list[Any]) -> bool:
    return any(callable(getattr(resource, "pool_size", None)) for resource in chain)


def _mempool_reserved_bytes(handle: int) -> int | None:
    """``cudaMemPoolAttrReservedMemCurrent`` of a CUDA memory pool, through a binding already loaded."""
    runtime: Any = sys.modules.get("cuda.bindings.runtime") or sys.modules.get("cuda.cudart")
    if runtime is not None and hasattr(runtime, "cudaMemPoolGetAttribute"):
        status, value = runtime.cudaMemPoolGetAttribute(
            runtime.cudaMemPool_t(handle), runtime.cudaMemPoolAttr.cudaMemPoolAttrReservedMemCurrent
        )
        if not _status_ok(status):
            raise RuntimeError(f"cudaMemPoolGetAttribute failed: {status!r}")
        return int(value)
    cupy: Any = sys.modules.get("cupy")
    if cupy is not None:
        cuda_runtime = cupy.cuda.runtime
        return int(cuda_runtime.memPoolGetAttribute(handle, cuda_runtime.cudaMemPoolAttrReservedMemCurrent))
    return None


def _rmm_chain_bytes(chain: list[Any]) -> int | None:
    """Bytes the pool of one device's resource chain holds; None where RMM cannot tell."""
    for resource in chain:
        pool_size = getattr(resource, "pool_size", None)
        if callable(pool_size):  # PoolMemoryResource: what it took from upstream, free or in use
            return int(pool_size())
    for resource in chain:
        if _is_async(resource):
            # RMM gives Python the handle of a view's pool, not of the pool a
            # CudaAsyncMemoryResource creates: its bytes are then unknown.
            pool_handle = getattr(resource, "pool_handle", None)
            return _mempool_reserved_bytes(int(pool_handle())) if callable(pool_handle) else None
    if all(type(resource).__name__ in _RMM_UNPOOLED for resource in chain):
        return 0
    return None  # arena, binning, fixed-size or a user's resource: pools without a figure


def _measure_rmm() -> int | None:
    resources = _rmm_device_resources()
    if resources is None:
        return None
    held = 0
    for resource in resources:
        figure = _rmm_chain_bytes(_rmm_chain(resource))
        if figure is None:
            return None
        held += figure
    return held


def _release_rmm() -> None:
    # A cudaMallocAsync pool returns memory above its release threshold to the
    # driver at synchronisation points: synchronise so that happens now. A pool
    # resource frees nothing short of re-initialisation, which is the separate,
    # exclusive "rmm-reinitialize" cleaner (configure_rmm_cleanup). An RMM that
    # holds no resource (or cannot say) is never asked anything else.
    resources = _rmm_device_resources() or []
    if any(_is_async(r) for resource in resources for r in _rmm_chain(resource)):
        _synchronize_device()


def _reinitialize_rmm_pool() -> None:
    if not _rmm_config:
        return
    resources = _rmm_device_resources() or []
    if not any(_has_pool(_rmm_chain(resource)) for resource in resources):
        return
    rmm: Any = _loaded("rmm")
    _synchronize_device()
    rmm.reinitialize(**_rmm_config)


def configure_rmm_cleanup(reinitialize_pool: bool = False, **reinitialize_kwargs: Any) -> None:
    """Choose whether cleanup re-initialises an RMM pool to give its memory back.

    An RMM ``PoolMemoryResource`` never shrinks; the only way to return its memory
    is ``rmm.reinitialize``. That is undefined behaviour while any RMM allocation
    is alive, so it runs only from an *exclusive* cleanup
    (``release_gpu_pools(exclusive=True)``: the well's own guard on a
    single-threaded worker, after the well dropped its arrays), never from the
    worker plugin's background thread, and after every other cleaner, so that
    CuPy's pools and FFT plan cache have given back the blocks they held from the
    old pool. Turn it on only when nothing else in the worker process keeps RMM
    memory (no CuPy arrays held in the worker's data). The setting is per
    process: ``connect(cluster="cuda", rmm_reinitialize_pool=True)`` makes it on
    every worker, restarted ones included, through
    :class:`hcs_dask.cluster.RMMReinitializePlugin`.

    Parameters
    ----------
    reinitialize_pool : bool, default False
        Re-initialise the pool after every exclusive cleanup.
    **reinitialize_kwargs
        The options the pool was created with, passed to ``rmm.reinitialize``
        (e.g. ``pool_allocator=True, initial_pool_size=2**30``). Required when
        ``reinitialize_pool`` is True: RMM cannot tell which options it was
        given, and re-initialising with defaults would silently drop the pool.

    Raises
    ------
    ValueError
        If options are missing for ``reinitialize_pool=True`` or given without it.
    """
    if reinitialize_pool and not reinitialize_kwargs:
        raise ValueError(
            "configure_rmm_cleanup(reinitialize_pool=True) needs the rmm.reinitialize options "
            "the pool was created with, e.g. pool_allocator=True, initial_pool_size=..."
        )
    if not reinitialize_pool and reinitialize_kwargs:
        raise ValueError(
            f"rmm.reinitialize options {sorted(reinitialize_kwargs)} given without reinitialize_pool=True"
        )
    with _registry_lock:
        _rmm_config.clear()
        _rmm_config.update(reinitialize_kwargs)
        if not reinitialize_pool and _registry.pop(_RMM_REINITIALIZE, None) is not None:
            _rebuild_order()
    if reinitialize_pool:
        # A cleaner of its own, so that it can be exclusive and last while the RMM
        # report and device sync run everywhere. It reports as a second "rmm"
        # report (what re-initialising freed), so per-framework figures stay per framework.
        _add_cleaner(_RMM_REINITIALIZE, "rmm", "rmm", _reinitialize_rmm_pool, _measure_rmm, 10, True, last=True)


# PyTorch -------------------------------------------------------------------


def _measure_torch() -> int:
    torch: Any = _loaded("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not cuda.is_initialized():
        return 0
    return int(cuda.memory_reserved())


def _release_torch() -> None:
    torch: Any = _loaded("torch")
    cuda = getattr(torch, "cuda", None)
    # Not initialised: no CUDA memory to release, and calling into torch.cuda
    # would create a context.
    if cuda is None or not cuda.is_initialized():
        return
    cuda.synchronize()
    cuda.empty_cache()
    cuda.ipc_collect()


# JAX -----------------------------------------------------------------------
# JAX has nothing to release: its BFC allocator keeps the device memory it took
# for the life of the process, and a deleted array's block goes back into that
# pool at once. `jax.clear_caches()` drops compiled functions, not device memory,
# and would force every jitted step to compile again in the next well. So the
# JAX cleaner only measures. The embedded cuda cluster starts its workers with
# XLA_PYTHON_CLIENT_PREALLOCATE=false, so the pool is what the wells needed, not
# 75 % of the device (hcs_dask.cluster.CUDA_WORKER_CONFIG).

_JAX_DEVICE_PLATFORMS: Final = ("gpu", "cuda", "rocm")


def _jax_backends_initialized() -> bool:
    # jax.devices() would initialise the backends (and preallocate GPU memory):
    # only ask once JAX itself has done so.
    bridge: Any = sys.modules.get("jax._src.xla_bridge")
    check = getattr(bridge, "backends_are_initialized", None)
    return bool(check()) if callable(check) else False


def _jax_device_bytes(stats: dict[str, Any] | None) -> int | None:
    """Device memory one JAX device's allocator holds, from ``Device.memory_stats()``."""
    if not stats:
        return None  # this allocator keeps no statistics
    pool = stats.get("pool_bytes")  # the BFC allocator: everything it took, free or in use
    if pool is not None and pool >= 0:
        return int(pool)
    in_use = stats.get("bytes_in_use")
    if os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR") == "platform" and in_use is not None and in_use >= 0:
        return int(in_use)  # the platform allocator frees at once: it holds what is in use
    return None


def _measure_jax() -> int | None:
    jax: Any = _loaded("jax")
    if not _jax_backends_initialized():
        return 0  # JAX takes device memory only once its backends start
    held = 0
    for device in jax.local_devices():
        if getattr(device, "platform", "cpu") not in _JAX_DEVICE_PLATFORMS:
            continue  # CPU-only JAX: no device pool
        figure = _jax_device_bytes(device.memory_stats())
        if figure is None:
            return None
        held += figure
    return held


# TensorFlow ----------------------------------------------------------------


def _release_tensorflow() -> None:
    # `tf.keras` is a lazy attribute that would import Keras: use a Keras that is
    # already loaded, or nothing.
    for name in ("tf_keras", "keras"):
        keras: Any = sys.modules.get(name)
        clear_session = getattr(getattr(keras, "backend", None), "clear_session", None)
        if callable(clear_session):
            clear_session()
            return


def _register_builtins() -> None:
    # RMM first: when it backs CuPy (rmm_cupy_allocator) that is where CuPy's
    # memory lives, and its report must come before CuPy's device sync + free.
    register_cleaner("rmm", module="rmm", release=_release_rmm, measure=_measure_rmm, order=10)
    register_cleaner("cupy", module="cupy", release=_release_cupy, measure=_measure_cupy, order=20)
    register_cleaner("torch", module="torch", release=_release_torch, measure=_measure_torch, order=30)
    _add_cleaner("jax", "jax", "jax", None, _measure_jax, 40, False)  # measured only: see "JAX" above
    # Keras' clear_session resets process-wide state a model in another thread
    # may be using: exclusive only.
    register_cleaner(
        "tensorflow", module="tensorflow", release=_release_tensorflow, order=50, exclusive=True
    )


_register_builtins()
