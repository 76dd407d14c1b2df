"""Running wells: the guarded well task (:func:`run_well`) and the plate driver (:func:`run_plate`).

The guard is the cleanup contract in code. For every sequential combination of
a well it opens the task's memory-backend scope, runs the chain of steps, writes
the combination's arrays, and in a ``finally`` resets the scope and releases the
GPU pools of every framework already imported, in the task's own thread. Only
then is the outcome looked at: an exception becomes a ``failed`` record,
``KeyboardInterrupt``/``SystemExit`` propagate after the cleanup.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import queue
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tifffile

from hcs_dask.compile import PlateGraph, WellPlan, compile_plate
from hcs_dask.memory import backend, gpu
from hcs_dask.memory.convert import ConversionCounter, to_array_type, to_host
from hcs_dask.pipeline import REDUCED, Pipeline, Step, StepContext
from hcs_dask.plate import AXES, ImageKey, Plate
from hcs_dask.results import ExecutionResult, PlateResult
from hcs_dask.store import FieldLayout, FieldWriter, Manifest, commit_well, pyramid_levels, reset_well

logger = logging.getLogger("hcs_dask")

#: A position inside a well, in :data:`hcs_dask.plate.AXES` order: (site, channel, z, timepoint).
Coord = tuple[int, int, int, int]
_SITE, _CHANNEL, _Z, _TIMEPOINT = range(4)
_OUTPUT_AXES = (("t", _TIMEPOINT), ("c", _CHANNEL), ("z", _Z))


class StepError(RuntimeError):
    """A step returned something the pipeline cannot use (wrong shape, type, …)."""


class ImageReadError(OSError):
    """A source image that cannot be read; the message starts with its path."""


def read_image(path: str) -> np.ndarray:
    try:
        return tifffile.imread(path)
    except Exception as error:  # tifffile raises many types for a damaged file
        raise ImageReadError(f"{path}: cannot read image: {type(error).__name__}: {error}") from None


def _coord(key: ImageKey) -> Coord:
    return (key.site, key.channel, key.z, key.timepoint)


@dataclass
class _WellRun:
    """The state of one well's run: where it is (for failure records) and what it produced."""

    plan: WellPlan
    pipeline: Pipeline
    step: str | None = None
    combination: dict[str, int] | None = None
    measurements: dict[tuple, dict[str, Any]] = field(default_factory=dict)
    writers: dict[int, FieldWriter] = field(default_factory=dict)
    conversions: ConversionCounter = field(default_factory=ConversionCounter)

    # ----------------------------------------------------------------- chain
    def run_combination(self, scope: backend.Scope, combination: dict[str, int]) -> None:
        self.combination = combination
        self.step = "read"
        state: dict[Coord, str] = {}
        root = Path(self.plan.root)
        for key, relative in self.plan.well.files:
            if any(getattr(key, axis) != value for axis, value in combination.items()):
                continue
            coord = _coord(key)
            path = f"src/{coord}"
            scope.put(path, read_image(str(root / relative)))
            state[coord] = path
        prefix = "src/"
        for index, step in enumerate(self.pipeline.steps):
            self.step = step.name
            new_prefix = f"step{index}/"
            state = self._run_step(scope, step, state, new_prefix)
            # Only the previous step's output is needed: keep the peak at two steps.
            scope.delete_prefix(prefix)
            prefix = new_prefix
        self.step = "write"
        self._write(scope, state, combination)
        self.step = None

    def _run_step(self, scope: backend.Scope, step: Step, state: dict[Coord, str], prefix: str) -> dict[Coord, str]:
        stacked = [AXES.index(a) for a in step.stack]
        iterated = [i for i in range(len(AXES)) if i not in stacked]
        if step.over is not None:
            for i in iterated:
                if AXES[i] not in step.over and len({c[i] for c in state}) > 1:
                    raise StepError(
                        f"step {step.name!r} neither stacks nor iterates axis {AXES[i]!r}, which has "
                        f"{len({c[i] for c in state})} values here; add it to stack= or over="
                    )
        groups: dict[tuple[int, ...], list[Coord]] = {}
        for coord in sorted(state):
            groups.setdefault(tuple(coord[i] for i in iterated), []).append(coord)
        functions = step.functions()
        new_state: dict[Coord, str] = {}
        for members in groups.values():
            members.sort(key=lambda c: tuple(c[i] for i in stacked))
            grid = [sorted({c[i] for c in members}) for i in stacked]
            if prod(len(values) for values in grid) != len(members):
                raise StepError(
                    f"step {step.name!r}: the images to stack over {step.stack} do not form a full grid "
                    f"({len(members)} images for {[len(v) for v in grid]} values)"
                )
            first = members[0]
            channel = first[_CHANNEL]
            function = functions.get(channel if None not in functions else None)
            outputs = [f"{prefix}{c}" for c in members]
            if function is None:  # a dict of functions without one for this channel
                for coord, path in zip(members, outputs):
                    scope.put(path, scope.get(state[coord]))
                    new_state[coord] = path
                continue
            arrays = [scope.get(state[c]) for c in members]
            data = np.stack(arrays).reshape(*(len(v) for v in grid), *arrays[0].shape) if stacked else arrays[0]
            del arrays
            data = to_array_type(data, step.array_type, self.conversions)
            kwargs = dict(step.kwargs)
            if step.takes_context(None if None in functions else channel):
                kwargs["context"] = self._context(step, first, grid, stacked, scope)
            result = function(data, **kwargs)
            measures = None
            if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping):
                result, measures = result
            if not hasattr(result, "ndim") or not hasattr(result, "shape"):
                raise StepError(
                    f"step {step.name!r} returned {type(result).__name__}; expected an array "
                    "or (array, dict of measurements)"
                )
            if result.ndim == data.ndim and tuple(result.shape[: len(stacked)]) == tuple(len(v) for v in grid):
                flat = result.reshape(len(members), *result.shape[len(stacked):]) if stacked else result[None]
                if flat.ndim != 3:
                    raise StepError(f"step {step.name!r} returned images of {flat.ndim - 1} dimensions; expected 2")
                for i, (coord, path) in enumerate(zip(members, outputs)):
                    scope.put(path, flat[i])
                    new_state[coord] = path
                kept = first
            elif stacked and result.ndim == 2:
                reduced = list(first)
                for i in stacked:
                    reduced[i] = REDUCED
                kept = tuple(reduced)  # type: ignore[assignment]
                path = f"{prefix}{kept}"
                scope.put(path, result)
                new_state[kept] = path  # type: ignore[index]
            else:
                raise StepError(
                    f"step {step.name!r} was given an array of shape {tuple(data.shape)} (stacking "
                    f"{step.stack or 'nothing'}) and returned shape {tuple(result.shape)}; return the same "
                    "leading dimensions to keep the stacked axes, or a 2-D image to reduce them"
                )
            del data, result
            if measures:
                self._measure(first, stacked, measures, step)
        return new_state

    def _context(self, step: Step, first: Coord, grid: list[list[int]], stacked: list[int],
                 scope: backend.Scope) -> StepContext:
        values: dict[str, Any] = {axis: first[i] for i, axis in enumerate(AXES)}
        for axis_index, axis_values in zip(stacked, grid):
            values[AXES[axis_index]] = tuple(axis_values)
        return StepContext(well=self.plan.well.name, step=step.name, scope=scope, **values)

    def _measure(self, first: Coord, stacked: list[int], measures: Mapping[str, Any], step: Step) -> None:
        context = {
            AXES[i]: first[i]
            for i in range(len(AXES))
            if i not in stacked and first[i] != REDUCED
        }
        key = tuple(sorted(context.items()))
        row = self.measurements.setdefault(key, {"well": self.plan.well.name, **context})
        for name, value in measures.items():
            if isinstance(value, np.generic):
                value = value.item()
            if not isinstance(value, (int, float, str, bool)) and value is not None:
                raise StepError(
                    f"step {step.name!r}: measurement {name!r} is a {type(value).__name__}; "
                    "measurements must be scalars"
                )
            row[name] = value

    # ----------------------------------------------------------------- write
    def _write(self, scope: backend.Scope, state: dict[Coord, str], combination: dict[str, int]) -> None:
        plan = self.plan
        by_site: dict[int, list[Coord]] = {}
        for coord in state:
            by_site.setdefault(coord[_SITE], []).append(coord)
        for site, coords in sorted(by_site.items()):
            extents = {name: sorted({c[i] for c in coords}) for name, i in _OUTPUT_AXES}
            if prod(len(v) for v in extents.values()) != len(coords):
                raise StepError(
                    f"the pipeline's output for site {site} is not a full (t, c, z) grid: "
                    f"{len(coords)} images for {[len(v) for v in extents.values()]} values"
                )
            position = {tuple(c[i] for _, i in _OUTPUT_AXES): c for c in coords}
            grid = [extents[name] for name, _ in _OUTPUT_AXES]
            images = [scope.get(state[position[index]]) for index in itertools.product(*grid)]
            # Stacked where the images are (np.stack dispatches to CuPy for device arrays),
            # so a GPU pipeline's output comes back to the host in one copy per field.
            block = to_host(np.stack(images), self.conversions)
            del images
            block = block.reshape(*(len(v) for v in grid), *block.shape[1:])
            writer = self.writers.get(site)
            if writer is None:
                writer = self.writers[site] = FieldWriter(
                    plan.output,
                    f"{plan.well.row}/{plan.well.column}/{plan.field_index(site) if site != REDUCED else 0}",
                    self._layout(extents, block),
                )
            index_by_axis = []
            for name, i in _OUTPUT_AXES:
                axis = AXES[i]
                if axis in combination:
                    # A slice, not an int: the block keeps this axis, with length one.
                    position = plan.values(axis).index(combination[axis])
                    index_by_axis.append(slice(position, position + 1))
                else:
                    index_by_axis.append(slice(None))
            if "t" not in writer.layout.axes:
                index_by_axis = index_by_axis[1:]
                block = block[0]
            writer.write(tuple(index_by_axis), block)

    def _layout(self, extents: dict[str, list[int]], block: np.ndarray) -> FieldLayout:
        plan = self.plan
        sizes = {}
        for name, i in _OUTPUT_AXES:
            axis = AXES[i]
            sizes[name] = len(plan.values(axis)) if axis in plan.sequential else len(extents[name])
        channels = list(plan.values("channel")) if "channel" in plan.sequential else extents["c"]
        names = dict(plan.channel_names)
        channel_names = tuple(
            "projection" if c == REDUCED else names.get(c, f"w{c}") for c in channels
        )
        axes = ("t", "c", "z") if sizes["t"] > 1 else ("c", "z")
        shape = tuple(sizes[a] for a in axes) + tuple(block.shape[-2:])
        return FieldLayout(
            axes=axes + ("y", "x"),
            shape=shape,
            dtype=str(block.dtype),
            channel_names=channel_names,
            pixel_size_um=plan.pixel_size_um,
            z_step_um=plan.z_step_um if sizes["z"] > 1 else None,
            levels=pyramid_levels(block.shape[-2:]),
        )

    def fields(self) -> list[int]:
        """Indices of the fields this well has written."""
        return [int(writer.path.rsplit("/", 1)[1]) for writer in self.writers.values()]

    def measurement_rows(self) -> list[dict[str, Any]]:
        return list(self.measurements.values())


