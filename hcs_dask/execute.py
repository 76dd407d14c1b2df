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
import logging
import os
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
from hcs_dask.store import FieldLayout, FieldWriter, pyramid_levels

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
                kwargs["context"] = self._context(step, first, grid, stacked)
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

    def _context(self, step: Step, first: Coord, grid: list[list[int]], stacked: list[int]) -> StepContext:
        values: dict[str, Any] = {axis: first[i] for i, axis in enumerate(AXES)}
        for axis_index, axis_values in zip(stacked, grid):
            values[AXES[axis_index]] = tuple(axis_values)
        return StepContext(well=self.plan.well.name, step=step.name, **values)

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
            sample = to_host(scope.get(state[coords[0]]), self.conversions)
            block = np.empty([len(v) for v in extents.values()] + list(sample.shape), dtype=sample.dtype)
            for coord in coords:
                index = tuple(extents[name].index(coord[i]) for name, i in _OUTPUT_AXES)
                block[index] = to_host(scope.get(state[coord]), self.conversions)
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
                    index_by_axis.append(plan.values(axis).index(combination[axis]))
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


@dataclass
class _Cleanup:
    seconds: float = 0.0
    backend_freed: int = 0
    gpu_before: dict[str, int] = field(default_factory=dict)
    gpu_after: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    runs: int = 0

    def run(self, key: Any) -> None:
        """Reset the scope of ``key`` and release the GPU pools (timed). Never raises."""
        start = time.perf_counter()
        self.runs += 1
        if gpu.cleanup_enabled():
            self.backend_freed += backend.close_scope(key)
            for report in gpu.release_gpu_pools():
                self.gpu_before.setdefault(report.framework, report.bytes_before)
                self.gpu_after[report.framework] = report.bytes_after
                if report.error:
                    self.errors.append(f"{report.framework}: {report.error}")
            # Reference cycles made by the well die here, not at the next full collection.
            gc.collect(1)
        else:  # the memory-stability benchmark's "without cleanup" run
            backend.close_scope(key, reset=False)
        self.seconds += time.perf_counter() - start


def run_well(plan: WellPlan, pipeline: Pipeline) -> ExecutionResult:
    """Run one well: every sequential combination, each followed by the cleanup.

    Never raises for an error inside the well: it returns
    ``ExecutionResult(status="failed")`` with the exception type, message,
    traceback text, failing step and combination. ``KeyboardInterrupt`` and
    ``SystemExit`` propagate, after the cleanup.
    """
    key = _current_task_key(plan.key)
    process = psutil.Process()
    started = time.time()
    clock = time.perf_counter()
    rss_before = process.memory_info().rss
    backend_before = backend.nbytes()
    run = _WellRun(plan, pipeline)
    cleanup = _Cleanup()
    failure: dict[str, Any] = {}
    try:
        for combination in plan.combinations():
            scope = backend.open_scope(key)
            try:
                run.run_combination(scope, combination)
            finally:
                del scope
                cleanup.run(key)
    except Exception as error:
        failure = {
            "error_type": type(error).__name__,
            "error": str(error),
            "traceback": "".join(traceback.format_exception(error)),
            "step": run.step,
            "combination": run.combination,
        }
        _clear_frames(error)
        del error
    # The cleanup has run (in the ``finally`` above) before anything here looks at the outcome.
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
    finished = time.time()
    return ExecutionResult(
        well=plan.well.name,
        status="failed" if failure else "ok",
        seconds=time.perf_counter() - clock,
        started=started,
        finished=finished,
        worker=_worker_address(),
        pid=os.getpid(),
        memory=memory,
        measurements=[] if failure else run.measurement_rows(),
        **failure,
    )


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
    overwrite: bool = False,
    progress: bool | None = None,
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
        The embedded cluster's size (default: one single-threaded worker per core).
    overwrite
        Replace an existing output.
    progress
        Show a progress bar (default: when standard error is a terminal or in Jupyter).

    Returns
    -------
    PlateResult
        One :class:`ExecutionResult` per well, and the measurements DataFrame.
    """
    graph = compile_plate(plate, pipeline, output, overwrite=overwrite)
    from hcs_dask.cluster import connect

    with connect(client=client, scheduler=scheduler, n_workers=n_workers,
                 threads_per_worker=threads_per_worker, memory_limit=memory_limit) as active:
        return execute_graph(graph, active, progress=progress)


def _identity(value: Any) -> Any:
    return value


def execute_graph(graph: PlateGraph, client: Any, *, progress: bool | None = None) -> PlateResult:
    """Submit one task per well of a compiled plate, gather the results, write the table."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    from hcs_dask.plugin import CleanupPlugin

    start = time.perf_counter()
    client.register_plugin(CleanupPlugin())
    # The pipeline travels once, as its own (recomputable) task that every well depends on.
    pipeline_future = client.submit(
        _identity, graph.pipeline, key=f"hcs-pipeline-{graph.plate.name}-{graph.pipeline.fingerprint()}", pure=False
    )
    futures = client.map(
        run_well, list(graph.plans), pipeline=pipeline_future, key=[plan.key for plan in graph.plans], pure=False
    )
    plan_of = {future.key: plan for future, plan in zip(futures, graph.plans)}
    results: dict[str, ExecutionResult] = {}
    bar = tqdm(total=len(futures), unit="well", desc=graph.plate.name, disable=None if progress is None else not progress)
    try:
        for future in as_completed(futures):
            plan = plan_of[future.key]
            if future.status == "finished":
                result = future.result()
            else:
                error = future.exception()
                result = ExecutionResult(
                    well=plan.well.name,
                    status="failed",
                    error_type=type(error).__name__,
                    error=str(error),
                )
            results[plan.well.name] = result
            future.release()
            bar.update(1)
            if not result.ok:
                bar.write(f"well {result.well}: {result.status}: {result.error_type}: {result.error}")
    finally:
        bar.close()
        pipeline_future.release()
    ordered = [results[plan.well.name] for plan in graph.plans]
    plate_result = PlateResult(
        plate=graph.plate.name, output=graph.output, wells=ordered, seconds=time.perf_counter() - start
    )
    table = plate_result.measurements
    if len(table.columns) > 1:
        table.to_csv(graph.measurements_path, index=False)
        plate_result.measurements_path = str(graph.measurements_path)
    return plate_result
