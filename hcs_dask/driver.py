"""The client side of a run: :func:`submit_plate` returns a :class:`PlateRun` you can hold.

A driver thread hands wells to workers itself, one per free slot (a thread, or a
``GPU`` resource for GPU pipelines), each task restricted to the worker it was given
to. So the driver knows exactly which wells run where, and nothing waits queued on
a worker: when a worker dies, only the wells it was running are touched, whatever
the cluster's ``allowed-failures``, threads per worker or resources.

* One well on the dead worker: that well killed it. The run counts an attempt and
  tries it again (``worker_death_retries``), alone on a worker.
* Several wells: each is a suspect and runs again *alone* on a worker with nothing
  else of the run on it, with no attempt counted. The one that dies alone is the
  culprit; the others end as they would have.
* Wells on a worker that the run itself ended (a timeout) run again, uncounted.

With the manifest on, each worker also holds one well queued behind its running ones,
so that it starts the next well without waiting for a round trip through this client.
A queued well is not charged for a death: the well's own ``running`` record, written
before any of its code runs, tells the wells that had started from those that had not.

A well past ``well_timeout`` is ended from outside its process, by its nanny
(``SIGKILL`` to the worker process) or, without a nanny, by this machine's
operating system where the worker runs here; the start time is the current
submission's, never an earlier run's record.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable

import cloudpickle

from hcs_dask import live
from hcs_dask.cluster import ClusterError, check_cluster, connect
from hcs_dask.compile import PlateGraph, WellPlan, compile_plate, prepare_output
from hcs_dask.guard import cancel_run, run_well
from hcs_dask.options import ClusterSpec, RunPolicy, split_options
from hcs_dask.pipeline import Pipeline, load_pipeline
from hcs_dask.plate import Plate, row_index, split_well_name
from hcs_dask.results import ExecutionResult, PlateResult
from hcs_dask.store import Manifest

__all__ = ["PlateRun", "run_plate", "submit_graph", "submit_plate"]

logger = logging.getLogger("hcs_dask")

#: Seconds the running wells get to finish when a run is cancelled, before their
#: worker processes are ended.
CANCEL_GRACE_SECONDS = 10.0
#: The same after an interrupt of :func:`run_plate` (Ctrl-C, a notebook's stop button).
INTERRUPT_GRACE_SECONDS = 3.0


# ------------------------------------------------------------------ the handle
class PlateRun:
    """A plate run in progress: ask it how it goes, wait for it, or stop it.

    Made by :func:`submit_plate`; the wells run in the background.

    Examples
    --------
    >>> run = submit_plate("my_plate", "nuclei_count", "out.ome.zarr")  # doctest: +SKIP
    >>> run.status()  # doctest: +SKIP
    {'queued': 80, 'running': 2, 'ok': 14}
    >>> result = run.result()  # doctest: +SKIP
    """

    def __init__(self, driver: _Driver) -> None:
        self._driver = driver

    @property
    def plate(self) -> str:
        return self._driver.graph.plate.name

    @property
    def output(self) -> str:
        return self._driver.graph.output

    @property
    def dashboard_link(self) -> str | None:
        """The Dask dashboard of the cluster the plate runs on."""
        return getattr(self._driver.client, "dashboard_link", None)

    @property
    def done(self) -> bool:
        """Whether every well has ended (or the run was cancelled or broke)."""
        return self._driver.finished.is_set()

    def status(self) -> dict[str, int]:
        """Per-status counts now: ``queued``, ``running`` and the final statuses so far."""
        return self._driver.counts()

    def progress(self) -> Any:
        """A progress bar of finished wells: a widget in Jupyter, a text bar elsewhere."""
        return self._driver.add_bar()

    def plate_map(self) -> Any:
        """A plate map of well status: in Jupyter a widget redrawn as wells end (the kernel
        stays free); elsewhere the map now, as a matplotlib Figure."""
        return live.plate_map(self._driver)

    def wait(self, timeout: float | None = None) -> PlateResult:
        """Wait until every well has ended and return the :class:`PlateResult`.

        Raises
        ------
        TimeoutError
            If the run has not ended after ``timeout`` seconds (it keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        # Short waits, so that KeyboardInterrupt reaches the calling thread at once.
        while not self._driver.finished.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"plate {self.plate}: not finished after {timeout:g} s ({self.status()})")
        if self._driver.error is not None:
            raise self._driver.error
        assert self._driver.result is not None
        return self._driver.result

    def result(self) -> PlateResult:
        """The :class:`PlateResult`, once every well has ended (waits)."""
        return self.wait()

    def cancel(self, grace: float = CANCEL_GRACE_SECONDS) -> None:
        """Stop the run: no new wells start; running wells get ``grace`` seconds to finish.

        Wells still running after that are stopped (their worker processes are ended),
        and every well that did not end is recorded ``cancelled`` in the manifest, so
        that ``resume=True`` (``--resume``) completes the plate. Returns once the run has
        stopped.
        """
        if not self.done:
            self._driver.events.put(("cancel", max(0.0, float(grace))))
            self._driver.finished.wait()

    def __repr__(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.status().items())
        state = "done" if self.done else "running"
        return f"PlateRun({self.plate!r}, {state}: {counts}, output={self.output!r})"

    def _repr_html_(self) -> str:
        """Counts, a progress bar, the dashboard link, failures so far and a plate grid, as of now."""
        return live.run_html(self._driver)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        # In Jupyter the same summary as a widget that follows the run; the HTML stays for
        # front ends without widgets.
        view = None if self.done else live.live_summary(self._driver)
        bundle = dict(view._repr_mimebundle_()) if view is not None else {}
        return bundle | {"text/plain": repr(self), "text/html": self._repr_html_()}


