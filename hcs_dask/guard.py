"""The well task: :func:`run_well`, the cleanup contract in code (worker side).

For every sequential combination of a well the guard opens the task's memory-backend
scope, runs the chain (:class:`hcs_dask.chain.WellChain`), and in a ``finally`` resets
the scope and releases the GPU pools of every framework already imported, in the
task's own thread. Nothing can skip that ``finally``: not an exception whose text
cannot be made, not ``KeyboardInterrupt``/``SystemExit`` (which propagate after it).
Only then is the outcome looked at and the record written.
"""

from __future__ import annotations

import gc
import hashlib
import os
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import psutil

from hcs_dask.chain import WellChain
from hcs_dask.compile import WellPlan
from hcs_dask.memory import backend, gpu
from hcs_dask.pipeline import Pipeline
from hcs_dask.results import ExecutionResult
from hcs_dask.store import Manifest, commit_well, reset_well

__all__ = ["cancel_run", "run_well"]


# ------------------------------------------------------------------ the worker
def _worker() -> Any:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def _worker_threads(worker: Any) -> int:
    try:
        return int(worker.state.nthreads)
    except AttributeError:  # not on a worker (a direct call), or an old distributed
        return 1


class _Occupancy:
    """How many wells this process runs at once, so that a well knows whether it ran alone.

    Process-wide figures (RSS, GPU pools) belong to one well only if no other well ran
    in the process while it did.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._started = 0

    def enter(self) -> tuple[int, bool]:
        with self._lock:
            self._running += 1
            self._started += 1
            return self._started, self._running > 1

    def leave(self, ticket: int, shared: bool) -> bool:
        """Whether another well ran at any moment during this one; ends its stay."""
        with self._lock:
            self._running -= 1
            return shared or self._started != ticket


_occupancy = _Occupancy()

# Unpickled pipelines by the digest of their bytes: the wells of one run share one
# pipeline, unpickled once per process. Each run pickles its pipeline afresh
# (hcs_dask.driver), so edited code arrives as new bytes and a new entry.
_PIPELINES: OrderedDict[str, Pipeline] = OrderedDict()
_PIPELINES_LOCK = threading.Lock()
_PIPELINES_KEPT = 4


def _pipeline(pipeline: Pipeline | bytes) -> Pipeline:
    if isinstance(pipeline, Pipeline):
        return pipeline
    digest = hashlib.sha256(pipeline).hexdigest()
    with _PIPELINES_LOCK:
        cached = _PIPELINES.get(digest)
        if cached is not None:
            _PIPELINES.move_to_end(digest)
            return cached
    loaded = cloudpickle.loads(pipeline)
    with _PIPELINES_LOCK:
        _PIPELINES[digest] = loaded
        while len(_PIPELINES) > _PIPELINES_KEPT:
            _PIPELINES.popitem(last=False)
    return loaded


# Runs cancelled by their client (hcs_dask.driver): a well of one that has not started yet
# ends as ``cancelled`` instead. Set on the worker's event loop, read by task threads.
_CANCELLED_RUNS: set[str] = set()


def cancel_run(run_id: str) -> None:
    """Make every well of run ``run_id`` that starts from now on in this process end as ``cancelled``.

    Run on every worker by the driver (``client.run``) when a run is cancelled, so that wells
    queued on a worker do not start.
    """
    _CANCELLED_RUNS.add(run_id)


# --------------------------------------------------------------- failure record
def _clear_frames(error: BaseException) -> None:
    """Drop the frames of an exception chain so that no array stays alive through them."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if error.__traceback__ is not None:
            traceback.clear_frames(error.__traceback__)
            error.__traceback__ = None
        error = error.__cause__ or error.__context__  # type: ignore[assignment]


def _unmakeable(what: str, problem: BaseException) -> str:
    try:
        detail = f"{type(problem).__name__}: {problem}"
    except Exception:  # the problem's own text cannot be made either
        detail = type(problem).__name__
    return f"<{what} could not be made: {detail}>"