# --------------------------------------------------------------------- guard
def _current_task_key(default: Any) -> Any:
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return default
    return worker.get_current_task() or default


def _alone_in_process() -> bool:
    """True when no other task thread can share this process (a single-threaded worker).

    Only then may process-wide resets (RMM re-initialisation, Keras sessions) run.
    """
    try:
        from distributed import get_worker

        return get_worker().state.nthreads == 1
    except (ImportError, ValueError, AttributeError):
        return False


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def _clear_frames(error: BaseException) -> None:
    """Drop the frames of an exception chain so that no array stays alive through it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if error.__traceback__ is not None:
            traceback.clear_frames(error.__traceback__)
            error.__traceback__ = None
        error = error.__cause__ or error.__context__  # type: ignore[assignment]


def _describe(error: Exception, run: _WellRun) -> dict[str, Any]:
    """The failure fields of a result; clears the exception's frames."""
    failure = {
        "error_type": type(error).__name__,
        "error": str(error),
        "traceback": "".join(traceback.format_exception(error)),
        "step": run.step,
        "combination": run.combination,
    }
    _clear_frames(error)
    return failure


@dataclass
class _Cleanup:
    seconds: float = 0.0
    backend_freed: int = 0
    gpu_before: dict[str, int] = field(default_factory=dict)
    gpu_after: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    runs: int = 0
    exclusive: bool = False

    def run(self, key: Any) -> None:
        """Reset the scope of ``key`` and release the GPU pools (timed). Never raises."""
        start = time.perf_counter()
        self.runs += 1
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
        self.seconds += time.perf_counter() - start