# ------------------------------------------------------------------ entry points
def submit_plate(
    plate: Plate | str | os.PathLike[str],
    pipeline: Pipeline | str | os.PathLike[str],
    output: str | os.PathLike[str],
    client: Any = None,
    *,
    progress: bool = False,
    **options: Any,
) -> PlateRun:
    """Start ``pipeline`` on every well of ``plate``, writing an OME-Zarr plate to ``output``.

    Returns as soon as the wells are handed to the cluster. Everything that can be
    checked before a pixel is read (the plate, the pipeline, the options, the output
    path, the cluster) is checked first; then nothing has been written if it fails.
    An embedded cluster starts on a thread of its own while the plate is scanned, compiled
    and its layout written (hidden until the cluster is up) here, and is closed again when
    they fail.

    Parameters
    ----------
    plate : Plate or path
        An opened plate, or a plate folder (opened with :func:`hcs_dask.open_plate`).
    pipeline : Pipeline, bundled graph name or pipeline file
        What to run (:func:`hcs_dask.load_pipeline` for a name or a path).
    output : path
        The ``.ome.zarr`` plate to create; the measurement table goes next to it.
    client : distributed.Client, optional
        Run on this client's cluster. Without it (and without ``scheduler=``) an
        embedded cluster is started, and closed when the run ends.
    progress : bool
        Show a progress bar from the start (``PlateRun.progress()`` adds one later).
    **options
        The fields of :class:`hcs_dask.options.ClusterSpec` (``scheduler``,
        ``n_workers``, ``threads_per_worker``, ``memory_limit``, ``cluster``,
        ``cluster_options``) and of :class:`hcs_dask.options.RunPolicy`
        (``well_timeout``, ``worker_death_retries``, ``failure_retries``,
        ``stall_timeout``, ``manifest``, ``fsync``, ``overwrite``, ``resume``, ``resources``,
        ``max_failures``, ``skip_incomplete``, ``accept_changed_pipeline``, ``table_format``).

    Returns
    -------
    PlateRun

    Raises
    ------
    OptionError, PlateError, PipelineError, CompileError, OutputError, ClusterError
        Before anything is written, naming the option, file, step or path at fault.
    """
    spec, policy = split_options({"client": client, **options})
    if not isinstance(pipeline, Pipeline):
        pipeline = load_pipeline(pipeline)
    check_cluster(spec.cluster, client=spec.client, scheduler=spec.scheduler, n_workers=spec.n_workers,
                  threads_per_worker=spec.threads_per_worker, **spec.cluster_options)
    if pipeline.uses_gpu() and spec.embedded and spec.cluster == "local" \
            and "resources" not in spec.cluster_options:
        raise _no_gpu_error(pipeline)
    if not isinstance(plate, Plate) and not os.path.exists(plate):
        from hcs_dask.formats import open_plate

        open_plate(plate)  # its PlateError names the path, before any cluster starts
    owned = ExitStack()
    # The cluster starts while this thread scans the plate, compiles it and writes its layout
    # out of sight; a plate that cannot run closes the cluster again, and the layout appears
    # only once the cluster is up.
    starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hcs-dask-cluster-start")
    starting = starter.submit(lambda: owned.enter_context(connect(
        client=spec.client, scheduler=spec.scheduler, n_workers=spec.n_workers,
        threads_per_worker=spec.threads_per_worker, memory_limit=spec.memory_limit,
        cluster=spec.cluster, **spec.cluster_options)))
    starter.shutdown(wait=False)  # its one thread ends once the cluster has started
    try:
        if not isinstance(plate, Plate):
            from hcs_dask.formats import open_plate

            plate = open_plate(plate)
        graph = compile_plate(plate, pipeline, output, overwrite=policy.overwrite, resume=policy.resume,
                              write_layout=False, manifest=policy.manifest, fsync=policy.fsync,
                              skip_incomplete=policy.skip_incomplete,
                              accept_changed_pipeline=policy.accept_changed_pipeline)
        # Pickled afresh for every submission: the workers run the code as it is now.
        blob = cloudpickle.dumps(pipeline)
        # Flushed in a hidden sibling folder: a cluster that cannot be reached leaves nothing behind.
        layout = None if policy.resume else prepare_output(graph, overwrite=policy.overwrite)
    except BaseException:
        wait_for([starting])
        owned.close()
        raise
    try:
        active = starting.result()
        if spec.embedded and spec.cluster in ("local", "cuda"):
            # Started here, from this environment, on this machine: only the GPU can be missing.
            if pipeline.uses_gpu():
                _require_gpu_workers(active, pipeline)
        else:  # a cluster started elsewhere, or batch jobs: check it before the first well
            from hcs_dask.preflight import check_cluster_ready

            facts = check_cluster_ready(active, pipeline=pipeline, output=graph.output)
            logger.info("plate %s: %s", plate.name, facts.assumes())
        if layout is not None:
            # An overwritten store is removed while the wells run; the run ends after it is gone.
            layout.publish(background=True)
            owned.callback(layout.wait)
        driver = _Driver(graph, active, policy, blob, owned)
    except BaseException:
        if layout is not None:
            layout.discard()  # nothing, once published
        owned.close()
        raise
    if progress:
        driver.add_bar()
    driver.start()
    return PlateRun(driver)


