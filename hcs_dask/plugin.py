"""CleanupPlugin: the worker-side safety net of the cleanup contract (point 5).

The well's own guard (:func:`hcs_dask.run_well`) cleans in the task's thread
before it returns. This plugin cleans again after *any* task whose thread has
finished on the worker, whoever submitted it: it resets that task's
memory-backend scope (and, by default, every other scope whose task is not
running) and releases the GPU pools of the frameworks already imported. It
counts what it did, so a user can ask the cluster "did cleanup run, and what
did it free?" with :func:`cleanup_stats`.

It works registered alone on any cluster::

    client.register_plugin(CleanupPlugin())
    ...
    cleanup_stats(client)   # {worker address: {...statistics...}}

or preloaded into workers started by hand, before any client connects::

    dask worker tcp://scheduler:8786 --preload hcs_dask.plugin
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final, Hashable

from distributed import WorkerPlugin

from hcs_dask.memory import backend, gpu

if TYPE_CHECKING:
    from distributed import Client, Worker

__all__ = ["CleanupPlugin", "cleanup_stats", "dask_setup"]

# Worker transitions (distributed 2025-2026, worker_state_machine.py) that mean
# "the task's thread has returned". The execute events recommend exactly these
# three finishes; the start is "executing" or "long-running", or "cancelled" /
# "resumed" for a task the scheduler gave up on while its thread kept running.
_THREAD_DONE: Final = frozenset({"memory", "error", "rescheduled"})
_RUNNING_STATES: Final = frozenset({"executing", "long-running"})
_CANCELLED_STATES: Final = frozenset({"cancelled", "resumed"})
# Deliberately NOT a cleanup trigger:
# - executing -> long-running: the task seceded (worker_client, secede()); its
#   thread keeps running with its scope. It is cleaned when it leaves
#   long-running for memory/error/rescheduled.
# - executing|long-running -> released: the scheduler cancelled the task, but a
#   thread cannot be stopped, so the worker parks it in "cancelled" while it
#   runs on. Its scope is in use; it is cleaned when the thread returns
#   (cancelled -> memory/error/rescheduled).
# - flight/released/missing -> memory/error: data fetched from a peer or
#   scattered, or a dependency lost; no thread of ours ran.


class CleanupPlugin(WorkerPlugin):
    """Reset memory-backend scopes and release GPU pools after every task.

    Parameters
    ----------
    release_gpu : bool, default True
        Release the pools of already-imported GPU frameworks
        (:func:`hcs_dask.memory.gpu.release_gpu_pools`) after tasks.
    reset_idle_scopes : bool, default True
        Besides the finished task's own scope, reset every scope whose task is
        not running (scopes leaked under keys that are not task keys). A scope
        stays untouched while its task runs, whether the backend marks it
        active or the worker still executes its key.
    max_error_messages : int, default 5
        How many recent cleaner error messages the statistics keep.

    Raises
    ------
    TypeError
        If an option has the wrong type.
    ValueError
        If ``max_error_messages`` is below 1.

    Notes
    -----
    ``transition`` runs on the worker's event-loop thread, which carries the
    heartbeats, so it only records the request. The cleanup itself (a GPU
    release can take milliseconds) runs on one dedicated background thread.
    Requests are coalesced: while a cleanup is pending, further finished tasks
    join it, so a burst of 1000 tiny tasks costs a handful of cleanups, not 1000.

    Examples
    --------
    >>> client.register_plugin(CleanupPlugin())  # doctest: +SKIP
    >>> cleanup_stats(client)  # doctest: +SKIP
    {'tcp://127.0.0.1:40123': {'registered': True, 'tasks_seen': 12, ...}}
    """

    # One plugin per worker whoever registers it: run_plate registers it, a user
    # may too, and with a fixed name + idempotent the scheduler ignores the
    # second registration instead of stacking plugins or resetting statistics.
    # The scheduler keeps it and hands it to restarted and new workers.
    name = "hcs-dask-cleanup"
    idempotent = True

    def __init__(
        self,
        *,
        release_gpu: bool = True,
        reset_idle_scopes: bool = True,
        max_error_messages: int = 5,
    ) -> None:
        for option, value in (("release_gpu", release_gpu), ("reset_idle_scopes", reset_idle_scopes)):
            if not isinstance(value, bool):
                raise TypeError(f"CleanupPlugin({option}=...) must be a bool, got {value!r}")
        if isinstance(max_error_messages, bool) or not isinstance(max_error_messages, int):
            raise TypeError(
                f"CleanupPlugin(max_error_messages=...) must be an int, got {max_error_messages!r}"
            )
        if max_error_messages < 1:
            raise ValueError(f"CleanupPlugin(max_error_messages=...) must be >= 1, got {max_error_messages}")
        # Only picklable configuration here: the instance travels to the
        # scheduler and every worker. Runtime state is created in setup().
        self.release_gpu = release_gpu
        self.reset_idle_scopes = reset_idle_scopes
        self.max_error_messages = max_error_messages

    def __getstate__(self) -> dict[str, Any]:
        # A set-up instance (lock, executor, worker) must never be pickled whole.
        return {
            "release_gpu": self.release_gpu,
            "reset_idle_scopes": self.reset_idle_scopes,
            "max_error_messages": self.max_error_messages,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]  # re-validates

    def __repr__(self) -> str:
        return (
            f"CleanupPlugin(release_gpu={self.release_gpu}, "
            f"reset_idle_scopes={self.reset_idle_scopes})"
        )

    # -- lifecycle -----------------------------------------------------------

    def setup(self, worker: Worker) -> None:
        """Start the cleanup thread and fresh statistics on ``worker``.

        Safe to call again: a previous executor is shut down first. A restarted
        worker is a new process and gets a new instance from the scheduler.
        """
        if getattr(self, "_executor", None) is not None:
            self.teardown(worker)
        self._worker: Worker | None = worker
        self._lock = threading.Lock()
        # Keys whose thread is running (entered "executing", not yet returned),
        # including cancelled ones still running. Seeded with what runs now, for
        # a plugin registered while tasks execute. Read by the cleanup thread.
        self._running: set[Hashable] = {
            ts.key for ts in (*worker.state.executing, *worker.state.long_running)
        }
        self._pending: set[Hashable] = set()
        self._scheduled = False
        self._busy = False
        self._stats = _Statistics(self.max_error_messages)
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="hcs-dask-cleanup"
        )

    def teardown(self, worker: Worker) -> None:
        """Stop the cleanup thread (without waiting on the event loop)."""
        executor = getattr(self, "_executor", None)
        self._executor = None
        if executor is not None:
            try:
                # Do not block the event loop on a cleanup in progress (a device
                # sync); the thread finishes it and exits.
                executor.shutdown(wait=False, cancel_futures=True)
            except Exception:  # pragma: no cover - nothing sensible to do at teardown
                pass
        lock = getattr(self, "_lock", None)
        if lock is not None:
            with lock:
                self._pending.clear()
                self._running.clear()
                self._scheduled = False

    # -- the safety net --------------------------------------------------------

    def transition(self, key: Hashable, start: str, finish: str, **kwargs: Any) -> None:
        """Record a task whose thread finished and request a cleanup (event-loop thread)."""
        # Called for every transition of every task: the common case must be a
        # couple of comparisons.
        if finish == "executing":
            with self._lock:
                self._running.add(key)
            return
        if finish not in _THREAD_DONE:
            if finish == "long-running" and start == "executing":
                self._stats.tasks_seceded += 1
            return
        if start not in _RUNNING_STATES:
            # cancelled/resumed -> memory/error/rescheduled is a finished thread
            # only if it was executing here (it may also be a cancelled fetch).
            if start not in _CANCELLED_STATES or key not in self._running:
                return
        with self._lock:
            self._running.discard(key)
            self._stats.tasks_seen += 1
            if not gpu.cleanup_enabled():  # the memory-stability benchmark's run without cleanup
                self._stats.cleanups_skipped_disabled += 1
                return
            self._pending.add(key)
            self._stats.cleanup_requests += 1
            if self._scheduled or self._executor is None:
                return  # coalesced into the cleanup already queued
            self._scheduled = True
            executor = self._executor
        try:
            executor.submit(self._run_cleanup)
        except RuntimeError:  # executor shut down between the check and the submit
            with self._lock:
                self._scheduled = False

    def _run_cleanup(self) -> None:
        """One coalesced cleanup, on the cleanup thread. Never raises."""
        with self._lock:
            keys, self._pending = self._pending, set()
            self._scheduled = False  # a task finishing from now on queues the next run
            self._busy = True
        start = time.perf_counter()
        backend_freed = scopes_reset = skipped_running = 0
        reports: list[gpu.CleanerReport] = []
        failure: str | None = None
        try:
            if gpu.cleanup_enabled():
                for key in keys:
                    if self._task_running(key):
                        skipped_running += 1  # re-submitted and running again
                        continue
                    freed = backend.reset_scope_if_idle(key)
                    backend_freed += freed
                    scopes_reset += freed > 0
                if self.reset_idle_scopes:
                    for key in backend.scope_keys():
                        if self._task_running(key):
                            continue
                        freed = backend.reset_scope_if_idle(key)
                        backend_freed += freed
                        scopes_reset += freed > 0
                if self.release_gpu:
                    reports = gpu.release_gpu_pools()
        except Exception as exc:  # the safety net must never take the worker down
            failure = f"plugin: {type(exc).__name__}: {exc}"
        finally:
            seconds = time.perf_counter() - start
            with self._lock:
                self._stats.add_run(
                    seconds=seconds,
                    backend_freed=backend_freed,
                    scopes_reset=scopes_reset,
                    skipped_running=skipped_running,
                    reports=reports,
                    failure=failure,
                )
                self._busy = False

    def _task_running(self, key: Hashable) -> bool:
        # Never wipe a running task's data. The backend knows hcs_dask scopes
        # opened by the task; the worker's executing keys also cover tasks that
        # put data under their key without opening the scope, and tasks that the
        # scheduler cancelled while their thread still runs.
        if backend.is_active(key):
            return True
        with self._lock:
            return key in self._running

    # -- statistics --------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """What this worker's plugin has done since ``setup``, as a plain dict.

        Keys: ``registered`` (True), ``worker`` (address), ``tasks_seen`` (task
        threads that finished), ``tasks_seceded``, ``cleanup_requests``,
        ``cleanups_run``, ``cleanups_skipped_disabled``, ``cleanup_pending``,
        ``backend_bytes_freed``, ``backend_scopes_reset``,
        ``scopes_skipped_running``, ``gpu_bytes_freed`` (per framework, the
        releases whose bytes are known), ``gpu_releases`` (per framework),
        ``gpu_releases_unmeasured`` (per framework: releases whose freed bytes
        are unknown, e.g. RMM's asynchronous allocator), ``cleanup_seconds`` (total),
        ``last_cleanup_seconds``, ``cleaner_errors`` (count),
        ``last_errors`` (most recent messages), ``config``.
        """
        if getattr(self, "_stats", None) is None:
            return {"registered": True, "set_up": False, "config": self.__getstate__()}
        with self._lock:
            stats = self._stats.as_dict()
            stats["cleanup_pending"] = self._scheduled or self._busy
        worker = self._worker
        return {
            "registered": True,
            "worker": getattr(worker, "address", None),
            **stats,
            "config": self.__getstate__(),
        }

    def is_idle(self) -> bool:
        """True when no cleanup is queued or running."""
        with self._lock:
            return not (self._scheduled or self._busy)

    async def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait (without blocking the event loop) until queued cleanups have run.

        Returns False if they had not after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not self.is_idle():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True


class _Statistics:
    """Counters of one plugin instance; mutated under the plugin's lock."""

    def __init__(self, max_error_messages: int) -> None:
        self.tasks_seen = 0
        self.tasks_seceded = 0
        self.cleanup_requests = 0
        self.cleanups_run = 0
        self.cleanups_skipped_disabled = 0
        self.backend_bytes_freed = 0
        self.backend_scopes_reset = 0
        self.scopes_skipped_running = 0
        self.gpu_bytes_freed: dict[str, int] = {}
        self.gpu_releases: dict[str, int] = {}
        self.gpu_releases_unmeasured: dict[str, int] = {}
        self.cleanup_seconds = 0.0
        self.last_cleanup_seconds = 0.0
        self.cleaner_errors = 0
        self.last_errors: deque[str] = deque(maxlen=max_error_messages)

    def add_run(
        self,
        *,
        seconds: float,
        backend_freed: int,
        scopes_reset: int,
        skipped_running: int,
        reports: list[gpu.CleanerReport],
        failure: str | None,
    ) -> None:
        self.cleanups_run += 1
        self.cleanup_seconds += seconds
        self.last_cleanup_seconds = seconds
        self.backend_bytes_freed += backend_freed
        self.backend_scopes_reset += scopes_reset
        self.scopes_skipped_running += skipped_running
        for report in reports:
            name = report.framework
            freed = report.freed
            if freed is None:  # the framework could not say what it held: count it, add nothing
                self.gpu_releases_unmeasured[name] = self.gpu_releases_unmeasured.get(name, 0) + 1
            else:
                self.gpu_bytes_freed[name] = self.gpu_bytes_freed.get(name, 0) + freed
            self.gpu_releases[name] = self.gpu_releases.get(name, 0) + 1
            if report.error is not None:
                self.cleaner_errors += 1
                self.last_errors.append(f"{name}: {report.error}")
        if failure is not None:
            self.cleaner_errors += 1
            self.last_errors.append(failure)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks_seen": self.tasks_seen,
            "tasks_seceded": self.tasks_seceded,
            "cleanup_requests": self.cleanup_requests,
            "cleanups_run": self.cleanups_run,
            "cleanups_skipped_disabled": self.cleanups_skipped_disabled,
            "backend_bytes_freed": self.backend_bytes_freed,
            "backend_scopes_reset": self.backend_scopes_reset,
            "scopes_skipped_running": self.scopes_skipped_running,
            "gpu_bytes_freed": dict(self.gpu_bytes_freed),
            "gpu_releases": dict(self.gpu_releases),
            "gpu_releases_unmeasured": dict(self.gpu_releases_unmeasured),
            "cleanup_seconds": self.cleanup_seconds,
            "last_cleanup_seconds": self.last_cleanup_seconds,
            "cleaner_errors": self.cleaner_errors,
            "last_errors": list(self.last_errors),
        }