def _describe(error: BaseException, chain: WellChain) -> dict[str, Any]:
    """The failure fields of a result; never raises, and clears the exception's frames.

    Where a field's text cannot be made (an exception whose ``__str__`` raises), the
    field says so instead.
    """
    try:
        message = str(error)
    except Exception as problem:
        message = _unmakeable("the error message", problem)
    try:
        text = "".join(traceback.format_exception(error))
    except Exception as problem:
        try:
            frames = "".join(traceback.format_tb(error.__traceback__))
        except Exception:
            frames = ""
        text = f"Traceback (most recent call last):\n{frames}{type(error).__name__}: " \
               f"{_unmakeable('the error message', problem)}\n"
    failure = {
        "error_type": type(error).__name__,
        "error": message,
        "traceback": text,
        "step": chain.step,
        "combination": chain.combination,
    }
    try:
        _clear_frames(error)
    except Exception:  # frames of a foreign exception type; the cleanup still runs
        pass
    return failure


# ------------------------------------------------------------------ the cleanup
@dataclass
class _Cleanup:
    seconds: float = 0.0
    backend_freed: int = 0
    gpu_before: dict[str, int | None] = field(default_factory=dict)
    gpu_after: dict[str, int | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    runs: int = 0
    exclusive: bool = False

    def run(self, key: Any) -> None:
        """Reset the scope of ``key`` and release the GPU pools (timed). Never raises."""
        start = time.perf_counter()
        self.runs += 1
        try:
            if gpu.cleanup_enabled():
                self.backend_freed += backend.close_scope(key)
                for report in gpu.release_gpu_pools(exclusive=self.exclusive):
                    self.gpu_before.setdefault(report.framework, report.bytes_before)
                    self.gpu_after[report.framework] = report.bytes_after
                    if report.error:
                        self.errors.append(f"{report.framework}: {report.error}")
                # Reference cycles made by the well die here, not at the next full collection.
                gc.collect(1)
            else:  # the memory-stability benchmark's "without cleanup" run
                backend.close_scope(key, reset=False)
        except Exception as error:  # the cleanup itself must never take the well's record down
            self.errors.append(f"cleanup: {_unmakeable('the cleanup', error)}")
        finally:
            self.seconds += time.perf_counter() - start


# --------------------------------------------------------------------- the task
def run_well(plan: WellPlan, pipeline: Pipeline | bytes, attempt: int = 1, run: str | None = None) -> ExecutionResult:
    """Run one well: every sequential combination, each followed by the cleanup.

    Never raises for an error inside the well: it returns
    ``ExecutionResult(status="failed")`` with the exception type, message,
    traceback text, failing step and combination. ``KeyboardInterrupt`` and
    ``SystemExit`` propagate, after the cleanup.

    Parameters
    ----------
    plan : WellPlan
        The well.
    pipeline : Pipeline or bytes
        The pipeline, or its cloudpickle (as the driver sends it: pickled once per run).
    attempt : int
        The how-manieth run of this well that counts (runs a well did not end itself,
        such as an innocent neighbour's worker death, do not count).
    run : str, optional
        The submission's token (``"<run id>-<n>"``), written into the well's manifest
        records so that the client reads only the records of this submission. A well
        of a run cancelled by :func:`cancel_run` in this process returns
        ``status="cancelled"`` at once, without running.

    Notes
    -----
    The well's record in the store's manifest says ``running`` first (before the
    pipeline is unpickled, so before any of the well's code runs) and its outcome
    last; ``ok`` is written only after the well's arrays are flushed and listed in its
    metadata (:func:`hcs_dask.store.commit_well`). Memory figures under
    ``memory["process"]`` are the worker process's; ``memory["process"]["shared"]``
    says whether another well ran in the process meanwhile (then they are not this
    well's alone).
    """
    worker = _worker()
    if run is not None and run.rpartition("-")[0] in _CANCELLED_RUNS:
        return _cancelled_before_start(plan, attempt, run, worker)
    key = (worker.get_current_task() if worker is not None else None) or plan.key
    threads = _worker_threads(worker)
    ticket, shared = _occupancy.enter()
    process = psutil.Process()
    started = time.time()
    clock = time.perf_counter()
    rss_before = process.memory_info().rss
    process_backend_before = backend.nbytes()
    backend_before = backend.nbytes(key)
    chain = WellChain(plan, pipeline if isinstance(pipeline, Pipeline) else None)  # type: ignore[arg-type]
    # Exclusive cleaners (RMM re-initialisation, Keras sessions) reset process-wide
    # state: only where no other task thread can share the process.
    cleanup = _Cleanup(exclusive=threads == 1 and worker is not None)
    manifest = Manifest(plan.output, durable=plan.fsync) if plan.manifest else None
    identity = {"well": plan.well.name, "attempts": attempt, "started": started, "run": run,
                "worker": getattr(worker, "address", None), "pid": os.getpid(),
                "pipeline": plan.pipeline_fingerprint}
    failure: dict[str, Any] = {}
    try:
        try:
            # The record first: a worker that dies from here on died running this well
            # (hcs_dask.driver tells queued wells from started ones by it).
            if manifest is not None:
                manifest.write_well({**identity, "status": "running"})
            chain.pipeline = _pipeline(pipeline)
            well = plan.well
            reset_well(plan.output, well.row, well.column)
            for combination in plan.combinations():
                scope = backend.open_scope(key)
                try:
                    chain.run_combination(scope, combination)
                except Exception as error:
                    # Described and its frames cleared *before* the cleanup: a traceback
                    # still in flight would keep the failing step's arrays (and their GPU
                    # blocks) alive through the pool release.
                    failure = _describe(error, chain)
                    del error
                finally:
                    del scope
                    cleanup.run(key)
                if failure:
                    break
            if not failure:
                chain.step = "write"
                commit_well(plan.output, well.row, well.column, sorted(chain.fields()), durable=plan.fsync)
                chain.step = None
        except Exception as error:  # unpickling, the manifest, the well's metadata (no arrays held here)
            failure = _describe(error, chain)
            del error
    finally:
        shared = _occupancy.leave(ticket, shared)
        if backend.is_active(key):  # left open by a failure outside a combination
            cleanup.run(key)
    # Every combination's cleanup has run before anything here looks at the outcome.
    memory = {
        "backend_bytes_before": backend_before,
        "backend_bytes_after_cleanup": backend.nbytes(key),
        "backend_bytes_freed": cleanup.backend_freed,
        "cleanup_seconds": cleanup.seconds,
        "cleanups": cleanup.runs,
        "cleaner_errors": cleanup.errors,
        "conversions": chain.conversions.as_dict(),
        "process": {
            "threads": threads,
            "shared": shared,
            "rss_before_bytes": rss_before,
            "rss_after_cleanup_bytes": process.memory_info().rss,
            "backend_bytes_before": process_backend_before,
            "gpu": {
                name: {"before": cleanup.gpu_before.get(name), "after": cleanup.gpu_after.get(name)}
                for name in cleanup.gpu_after
            },
        },
    }
    result = ExecutionResult(
        status="failed" if failure else "ok",
        seconds=time.perf_counter() - clock,
        finished=time.time(),
        memory=memory,
        measurements=[] if failure else chain.measurement_rows(),
        **identity,
        **failure,
    )
    if manifest is not None:
        try:
            manifest.write_well(result.record())
        except OSError as error:  # the data may be there, but unrecorded it is not "ok"
            result.status = "failed"
            result.error_type, result.error = type(error).__name__, f"writing the manifest record: {error}"
    return result


def _cancelled_before_start(plan: WellPlan, attempt: int, run: str, worker: Any) -> ExecutionResult:
    """The record of a well whose run was cancelled before it started; nothing of it ran."""
    result = ExecutionResult(well=plan.well.name, status="cancelled", attempts=attempt, run=run, started=time.time(),
                             finished=time.time(), worker=getattr(worker, "address", None), pid=os.getpid(),
                             error="cancelled: the run was cancelled before the well started")
    if plan.manifest:
        try:
            Manifest(plan.output, durable=plan.fsync).write_well(result.record())
        except OSError as error:  # the client records it instead, from the result
            result.error += f" (not recorded in the manifest: {error})"
    return result