def submit_graph(graph: PlateGraph, client: Any, policy: RunPolicy | None = None, *,
                 progress: bool = False) -> PlateRun:
    """Start the wells of an already compiled plate (:func:`hcs_dask.compile_plate`) on ``client``.

    The output layout must exist (``compile_plate`` with ``write_layout=True``, the
    default). The client's cluster stays open after the run.
    """
    driver = _Driver(graph, client, policy or RunPolicy(), cloudpickle.dumps(graph.pipeline), ExitStack())
    if progress:
        driver.add_bar()
    driver.start()
    return PlateRun(driver)


def run_plate(
    plate: Plate | str | os.PathLike[str],
    pipeline: Pipeline | str | os.PathLike[str],
    output: str | os.PathLike[str],
    client: Any = None,
    *,
    progress: bool | None = None,
    **options: Any,
) -> PlateResult:
    """Run ``pipeline`` on every well of ``plate`` and return the :class:`PlateResult`.

    ``submit_plate(...).result()``, with a progress bar by default where one can be
    seen (a terminal or Jupyter). An interrupt (Ctrl-C, a notebook's stop button)
    cancels the run as :meth:`PlateRun.cancel` does, leaving a store that
    ``resume=True`` completes, and is raised again. Parameters as :func:`submit_plate`.

    Examples
    --------
    >>> result = run_plate(open_plate("my_plate"), pipeline, "out.ome.zarr")  # doctest: +SKIP
    >>> result.counts()  # doctest: +SKIP
    {'ok': 96}
    """
    if progress is None:
        progress = live.in_jupyter() or sys.stderr.isatty()
    run = submit_plate(plate, pipeline, output, client, progress=progress, **options)
    try:
        return run.result()
    except KeyboardInterrupt:
        logger.warning("interrupted: cancelling plate %s (resume=True / --resume completes it)", run.plate)
        run.cancel(grace=INTERRUPT_GRACE_SECONDS)
        raise


# ------------------------------------------------------------------ the driver
@dataclass
class _InFlight:
    plan: WellPlan
    attempt: int
    future: Any
    worker: str
    solo: bool
    token: str
    #: Wall clock when the well took a slot of its worker, as the client knows it; None while
    #: it waits queued on the worker behind the wells running there.
    started: float | None
    order: int = 0  # submission number: a worker runs its queued wells in this order


@dataclass
class _Worker:
    address: str
    slots: int
    nanny: str | None
    host: str
    memory_limit: int = 0
    running: bool = True
    retired: bool = False  # the run ended its process: no more wells until it is gone
    keys: set = field(default_factory=set)
    solo: bool = False