async def _worker_cleanup_stats(wait: float, dask_worker: Worker) -> dict[str, Any]:
    plugin = dask_worker.plugins.get(CleanupPlugin.name)
    if not isinstance(plugin, CleanupPlugin):
        return {"registered": False}
    if wait > 0:
        await plugin.wait_idle(wait)
    return plugin.statistics()


def cleanup_stats(client: Client, *, wait: float = 5.0) -> dict[str, dict[str, Any]]:
    """Cleanup statistics of every worker, keyed by worker address.

    Parameters
    ----------
    client : distributed.Client
        A client of the cluster (synchronous).
    wait : float, default 5.0
        Seconds each worker may take to finish the cleanups already queued
        (the plugin cleans in the background, just after a task ends), so the
        figures include the tasks whose results the caller already holds.
        0 reads the counters as they are.

    Returns
    -------
    dict
        ``{address: CleanupPlugin.statistics()}``; a worker without the plugin
        reports ``{"registered": False}``.

    Examples
    --------
    >>> stats = cleanup_stats(client)  # doctest: +SKIP
    >>> sum(s.get("cleanups_run", 0) for s in stats.values()) > 0  # doctest: +SKIP
    True
    """
    if wait < 0:
        raise ValueError(f"wait must be >= 0 seconds, got {wait}")
    # `wait` goes positionally: as a keyword, client.run would take it as its own.
    result: dict[str, dict[str, Any]] = client.run(_worker_cleanup_stats, float(wait))
    return result


async def dask_setup(worker: Worker) -> None:
    """Add a :class:`CleanupPlugin` to ``worker``: what ``dask worker --preload hcs_dask.plugin`` calls.

    Dask calls it once, before the worker registers with its scheduler. The plugin has
    the name a run registers it under (``CleanupPlugin.name``), so a later
    ``client.register_plugin(CleanupPlugin())`` replaces it with a fresh instance of the
    same configuration instead of adding a second one.

    Raises
    ------
    TypeError
        ``worker`` is not a ``distributed.Worker`` (a scheduler or nanny preload).
    """
    from distributed import Worker

    if not isinstance(worker, Worker):
        raise TypeError(f"hcs_dask.plugin is a worker preload (dask worker --preload hcs_dask.plugin); "
                        f"it was given a {type(worker).__name__}")
    await worker.plugin_add(CleanupPlugin(), name=CleanupPlugin.name, catch_errors=False)