def run_well(plan: WellPlan, pipeline: Pipeline, attempt: int = 1) -> ExecutionResult:
    """Run one well: every sequential combination, each followed by the cleanup.

    Never raises for an error inside the well: it returns
    ``ExecutionResult(status="failed")`` with the exception type, message,
    traceback text, failing step and combination. ``KeyboardInterrupt`` and
    ``SystemExit`` propagate, after the cleanup.

    The well's record in the store's manifest says ``running`` first and its
    outcome last; ``ok`` is written only after the well's arrays are flushed and
    listed in its metadata (:func:`hcs_dask.store.commit_well`).
    """
    key = _current_task_key(plan.key)
    process = psutil.Process()
    started = time.time()
    clock = time.perf_counter()
    rss_before = process.memory_info().rss
    backend_before = backend.nbytes()
    run = _WellRun(plan, pipeline)
    cleanup = _Cleanup(exclusive=_alone_in_process())
    manifest = Manifest(plan.output) if plan.manifest else None
    identity = {"well": plan.well.name, "attempts": attempt, "started": started,
                "worker": _worker_address(), "pid": os.getpid()}
    failure: dict[str, Any] = {}
    try:
        if manifest is not None:
            manifest.write_well({**identity, "status": "running"})
        well = plan.well
        reset_well(plan.output, well.row, well.column)
        for combination in plan.combinations():
            scope = backend.open_scope(key)
            try:
                run.run_combination(scope, combination)
            except Exception as error:
                # Described and its frames cleared *before* the cleanup: a traceback
                # still in flight would keep the failing step's arrays (and their GPU
                # blocks) alive through the pool release.
                failure = _describe(error, run)
                del error
            except BaseException:  # KeyboardInterrupt, SystemExit: clean, then propagate
                del scope
                cleanup.run(key)
                raise
            del scope
            cleanup.run(key)
            if failure:
                break
        if not failure:
            run.step = "write"
            commit_well(plan.output, well.row, well.column, sorted(run.fields()))
            run.step = None
    except Exception as error:  # the manifest or the well's metadata (no arrays held here)
        failure = _describe(error, run)
        del error
    # Every combination's cleanup has run before anything here looks at the outcome.
    memory = {
        "rss_before_bytes": rss_before,
        "rss_after_cleanup_bytes": process.memory_info().rss,
        "backend_bytes_before": backend_before,
        "backend_bytes_after_cleanup": backend.nbytes(key),
        "backend_bytes_freed": cleanup.backend_freed,
        "gpu": {
            name: {"before": cleanup.gpu_before.get(name, 0), "after": cleanup.gpu_after.get(name, 0)}
            for name in cleanup.gpu_after
        },
        "cleanup_seconds": cleanup.seconds,
        "cleanups": cleanup.runs,
        "cleaner_errors": cleanup.errors,
        "conversions": run.conversions.as_dict(),
    }
    result = ExecutionResult(
        status="failed" if failure else "ok",
        seconds=time.perf_counter() - clock,
        finished=time.time(),
        memory=memory,
        measurements=[] if failure else run.measurement_rows(),
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


# --------------------------------------------------------------------- plate
def run_plate(
    plate: Plate,
    pipeline: Pipeline,
    output: str | Path,
    *,
    client: Any = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | float | None = "auto",
    cluster: str = "local",
    cluster_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    well_timeout: float | None = None,
    worker_death_retries: int = 1,
    failure_retries: int = 0,
    stall_timeout: float = 300.0,
    progress: bool | None = None,
    manifest: bool = True,
) -> PlateResult:
    """Run ``pipeline`` on every well of ``plate`` and write an OME-Zarr plate to ``output``.

    Parameters
    ----------
    plate, pipeline
        What to run (see :func:`hcs_dask.open_plate`, :class:`hcs_dask.Pipeline`).
    output
        The ``.ome.zarr`` plate to create; the measurement table goes next to it.
    client, scheduler
        An existing ``distributed.Client``, or a scheduler address / scheduler file. With
        neither, an embedded ``LocalCluster(processes=True)`` is started and closed afterwards.
    n_workers, threads_per_worker, memory_limit
        The embedded cluster's size (default: one single-threaded worker per core) and the
        per-worker memory limit, past which the nanny restarts the worker (its well then
        ends as ``worker_died`` with cause ``memory``).
    cluster, cluster_options
        The embedded cluster's kind: ``"local"`` (``LocalCluster``) or ``"cuda"``
        (``dask_cuda.LocalCUDACluster``, one worker per GPU), with options passed to
        :func:`hcs_dask.cluster.connect` (e.g. RMM pool settings).
    overwrite
        Replace an existing output.
    resume
        Re-run only the wells of an earlier run into ``output`` whose status is not ``ok``.
    well_timeout
        Seconds a well may run; past it the well is ``timeout`` and its worker is restarted.
    worker_death_retries
        How often a well whose worker died is tried again (default 1).
    failure_retries
        How often a well that raised is tried again (default 0: exceptions are deterministic).
    stall_timeout
        Seconds without any well finishing after which the run logs which wells are
        running where.
    progress
        Show a progress bar (default: when standard error is a terminal or in Jupyter).
    manifest
        Keep the per-well manifest in the store (needed for ``resume``).

    Returns
    -------
    PlateResult
        One :class:`ExecutionResult` per well, and the measurements DataFrame.
    """
    from hcs_dask.cluster import check_cluster, connect

    # A cluster that cannot start (--cluster cuda without dask-cuda or a GPU, contradicting
    # RMM options) fails here, before compile_plate writes the output's layout.
    check_cluster(cluster, client=client, scheduler=scheduler, n_workers=n_workers,
                  threads_per_worker=threads_per_worker, **(cluster_options or {}))
    if pipeline.uses_gpu():  # likewise a GPU pipeline on a cluster without GPUs
        if client is not None:
            _require_gpu_workers(client, pipeline)
        elif scheduler is None and cluster == "local" and "resources" not in (cluster_options or {}):
            raise _no_gpu_error(pipeline)
    graph = compile_plate(plate, pipeline, output, overwrite=overwrite, resume=resume, manifest=manifest)

    with connect(client=client, scheduler=scheduler, n_workers=n_workers, threads_per_worker=threads_per_worker,
                 memory_limit=memory_limit, cluster=cluster, **(cluster_options or {})) as active:
        return execute_graph(graph, active, progress=progress, well_timeout=well_timeout,
                             worker_death_retries=worker_death_retries, failure_retries=failure_retries,
                             stall_timeout=stall_timeout)


def execute_graph(
    graph: PlateGraph,
    client: Any,
    *,
    progress: bool | None = None,
    well_timeout: float | None = None,
    worker_death_retries: int = 1,
    failure_retries: int = 0,
    stall_timeout: float = 300.0,
) -> PlateResult:
    """Submit one task per well of a compiled plate, gather the results, write the table."""
    driver = _PlateDriver(graph, client, well_timeout=well_timeout, worker_death_retries=worker_death_retries,
                          failure_retries=failure_retries, stall_timeout=stall_timeout)
    return driver.run(progress)


@dataclass
class _InFlight:
    plan: WellPlan
    attempt: int
    future: Any
    started: float | None = None  # wall clock, from the well's manifest record


class _PlateDriver:
    """The client side of a run: submit wells, turn every outcome into a record, retry deaths.

    Outcomes arrive through future callbacks on a queue, so the loop sleeps until
    something happens or a deadline (well timeout, stall report) is due.
    """

    POLL_SECONDS = 1.0

    def __init__(self, graph: PlateGraph, client: Any, *, well_timeout: float | None,
                 worker_death_retries: int, failure_retries: int, stall_timeout: float) -> None:
        self.graph = graph
        self.client = client
        self.well_timeout = well_timeout
        self.worker_death_retries = worker_death_retries
        self.failure_retries = failure_retries
        self.stall_timeout = stall_timeout
        self.manifest = Manifest(graph.output) if graph.plans and graph.plans[0].manifest else None
        self.results: dict[str, ExecutionResult] = {
            record["well"]: ExecutionResult.from_record(record) for record in graph.done
        }
        self.inflight: dict[Any, _InFlight] = {}
        self.submissions = 0
        self.submitted: set[tuple] = set()
        self.recycled: set[str] = set()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        # Wells of a pipeline with GPU steps run only where a GPU is (workers started with
        # resources={"GPU": n}, as --cluster cuda does).
        self.resources = {"GPU": 1} if graph.pipeline.uses_gpu() else None

    # ---------------------------------------------------------- submission
    def _submit(self, plan: WellPlan, attempt: int) -> None:
        # The first submission of a well has the documented key; every resubmission a
        # fresh one, since the scheduler may not have forgotten the erred task yet.
        self.submissions += 1
        key = plan.key if plan.key not in self.submitted else (*plan.key, self.submissions)
        self.submitted.add(plan.key)
        # The pipeline rides in every task (its pickle is made once and cached): a shared
        # pipeline task would be lost with the worker holding it and must be recomputed
        # before any well can run again.
        future = self.client.submit(run_well, plan, self.graph.pipeline, attempt, key=key, pure=False,
                                    resources=self.resources)
        self.inflight[future.key] = _InFlight(plan, attempt, future)
        future.add_done_callback(self.done.put)

    def run(self, progress: bool | None) -> PlateResult:
        from tqdm.auto import tqdm

        from hcs_dask.plugin import CleanupPlugin

        graph = self.graph
        start = time.perf_counter()
        if self.resources:
            _require_gpu_workers(self.client, graph.pipeline)
        self.client.register_plugin(CleanupPlugin())
        for plan in graph.plans:
            self._submit(plan, 1)
        bar = tqdm(total=len(graph.plans), unit="well", desc=graph.plate.name,
                   disable=None if progress is None else not progress)
        last_progress = last_check = time.monotonic()
        try:
            while self.inflight:
                try:
                    future = self.done.get(timeout=self.POLL_SECONDS)
                except queue.Empty:
                    future = None
                now = time.monotonic()
                if future is not None:
                    finished = self._handle(future)
                    if finished is not None:
                        last_progress = now
                        bar.update(1)
                        if not finished.ok:
                            bar.write(f"well {finished.well}: {finished.status}: "
                                      f"{finished.error_type or finished.cause}: {finished.error}")
                if self.well_timeout is not None and now - last_check >= self.POLL_SECONDS:
                    last_check = now
                    for timed_out in self._check_timeouts():
                        last_progress = now
                        bar.update(1)
                        bar.write(f"well {timed_out.well}: timeout: {timed_out.error}")
                if now - last_progress > self.stall_timeout:
                    self._report_stall(now - last_progress)
                    last_progress = now
        except BaseException:
            # Ctrl-C or a broken client: what is still running is cancelled, and the
            # manifest keeps saying "running" for it, so that --resume redoes it.
            self.client.cancel([f.future for f in self.inflight.values()], force=True)
            raise
        finally:
            bar.close()
        order = [plan.well.name for plan in graph.plans] + [record["well"] for record in graph.done]
        ordered = [self.results[name] for name in sorted(order, key=_well_order)]
        result = PlateResult(plate=graph.plate.name, output=graph.output, wells=ordered,
                             seconds=time.perf_counter() - start)
        table = result.measurements
        if len(table.columns) > 1:
            table.to_csv(graph.measurements_path, index=False)
            result.measurements_path = str(graph.measurements_path)
        return result

    # ------------------------------------------------------------ outcomes
    def _handle(self, future: Any) -> ExecutionResult | None:
        """Turn a finished future into a final result, or resubmit it; None if not final."""
        entry = self.inflight.pop(future.key, None)
        if entry is None:  # cancelled by a timeout: already recorded
            return None
        plan, attempt = entry.plan, entry.attempt
        if future.status == "finished":
            result = self._result_of(future, entry)
            if not result.ok and attempt <= self.failure_retries:
                self._submit(plan, attempt + 1)
                return None
            return self._finish(result, write=False)
        if future.status == "cancelled":
            return self._finish(ExecutionResult(
                well=plan.well.name, status="cancelled", attempts=attempt,
                error="the task was cancelled outside hcs_dask (scheduler restart or client.cancel)"))
        error = future.exception()
        from distributed.scheduler import KilledWorker

        if isinstance(error, KilledWorker):
            worker = error.last_worker
            if worker.address in self.recycled:  # our own timeout restart: not this well's fault
                self._submit(plan, attempt)
                return None
            cause = self._death_cause(worker)
            if attempt <= self.worker_death_retries:
                logger.warning("well %s: worker %s died (%s); trying again (attempt %d)",
                               plan.well.name, worker.address, cause, attempt + 1)
                self._submit(plan, attempt + 1)
                return None
            return self._finish(ExecutionResult(
                well=plan.well.name, status="worker_died", attempts=attempt, worker=worker.address,
                pid=worker.pid, cause=cause, error_type="KilledWorker",
                error=f"worker {worker.address} (pid {worker.pid}) died while running the well: {cause}"))
        return self._finish(ExecutionResult(
            well=plan.well.name, status="failed", attempts=attempt,
            error_type=type(error).__name__, error=str(error)))

    def _result_of(self, future: Any, entry: _InFlight) -> ExecutionResult:
        """The well's result, read from its manifest record where there is one.

        The record was written by the task before it returned, so reading it needs no
        transfer from the worker, and it is there even if that worker died since.
        """
        if self.manifest is not None:
            record = self.manifest.read_well(entry.plan.well.name)
            if record and record.get("attempts") == entry.attempt and record.get("status") != "running":
                future.release()
                return ExecutionResult.from_record(record)
        return future.result()

    def _finish(self, result: ExecutionResult, *, write: bool = True) -> ExecutionResult:
        self.results[result.well] = result
        if write and self.manifest is not None:
            earlier = self.manifest.read_well(result.well) or {}
            result.started = result.started or earlier.get("started")
            result.finished = time.time()
            self.manifest.write_well(result.record())
        return result

    def _death_cause(self, worker: Any) -> str:
        """Why a worker died, from the nanny's memory-kill events and its log of the exit."""
        deadline = time.monotonic() + 3.0
        while True:
            for _, event in self.client.get_events("worker-restart-memory"):
                if event.get("pid") == worker.pid or event.get("worker") == worker.address:
                    limit = worker.memory_limit or 0
                    return (f"memory: the nanny restarted the worker at {event.get('rss', 0) / 2**20:.0f} MiB "
                            f"RSS (limit {limit / 2**20:.0f} MiB)")
            try:
                logs = self.client.get_worker_logs(nanny=True)
            except Exception:  # a nanny that is itself gone: no log to read
                logs = {}
            for lines in logs.values():
                for _, message in lines:
                    if f"Worker process {worker.pid} " in message:
                        return _signal_text(message.split(f"Worker process {worker.pid} ", 1)[1])
            if time.monotonic() > deadline:
                return "worker process died (no exit status known: no nanny, or it did not say)"
            time.sleep(0.2)

    # ------------------------------------------------------------ deadlines
    def _running(self) -> dict[Any, str]:
        """Keys being processed, by worker address (with one thread per worker: running)."""
        running = {}
        for address, keys in self.client.processing().items():
            for key in keys:
                running[tuple(key) if isinstance(key, list) else key] = address
        return running

    def _check_timeouts(self) -> list[ExecutionResult]:
        """End the wells running past ``well_timeout``; restart their workers."""
        now = time.time()
        ended = []
        for key, address in self._running().items():
            entry = self.inflight.get(key)
            if entry is None:
                continue
            if entry.started is None and self.manifest is not None:
                record = self.manifest.read_well(entry.plan.well.name) or {}
                if record.get("status") == "running" and record.get("attempts") == entry.attempt:
                    entry.started = record.get("started")
            if entry.started is None or now - entry.started <= self.well_timeout:
                continue
            del self.inflight[key]
            entry.future.cancel(force=True)
            logger.warning("well %s: no result after %.0f s; restarting worker %s",
                           entry.plan.well.name, self.well_timeout, address)
            self.recycled.add(address)
            ended.append(self._finish(ExecutionResult(
                well=entry.plan.well.name, status="timeout", attempts=entry.attempt, worker=address,
                started=entry.started, cause=f"ran longer than well_timeout={self.well_timeout:g} s",
                error=f"no result after {self.well_timeout:g} s; worker {address} was restarted")))
            try:
                # The hung thread cannot be stopped from outside: end its process, which the
                # nanny replaces at once. (A graceful restart would wait for the hung thread.)
                self.client.run(_end_worker_process, workers=[address], wait=False)
            except Exception as error:  # the worker may already be gone
                logger.warning("ending worker %s failed: %s", address, error)
        return ended

    def _report_stall(self, seconds: float) -> None:
        running = self._running()
        where = ", ".join(
            f"{entry.plan.well.name} on {running.get(key, 'no worker (queued)')}"
            for key, entry in sorted(self.inflight.items(), key=lambda item: item[1].plan.well.name)[:20]
        )
        logger.warning("no well has finished for %.0f s; %d in flight: %s", seconds, len(self.inflight), where)


def _require_gpu_workers(client: Any, pipeline: Pipeline) -> None:
    """Fail at once, not hang in ``no-worker``, when a GPU pipeline meets a cluster without GPUs."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if not any(worker.get("resources", {}).get("GPU") for worker in workers):
        raise _no_gpu_error(pipeline)


def _no_gpu_error(pipeline: Pipeline) -> Exception:
    from hcs_dask.cluster import ClusterError

    steps = ", ".join(s.name for s in pipeline.steps if s.array_type != "numpy")
    return ClusterError(
        f"pipeline {pipeline.name!r} has GPU steps ({steps}) but no worker of this cluster offers "
        "resources={'GPU': ...}; run with --cluster cuda (run_plate(cluster='cuda')), or start "
        "dask-cuda workers with --resources GPU=1"
    )


#: Exit status of a worker process ended by hcs_dask after a well timeout.
TIMEOUT_EXIT_STATUS = 75


async def _end_worker_process() -> None:
    # A coroutine, because only those may be run without waiting for an answer
    # (there will be none: the process ends here).
    os._exit(TIMEOUT_EXIT_STATUS)


def _signal_text(tail: str) -> str:
    """``"was killed by signal 9"`` → ``"signal 9 (SIGKILL)"``; ``"exited with status 1"`` → ``"exit status 1"``."""
    import signal

    words = tail.split()
    if "signal" in words and words[-1].isdigit():
        number = int(words[-1])
        try:
            return f"killed by signal {number} ({signal.Signals(number).name})"
        except ValueError:
            return f"killed by signal {number}"
    if "status" in words and words[-1].lstrip("-").isdigit():
        return f"process exited with status {words[-1]}"
    return tail


def _well_order(name: str) -> tuple[int, int]:
    from hcs_dask.plate import row_index, split_well_name

    row, column = split_well_name(name)
    return row_index(row), column