class _Driver:
    """The client side of one run, on a thread of its own."""

    POLL_SECONDS = 0.5
    #: Wells queued on each worker beyond its slots (only with the manifest, which tells on a
    #: death whether a queued well had started).
    QUEUED_PER_WORKER = 1
    #: Deaths a well may see while queued, uncounted, before it runs alone like a suspect.
    UNSTARTED_LOSSES = 2

    def __init__(self, graph: PlateGraph, client: Any, policy: RunPolicy, blob: bytes, owned: ExitStack) -> None:
        self.graph = graph
        self.client = client
        self.policy = policy
        self.blob = blob
        self.owned = owned
        self.manifest = Manifest(graph.output) if policy.manifest else None
        self.run_id = uuid.uuid4().hex[:8]
        self.results: dict[str, ExecutionResult] = {
            record["well"]: ExecutionResult.from_record(record) for record in graph.done + graph.skipped
        }
        self.pending: deque[tuple[WellPlan, int]] = deque((plan, 1) for plan in graph.plans)
        self.suspects: deque[tuple[WellPlan, int]] = deque()
        self.inflight: dict[Any, _InFlight] = {}
        self.workers: dict[str, _Worker] = {}
        self.recycled: set[str] = set()
        self.submissions = 0
        self.used_keys: set[Any] = set()
        self.unstarted_losses: dict[str, int] = {}
        self.queue_depth = self.QUEUED_PER_WORKER if self.manifest is not None else 0
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.bars: list[Any] = []
        #: Called with each well's final result, on this thread, after it is recorded (live views).
        self.listeners: list[Callable[[ExecutionResult], None]] = []
        #: Why no more wells were started before the end (``max_failures``), if so.
        self.stopped: str | None = None
        self._first_failures: list[ExecutionResult] | None = []  # None once a first outcome was no such failure
        self.cancel_deadline: float | None = None
        self._pandas_started = False  # the measurement table's pandas, imported ahead (_import_pandas_ahead)
        self.finished = threading.Event()
        self.result: PlateResult | None = None
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        # Wells of a pipeline with GPU steps run only where a GPU is (workers started with
        # resources={"GPU": n}, as --cluster cuda does); a slot is then one GPU.
        if policy.resources is not None:
            self.resources: dict[str, float] | None = dict(policy.resources)
        else:
            self.resources = {"GPU": 1} if graph.pipeline.uses_gpu() else None
        self.thread = threading.Thread(target=self._main, name=f"hcs-dask-driver-{graph.plate.name}", daemon=True)

    def start(self) -> None:
        from hcs_dask.plugin import CleanupPlugin

        self.client.register_plugin(CleanupPlugin())
        if self.manifest is not None:
            for record in self.graph.skipped:
                self.manifest.write_well(record)
        self._refresh_workers()
        self.thread.start()

    # ---------------------------------------------------------- reading state
    def statuses(self) -> dict[str, str]:
        """Every well's status now: ``queued``, ``running``, or its final status."""
        with self.lock:
            waiting = list(self.pending) + list(self.suspects)
            running = list(self.inflight.values())
            ended = list(self.results.values())
        statuses = {plan.well.name: "queued" for plan, _ in waiting}
        statuses.update((entry.plan.well.name, "queued" if entry.started is None else "running") for entry in running)
        statuses.update((result.well, result.status) for result in ended)
        return statuses

    def final_results(self) -> list[ExecutionResult]:
        """The final results so far, in plate order."""
        with self.lock:
            ended = list(self.results.values())
        return sorted(ended, key=lambda r: _well_order(r.well))

    def counts(self) -> dict[str, int]:
        with self.lock:
            running = sum(1 for entry in self.inflight.values() if entry.started is not None)
            counts = {"queued": len(self.pending) + len(self.suspects) + len(self.inflight) - running,
                      "running": running}
            for result in self.results.values():
                counts[result.status] = counts.get(result.status, 0) + 1
        return {status: n for status, n in counts.items() if n or status in ("queued", "running")}

    def add_bar(self) -> Any:
        graph = self.graph
        bar = _progress_bar(total=len(graph.plans) + len(graph.done) + len(graph.skipped), unit="well",
                            desc=graph.plate.name)
        with self.lock:
            bar.update(len(self.results))
            if self.finished.is_set():
                bar.close()
            else:
                self.bars.append(bar)
        return bar

    # -------------------------------------------------------------- the loop
    def _main(self) -> None:
        try:
            self._loop()
            self.result = self._plate_result()
        except BaseException as error:  # the run is broken: stop what is in flight, report it
            self.error = error
            try:
                self.client.cancel([entry.future for entry in self.inflight.values()], force=True)
            except Exception:  # the client may be gone already
                pass
        finally:
            try:
                self.owned.close()
            except Exception as error:
                logger.warning("closing the embedded cluster failed: %s", error)
            with self.lock:
                for bar in self.bars:
                    bar.close()
                self.bars.clear()
            self.finished.set()

    def _loop(self) -> None:
        self._fill()
        last_refresh = last_progress = time.monotonic()
        while self.inflight or self.pending or self.suspects:
            try:
                kind, payload = self.events.get(timeout=self.POLL_SECONDS)
            except queue.Empty:
                kind, payload = None, None
            if kind == "done":
                if self._handle(payload):
                    last_progress = time.monotonic()
            elif kind == "cancel":
                self._start_cancel(payload)
            now = time.monotonic()
            if now - last_refresh >= self.POLL_SECONDS:
                last_refresh = now
                self._refresh_workers()
            if self.cancel_deadline is not None:
                if now >= self.cancel_deadline:
                    self._stop_inflight()
                continue
            if self.policy.well_timeout is not None and self._check_timeouts():
                last_progress = now
            self._fill()
            if now - last_progress > self.policy.stall_timeout:
                self._report_stall(now - last_progress)
                last_progress = now

    # ------------------------------------------------------------ placement
    def _refresh_workers(self) -> None:
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        for address in [a for a in self.workers if a not in info]:
            self._worker_lost(address)
        for address, worker in info.items():
            slots = int(worker.get("nthreads", 1))
            if self.resources:  # as many wells as the worker's resources allow, at most a thread each
                offered = worker.get("resources", {})
                slots = min([slots] + [int(offered.get(name, 0) // amount) for name, amount in self.resources.items()])
            known = self.workers.get(address)
            if known is None:
                known = self.workers[address] = _Worker(address, slots, worker.get("nanny"),
                                                        worker.get("host", ""), worker.get("memory_limit") or 0)
            known.slots = slots
            known.running = worker.get("status", "running") == "running"

    def _fill(self) -> None:
        if self.cancel_deadline is not None:
            return
        usable = [w for w in self.workers.values() if w.running and not w.retired and w.slots > 0]
        # Suspects first, each alone on a worker with nothing else of this run on it.
        for worker in usable:
            if not self.suspects:
                break
            if not worker.keys:
                plan, attempt = self.suspects.popleft()
                self._submit(plan, attempt, worker, solo=True)
        if self.suspects:
            return  # other wells wait until a worker is free for the next suspect
        while self.pending:
            free = [w for w in usable if not w.solo and len(w.keys) < w.slots + self.queue_depth]
            if not free:
                return
            worker = max(free, key=lambda w: w.slots - len(w.keys))
            plan, attempt = self.pending.popleft()
            self._submit(plan, attempt, worker, solo=False)

    def _submit(self, plan: WellPlan, attempt: int, worker: _Worker, *, solo: bool) -> None:
        self.submissions += 1
        key: Any = plan.key
        # The documented key for a well's first submission; every later one (the scheduler
        # may not have forgotten an erred task yet) and any clash with the client's own
        # futures gets a fresh one.
        if key in self.used_keys or key in getattr(self.client, "futures", {}):
            key = (*plan.key, self.run_id, self.submissions)
        self.used_keys.add(plan.key)
        token = f"{self.run_id}-{self.submissions}"
        future = self.client.submit(run_well, plan, self.blob, attempt, token, key=key, pure=False,
                                    workers=[worker.address], allow_other_workers=False,
                                    resources=self.resources)
        running = sum(1 for key in worker.keys if self.inflight[key].started is not None)
        started = time.time() if running < worker.slots else None
        with self.lock:
            self.inflight[future.key] = _InFlight(plan, attempt, future, worker.address, solo, token, started,
                                                  self.submissions)
        worker.keys.add(future.key)
        worker.solo = worker.solo or solo
        future.add_done_callback(lambda f: self.events.put(("done", f)))

    def _take(self, key: Any) -> _InFlight | None:
        """Remove an in-flight entry and free its slot."""
        with self.lock:
            entry = self.inflight.pop(key, None)
        if entry is not None:
            worker = self.workers.get(entry.worker)
            if worker is not None:
                worker.keys.discard(key)
                if entry.solo:
                    worker.solo = False
                if entry.started is not None and not worker.retired:
                    self._promote(worker)
        return entry

    def _promote(self, worker: _Worker) -> None:
        """The first well queued on ``worker`` takes the slot just freed: its clock starts now."""
        queued = [self.inflight[key] for key in worker.keys if self.inflight[key].started is None]
        if queued:
            min(queued, key=lambda entry: entry.order).started = time.time()

    def _had_started(self, entry: _InFlight) -> bool:
        """Whether the well wrote its ``running`` record for this submission (before any of its code ran)."""
        assert self.manifest is not None
        try:
            record = self.manifest.read_well(entry.plan.well.name)
        except OSError:
            return True  # cannot tell: treated as started, so as a suspect
        return record is not None and record.get("run") == entry.token

    # ------------------------------------------------------------- outcomes
    def _handle(self, future: Any) -> bool:
        """Act on a finished future; True when a well reached its final record."""
        if future.key not in self.inflight:
            return False  # already dealt with (timeout, cancel, lost worker)
        if future.status == "error":
            from distributed.scheduler import KilledWorker

            error = future.exception()
            if isinstance(error, KilledWorker):
                entry = self.inflight[future.key]
                return self._worker_lost(entry.worker, pid=getattr(error.last_worker, "pid", None))
        entry = self._take(future.key)
        assert entry is not None
        return self._outcome(entry)

    def _outcome(self, entry: _InFlight) -> bool:
        future, plan = entry.future, entry.plan
        if future.status == "finished":
            result = self._result_of(entry)
            if not result.ok and entry.attempt <= self.policy.failure_retries and self.cancel_deadline is None:
                self.pending.appendleft((plan, entry.attempt + 1))
                return False
            self._finish(result, entry, write=False)
            return True
        if future.status == "cancelled":
            self._finish(ExecutionResult(
                well=plan.well.name, status="cancelled", attempts=entry.attempt,
                error="the task was cancelled outside hcs_dask (scheduler restart or client.cancel)"), entry)
            return True
        error = future.exception()
        self._finish(ExecutionResult(well=plan.well.name, status="failed", attempts=entry.attempt,
                                     error_type=type(error).__name__, error=_text(error)), entry)
        return True

    def _result_of(self, entry: _InFlight) -> ExecutionResult:
        """The well's result, read from its manifest record where there is one.

        The record was written by the task before it returned, so reading it needs no
        transfer from the worker, and it is there even if that worker died since.
        """
        if self.manifest is not None:
            try:
                record = self.manifest.read_well(entry.plan.well.name)
            except (OSError, ValueError) as error:  # an unreadable manifest: the task's own result says
                logger.warning("well %s: its manifest record cannot be read: %s", entry.plan.well.name, error)
                record = None
            if record and record.get("run") == entry.token and record.get("status") != "running":
                entry.future.release()
                return ExecutionResult.from_record(record)
        return entry.future.result()

    def _finish(self, result: ExecutionResult, entry: _InFlight | None, *, write: bool = True) -> None:
        if write:
            if entry is not None:
                result.started = result.started or entry.started
            result.finished = time.time()
            if self.manifest is not None:
                try:
                    self.manifest.write_well(result.record())
                except OSError as error:  # the record stays in the result; resume redoes the well
                    logger.warning("well %s: its %s record could not be written to the manifest: %s",
                                   result.well, result.status, error)
                    result.error = f"{result.error or ''} (not recorded in the manifest: {error})".strip()
        if result.measurements and not self._pandas_started:
            self._import_pandas_ahead()
        with self.lock:
            self.results[result.well] = result
            for bar in self.bars:
                bar.update(1)
                if not result.ok:
                    bar.write(f"well {result.well}: {result.status}: "
                              f"{result.error_type or result.cause or ''}: {result.error}")
        if not result.ok and not self.bars:
            logger.warning("well %s: %s: %s", result.well, result.status, result.error or result.cause)
        self._check_early_stop(result)
        for listener in list(self.listeners):
            try:
                listener(result)
            except Exception as error:  # a display must never break the run
                logger.warning("a listener of plate %s failed: %s", self.graph.plate.name, error)

    def _import_pandas_ahead(self) -> None:
        """Import pandas for the measurement table on a thread of its own, once a well measured something.

        The 0.6-0.8 s import on this thread kept the next wells from being placed (a 1-worker
        run's worker stood idle 0.44 s after its second well), and at the end it would be waited
        for; the tables' own import then waits for this one where it is not done yet (Python's
        import lock). A run whose wells measure nothing writes its well-status table without
        pandas and never imports it: on 2 cores the import, beside two workers, had lengthened
        a 96-well anchor run by 0.6 s (whole command, means of 4 alternating pairs).
        """
        self._pandas_started = True
        threading.Thread(target=importlib.import_module, args=("pandas",), daemon=True,
                         name="hcs-dask-import-pandas").start()

    def _check_early_stop(self, result: ExecutionResult) -> None:
        """Stop starting wells once the first ``max_failures`` outcomes all failed in one step."""
        first, limit = self._first_failures, self.policy.max_failures
        if first is None or limit is None or self.cancel_deadline is not None:
            return
        if result.status != "failed" or (first and result.step != first[0].step):
            self._first_failures = None
            return
        first.append(result)
        if len(first) < limit or not (self.pending or self.suspects):
            return
        self._first_failures = None
        waiting = list(self.pending) + list(self.suspects)
        self.stopped = (f"the first {len(first)} wells all failed in step {result.step!r} ({result.error_type}: "
                        f"{result.error}); {len(waiting)} wells were not started (recorded 'cancelled'): fix the "
                        "step, then rerun_failed() or --resume")
        logger.warning("plate %s: stopping early: %s", self.graph.plate.name, self.stopped)
        with self.lock:
            self.pending.clear()
            self.suspects.clear()
        for plan, attempt in waiting:
            cancelled = self._cancelled(plan, f"not started: the first {len(first)} wells all failed in step "
                                              f"{result.step!r} (max_failures)")
            cancelled.attempts = attempt
            self._finish(cancelled, None)

    def _worker_lost(self, address: str, pid: int | None = None) -> bool:
        """A worker is gone: sort the wells it was running into culprit, suspects and innocents."""
        worker = self.workers.pop(address, None)
        entries = [entry for entry in list(self.inflight.values()) if entry.worker == address]
        for entry in entries:
            self._take(entry.future.key)
        lost = []
        final = False
        for entry in entries:
            if entry.future.status == "finished":  # it ended before the worker did
                final = self._outcome(entry) or final
            else:
                lost.append(entry)
        if not lost:
            return final
        try:
            self.client.cancel([entry.future for entry in lost], force=True)
        except Exception:  # the scheduler forgot them already
            pass
        names = ", ".join(entry.plan.well.name for entry in lost)
        if self.cancel_deadline is not None:
            for entry in lost:
                self._finish(self._cancelled(entry, f"its worker {address} was lost while the run was cancelled"),
                             entry)
            return True
        if address in self.recycled:  # ended by this run after another well's timeout
            self.recycled.discard(address)
            for entry in lost:
                self.pending.appendleft((entry.plan, entry.attempt))
            logger.info("wells %s: their worker %s was ended for a timeout; running them again", names, address)
            return final
        if self._removal_expected(address):  # retired on purpose (lifetime, scale-down): no one's fault
            for entry in lost:
                self.pending.appendleft((entry.plan, entry.attempt))
            logger.info("wells %s: worker %s retired while running them; running them again", names, address)
            return final
        if self.manifest is not None:
            # Wells queued on the worker that had not started lose nothing and are charged
            # nothing. A solo suspect is never among them: alone, it is the culprit either way.
            waiting = [entry for entry in lost if not entry.solo and not self._had_started(entry)]
            for entry in waiting:
                name = entry.plan.well.name
                self.unstarted_losses[name] = self.unstarted_losses.get(name, 0) + 1
                if self.unstarted_losses[name] > self.UNSTARTED_LOSSES:  # bounded: it may die before its record
                    self.suspects.append((entry.plan, entry.attempt))
                else:
                    self.pending.appendleft((entry.plan, entry.attempt))
            lost = [entry for entry in lost if entry not in waiting]
            if waiting:
                logger.info("wells %s had not started on worker %s when it died; they run again, uncounted",
                            ", ".join(entry.plan.well.name for entry in waiting), address)
            if not lost:
                return final
            names = ", ".join(entry.plan.well.name for entry in lost)
        if len(lost) > 1:
            for entry in lost:
                self.suspects.append((entry.plan, entry.attempt))
            logger.warning("worker %s died while running %d wells (%s); each runs again alone to find the "
                           "one that killed it", address, len(lost), names)
            return final
        entry = lost[0]
        cause = self._death_cause(address, worker, pid)
        if entry.attempt <= self.policy.worker_death_retries:
            logger.warning("well %s: worker %s died (%s); trying again alone (attempt %d)",
                           entry.plan.well.name, address, cause, entry.attempt + 1)
            self.suspects.appendleft((entry.plan, entry.attempt + 1))
            return final
        self._finish(ExecutionResult(
            well=entry.plan.well.name, status="worker_died", attempts=entry.attempt, worker=address, pid=pid,
            cause=cause, error_type="KilledWorker",
            error=f"worker {address} (pid {pid or 'unknown'}) died while running the well: {cause}"), entry)
        return True

    def _removal_expected(self, address: str) -> bool:
        """Whether the scheduler removed the worker on request (retirement), not after a death."""
        try:
            events = self.client.get_events(address)
        except Exception:  # no events kept: take it as a death
            return False
        for _, event in reversed(list(events)):
            if isinstance(event, dict) and event.get("action") == "remove-worker":
                return bool(event.get("expected"))
        return False

    def _death_cause(self, address: str, worker: _Worker | None, pid: int | None) -> str:
        """Why a worker died, from the nanny's memory-kill events and its log of the exit."""
        nanny = worker.nanny if worker is not None else None
        deadline = time.monotonic() + 3.0
        while True:
            for _, event in self.client.get_events("worker-restart-memory"):
                if (pid is not None and event.get("pid") == pid) or event.get("worker") == address:
                    limit = worker.memory_limit if worker is not None else 0
                    return (f"memory: the nanny restarted the worker at {event.get('rss', 0) / 2**20:.0f} MiB "
                            f"RSS (limit {limit / 2**20:.0f} MiB)")
            for lines in self._nanny_logs(nanny):
                for _, message in lines:  # newest first
                    # "... Worker process 1234 was killed by signal 11" (the nanny's words)
                    _, marker, rest = message.partition("Worker process ")
                    number, _, tail = rest.partition(" ")
                    if marker and number.isdigit() and (pid is None or number == str(pid)):
                        return _signal_text(tail)
            if time.monotonic() > deadline:
                return "worker process died (no exit status known: no nanny, or it did not say)"
            time.sleep(0.2)

    def _nanny_logs(self, nanny: str | None) -> list[list[tuple[str, str]]]:
        """The recent log lines of the dead worker's nanny, newest first; [] where there is none.

        Asked of the nanny directly: a broadcast through the scheduler reaches a nanny only
        once its restarted worker has registered again.
        """
        if nanny is None:
            return []

        async def ask() -> Any:
            import asyncio

            return await asyncio.wait_for(self.client.rpc(nanny).get_logs(), timeout=5)

        try:
            lines = self.client.sync(ask)
        except Exception:  # a nanny that is itself gone: no log to read
            return []
        return [[(str(level), str(message)) for level, message in lines]]

    # ------------------------------------------------------------ deadlines
    def _check_timeouts(self) -> bool:
        """End the wells running past ``well_timeout``; True when any did."""
        limit = self.policy.well_timeout
        assert limit is not None
        now = time.time()
        late = [entry for entry in list(self.inflight.values())
                if entry.started is not None and now - entry.started > limit]
        for entry in late:
            worker = self.workers.get(entry.worker)
            if worker is not None:
                worker.retired = True  # before the slot is freed: nothing queued there starts its clock
            self._take(entry.future.key)
            logger.warning("well %s: no result after %.0f s; ending worker %s", entry.plan.well.name, limit,
                           entry.worker)
            self._finish(ExecutionResult(
                well=entry.plan.well.name, status="timeout", attempts=entry.attempt, worker=entry.worker,
                started=entry.started, cause=f"ran longer than well_timeout={limit:g} s",
                error=f"no result after {limit:g} s; its worker process {entry.worker} was ended"), entry)
            self._end_worker(entry)
        return bool(late)

    def _end_worker(self, entry: _InFlight) -> None:
        """End the process running ``entry`` from outside: a hung thread cannot be stopped from inside."""
        try:
            self.client.cancel([entry.future], force=True)
        except Exception:
            pass
        worker = self.workers.get(entry.worker)
        self.recycled.add(entry.worker)
        if worker is not None:
            worker.retired = True
        if worker is not None and worker.nanny:
            try:
                self.client.run(_kill_worker_process, workers=[entry.worker], nanny=True)
                return
            except Exception as error:
                logger.warning("the nanny of %s could not end its worker: %s", entry.worker, error)
        pid = self._worker_pid(entry.worker)
        if pid is not None and worker is not None and _is_this_machine(worker.host):
            try:
                os.kill(pid, signal.SIGKILL)
                return
            except OSError as error:
                logger.warning("ending worker process %d failed: %s", pid, error)
        logger.warning("worker %s has no nanny and does not run on this machine: it cannot be ended from "
                       "outside; no more wells go to it", entry.worker)

    def _worker_pid(self, address: str) -> int | None:
        try:
            return self.client.run_on_scheduler(_scheduler_worker_pid, address)
        except Exception:
            return None

    def _report_stall(self, seconds: float) -> None:
        where = ", ".join(f"{entry.plan.well.name} on {entry.worker}"
                          for entry in sorted(self.inflight.values(), key=lambda e: e.plan.well.name)[:20])
        waiting = len(self.pending) + len(self.suspects)
        logger.warning("no well has finished for %.0f s; %d running: %s; %d waiting; %d usable workers",
                       seconds, len(self.inflight), where or "none", waiting,
                       sum(1 for w in self.workers.values() if w.running and not w.retired and w.slots))

    # ------------------------------------------------------------- cancel
    def _cancelled(self, entry_or_plan: Any, why: str) -> ExecutionResult:
        plan = entry_or_plan.plan if isinstance(entry_or_plan, _InFlight) else entry_or_plan
        return ExecutionResult(well=plan.well.name, status="cancelled", error=f"cancelled: {why}",
                               attempts=getattr(entry_or_plan, "attempt", 1))

    def _start_cancel(self, grace: float) -> None:
        if self.cancel_deadline is not None:
            self.cancel_deadline = min(self.cancel_deadline, time.monotonic() + grace)
            return
        self.cancel_deadline = time.monotonic() + grace
        waiting = list(self.pending) + list(self.suspects)
        with self.lock:
            self.pending.clear()
            self.suspects.clear()
        if any(entry.started is None for entry in self.inflight.values()):
            # Wells queued on workers end themselves as cancelled when they see this; those
            # already running get the grace.
            try:
                self.client.run(cancel_run, self.run_id)
            except Exception as error:  # a worker gone meanwhile: its wells end with it
                logger.info("telling the workers about the cancel failed: %s", error)
        for plan, attempt in waiting:
            result = self._cancelled(plan, "the run was cancelled before the well started")
            result.attempts = attempt
            self._finish(result, None)

    def _stop_inflight(self) -> None:
        for entry in list(self.inflight.values()):
            self._take(entry.future.key)
            why = ("the run was cancelled while the well ran; its worker process was ended" if entry.started is not None
                   else "the run was cancelled before the well started")
            self._finish(self._cancelled(entry, why), entry)
            self._end_worker(entry)

    # -------------------------------------------------------------- result
    def _plate_result(self) -> PlateResult:
        graph = self.graph
        names = [plan.well.name for plan in graph.plans] + [r["well"] for r in graph.done + graph.skipped]
        ordered = [self.results[name] for name in sorted(names, key=_well_order)]
        plate = graph.plate
        result = PlateResult(plate=plate.name, output=graph.output, wells=ordered,
                             seconds=time.perf_counter() - self.started,
                             geometry=(plate.plate_rows, plate.plate_columns), sites=plate.sites,
                             channels=plate.channels, channel_names={c: plate.channel_name(c) for c in plate.channels},
                             plate_root=plate.root, stopped=self.stopped, source_plate=plate, pipeline=graph.pipeline)
        try:
            from hcs_dask.tables import write_result_tables  # pandas, once the wells have ended

            write_result_tables(result, graph.measurements_path, table_format=self.policy.table_format)
        except Exception as error:  # the wells are recorded in the store's manifest; the result stands
            logger.warning("plate %s: writing its tables failed: %s: %s", plate.name, type(error).__name__, error)
        return result


# ------------------------------------------------------------------ helpers
def _text(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:
        return f"<the error message could not be made ({type(error).__name__})>"


def _kill_worker_process(dask_worker: Any) -> int | None:
    """On a nanny: SIGKILL its worker process (which a GIL-holding well cannot delay)."""
    pid = dask_worker.pid
    if pid:
        os.kill(pid, signal.SIGKILL)
    return pid


def _scheduler_worker_pid(address: str, dask_scheduler: Any) -> int | None:
    state = dask_scheduler.workers.get(address)
    return getattr(state, "pid", None)


def _is_this_machine(host: str) -> bool:
    import socket

    if host in ("127.0.0.1", "localhost", "::1"):
        return True
    try:
        return host in {socket.gethostname(), socket.getfqdn(), socket.gethostbyname(socket.gethostname())}
    except OSError:
        return False


def _require_gpu_workers(client: Any, pipeline: Pipeline) -> None:
    """Fail at once, not hang in ``no-worker``, when a GPU pipeline meets a cluster without GPUs."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if not any(worker.get("resources", {}).get("GPU") for worker in workers):
        raise _no_gpu_error(pipeline)


def _no_gpu_error(pipeline: Pipeline) -> ClusterError:
    steps = ", ".join(s.name for s in pipeline.steps if s.array_type != "numpy")
    return ClusterError(
        f"pipeline {pipeline.name!r} has GPU steps ({steps}) but no worker of this cluster offers "
        "resources={'GPU': ...}; run with --cluster cuda (run_plate(cluster='cuda')), or start "
        "dask-cuda workers with --resources GPU=1"
    )


def _signal_text(tail: str) -> str:
    """The end of a nanny's "Worker process N ..." line, in words.

    ``"was killed by signal 9"`` → ``"killed by signal 9 (SIGKILL)"``;
    ``"exited with status 1"`` → ``"process exited with status 1"``; anything else unchanged.

    >>> _signal_text("was killed by signal 11")
    'killed by signal 11 (SIGSEGV)'
    >>> _signal_text("exited with status 1")
    'process exited with status 1'
    """
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
    row, column = split_well_name(name)
    return row_index(row), column


def _progress_bar(**options: Any) -> Any:
    if live.in_jupyter():
        try:
            import ipywidgets  # noqa: F401  (tqdm's widget needs it; without it, a text bar)
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm(**options)
        except ImportError:
            pass
    from tqdm import tqdm

    return tqdm(file=sys.stderr, **options)

