"""The guard of ``run_well``: cleanup after every well and every sequential combination.

A fake GPU framework, registered through the public cleaner registry with a
module name put into ``sys.modules``, proves three things: the ordering
(cleanup before the result or error is returned, on success and failure), the
per-combination cleanup, and the "only if loaded" rule. In-process tests call
``run_well`` directly, where the order of events can be observed exactly; the
cluster tests run real plates on real ``LocalCluster`` workers.
"""

from __future__ import annotations

import os
import sys
import threading
import types
import uuid
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr

from hcs_dask import (
    Pipeline,
    Step,
    cleanup_stats,
    compile_plate,
    open_plate,
    register_cleaner,
    run_plate,
    run_well,
    write_synthetic_plate,
)
from hcs_dask.compile import WellPlan
from hcs_dask.memory import backend, gpu

MiB = 1 << 20


# --- a fake GPU framework (in this process) ----------------------------------------


class FakeFramework:
    """A 'GPU framework' whose pool is a byte counter; its release logs what it sees."""

    name = "fake-gpu"

    def __init__(self, module: str, events: list[tuple[Any, ...]]) -> None:
        self.module = module
        self.events = events
        self.held = 0
        self.releases = 0
        self.watched_key: Any = None  # the well's scope, read at the moment of each release

    def allocate(self, nbytes: int) -> None:
        self.held += nbytes

    def measure(self) -> int:
        return self.held

    def release(self) -> None:
        self.releases += 1
        self.events.append(("cleanup", backend.nbytes(self.watched_key)))
        self.held = 0


@pytest.fixture(autouse=True)
def _clean_process_state():
    backend.reset_memory_backend()
    gpu.reset_cleaner_registry()
    yield
    gpu.reset_cleaner_registry()
    backend.reset_memory_backend()


@pytest.fixture
def fake(monkeypatch) -> FakeFramework:
    """A loaded fake framework with its cleaner registered (both removed after the test)."""
    module = f"hcs_fake_gpu_{uuid.uuid4().hex[:12]}"
    monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
    framework = FakeFramework(module, [])
    register_cleaner(framework.name, module=module, release=framework.release, measure=framework.measure)
    return framework


@pytest.fixture(scope="module")
def one_well_source(tmp_path_factory) -> Path:
    return write_synthetic_plate(tmp_path_factory.mktemp("one") / "plate", wells=1, sites=1, channels=1,
                                 z=2, size=64, seed=11)


@pytest.fixture(scope="module")
def timepoints_source(tmp_path_factory) -> Path:
    return write_synthetic_plate(tmp_path_factory.mktemp("tp") / "plate", wells=1, sites=1, channels=1,
                                 z=2, timepoints=3, size=64, seed=12)


def _only_plan(root: Path, pipeline: Pipeline, output: Path) -> WellPlan:
    [plan] = compile_plate(open_plate(root), pipeline, output).plans
    return plan


# --- ordering ------------------------------------------------------------------------


@pytest.mark.parametrize("fails", [False, True], ids=["succeeding", "raising"])
def test_cleanup_runs_after_the_steps_and_before_run_well_returns(fails, fake, one_well_source, tmp_path):
    def project(stack, *, context):
        context.scope.put("stash", np.ones(MiB, dtype=np.uint8))
        fake.allocate(3 * MiB)
        fake.events.append(("step", backend.nbytes(fake.watched_key)))
        if fails:
            raise RuntimeError("deliberate failure")
        return stack.max(axis=0)

    pipeline = Pipeline([Step(project, stack="z")])
    plan = _only_plan(one_well_source, pipeline, tmp_path / "out.ome.zarr")
    fake.watched_key = plan.key

    result = run_well(plan, pipeline)
    fake.events.append(("returned",))

    [step, cleanup, returned] = fake.events
    assert step[0] == "step" and step[1] >= MiB  # the scope was full while the step ran...
    assert cleanup == ("cleanup", 0)  # ...and already reset when the GPU pools were released
    assert returned == ("returned",)
    assert result.status == ("failed" if fails else "ok")
    assert result.memory["process"]["gpu"][fake.name] == {"before": 3 * MiB, "after": 0}
    assert result.memory["backend_bytes_freed"] >= MiB
    assert result.memory["cleanups"] == 1 and fake.releases == 1


# --- one cleanup per sequential combination --------------------------------------------


def test_each_sequential_combination_gets_its_own_cleanup(fake, timepoints_source, tmp_path):
    def project(stack, *, context):
        context.scope.put("stash", np.ones(MiB, dtype=np.uint8))
        fake.events.append(("step", context.timepoint))
        return stack.max(axis=0)

    pipeline = Pipeline([Step(project, stack="z")], sequential=("timepoint",))
    plan = _only_plan(timepoints_source, pipeline, tmp_path / "out.ome.zarr")
    fake.watched_key = plan.key

    result = run_well(plan, pipeline)

    assert result.ok, result.error
    assert fake.events == [("step", 1), ("cleanup", 0), ("step", 2), ("cleanup", 0), ("step", 3), ("cleanup", 0)]
    assert fake.releases == 3 and result.memory["cleanups"] == 3


def test_the_first_failing_combination_ends_the_well_after_its_cleanup(fake, timepoints_source, tmp_path):
    def project(stack, *, context):
        fake.events.append(("step", context.timepoint))
        if context.timepoint == 2:
            raise ValueError("timepoint 2 is out of focus")
        return stack.max(axis=0)

    pipeline = Pipeline([Step(project, stack="z", name="project")], sequential=("timepoint",))
    plan = _only_plan(timepoints_source, pipeline, tmp_path / "out.ome.zarr")
    fake.watched_key = plan.key

    result = run_well(plan, pipeline)

    assert result.status == "failed"
    assert result.combination == {"timepoint": 2} and result.step == "project"
    assert "out of focus" in result.error
    # Cleanup after timepoint 1 and after the failing timepoint 2; timepoint 3 never ran.
    assert fake.events == [("step", 1), ("cleanup", 0), ("step", 2), ("cleanup", 0)]
    assert fake.releases == 2 and result.memory["cleanups"] == 2


# --- only frameworks already loaded ----------------------------------------------------


def test_the_cleaner_of_a_framework_not_loaded_never_runs_nor_imports_it(one_well_source, tmp_path):
    module = f"hcs_fake_gpu_absent_{uuid.uuid4().hex[:12]}"
    calls: list[str] = []
    register_cleaner("absent-gpu", module=module, release=lambda: calls.append("release"),
                     measure=lambda: calls.append("measure") or 0)
    pipeline = Pipeline([Step(np.max, stack="z", kwargs={"axis": 0}, name="mip")])
    plan = _only_plan(one_well_source, pipeline, tmp_path / "out.ome.zarr")

    result = run_well(plan, pipeline)

    assert result.ok, result.error
    assert calls == []
    assert module not in sys.modules
    assert "absent-gpu" not in result.memory["process"]["gpu"]


# --- traceback frames --------------------------------------------------------------------

# Weak references to the arrays a failing step held in its frames, and the exceptions it
# raised, kept the way an error reporter would keep them.
_LARGE_ARRAYS: list[weakref.ref] = []
_KEPT_ERRORS: list[BaseException] = []


def _inner_computation(stack: np.ndarray) -> None:
    inner_large = np.ones((1024, 1024))  # 8 MB, alive only through this frame
    _LARGE_ARRAYS.append(weakref.ref(inner_large))
    raise LookupError("no threshold found")


def fail_holding_large_arrays(stack):
    large = np.ones((2048, 2048))  # 32 MB, alive only through this frame
    _LARGE_ARRAYS.append(weakref.ref(large))
    try:
        _inner_computation(stack)
    except LookupError as inner:
        error = ValueError("segmentation failed")
        _KEPT_ERRORS.append(error)
        raise error from inner


@pytest.fixture
def large_array_refs():
    _LARGE_ARRAYS.clear()
    _KEPT_ERRORS.clear()
    yield _LARGE_ARRAYS
    _LARGE_ARRAYS.clear()
    _KEPT_ERRORS.clear()


def test_a_failed_well_holds_no_arrays_through_its_traceback(large_array_refs, one_well_source, tmp_path):
    pipeline = Pipeline([Step(fail_holding_large_arrays, stack="z", name="segment")])
    plan = _only_plan(one_well_source, pipeline, tmp_path / "out.ome.zarr")

    result = run_well(plan, pipeline)

    assert len(large_array_refs) == 2
    # Dead although the exception object itself is still referenced (_KEPT_ERRORS).
    assert all(ref() is None for ref in large_array_refs)
    assert result.status == "failed"
    assert result.error_type == "ValueError" and result.error == "segmentation failed"
    assert "fail_holding_large_arrays" in result.traceback and "_inner_computation" in result.traceback
    assert "LookupError: no threshold found" in result.traceback  # the whole chain is in the text
    assert result.step == "segment" and result.combination == {}
    assert result.measurements == []


def test_a_failing_steps_arrays_are_gone_when_the_gpu_pools_are_released(
    large_array_refs, fake, one_well_source, tmp_path
):
    alive_at_release: list[bool] = []
    original_release = fake.release

    def release() -> None:
        alive_at_release.append(any(ref() is not None for ref in large_array_refs))
        original_release()

    register_cleaner(fake.name, module=fake.module, release=release, measure=fake.measure)
    pipeline = Pipeline([Step(fail_holding_large_arrays, stack="z", name="segment")])
    plan = _only_plan(one_well_source, pipeline, tmp_path / "out.ome.zarr")
    fake.watched_key = plan.key

    result = run_well(plan, pipeline)

    assert result.status == "failed"
    # The frames were cleared before the cleanup: the pools were released without them.
    assert alive_at_release == [False]


# --- KeyboardInterrupt and SystemExit ----------------------------------------------------


@pytest.mark.parametrize("exception", [KeyboardInterrupt, SystemExit], ids=lambda e: e.__name__)
def test_interrupts_propagate_after_the_cleanup(exception, fake, one_well_source, tmp_path):
    def interrupted(stack, *, context):
        context.scope.put("stash", np.ones(MiB, dtype=np.uint8))
        fake.allocate(MiB)
        fake.events.append(("step", backend.nbytes(fake.watched_key)))
        raise exception()

    pipeline = Pipeline([Step(interrupted, stack="z")])
    plan = _only_plan(one_well_source, pipeline, tmp_path / "out.ome.zarr")
    fake.watched_key = plan.key

    with pytest.raises(exception):
        run_well(plan, pipeline)
    fake.events.append(("propagated",))

    [step, cleanup, propagated] = fake.events
    assert step[1] >= MiB and cleanup == ("cleanup", 0) and propagated == ("propagated",)
    assert fake.held == 0
    assert backend.nbytes() == 0 and not backend.is_active(plan.key)


# --- what a step stashes in its scope ----------------------------------------------------


def test_what_a_step_stashes_in_its_scope_is_gone_after_the_well(one_well_source, tmp_path):
    def stash_and_project(stack, *, context):
        context.scope.put("kept-for-later", np.ones(8 * MiB, dtype=np.uint8))
        return stack.max(axis=0)

    pipeline = Pipeline([Step(stash_and_project, stack="z")])
    plan = _only_plan(one_well_source, pipeline, tmp_path / "out.ome.zarr")

    result = run_well(plan, pipeline)

    assert result.ok, result.error
    assert backend.nbytes() == 0 and backend.n_entries() == 0
    assert result.memory["backend_bytes_after_cleanup"] == 0
    assert result.memory["backend_bytes_freed"] >= 8 * MiB


# --- on a real cluster -------------------------------------------------------------------

WORKER_FAKE_MODULE = "hcs_fake_gpu_for_guard_tests"
WORKER_FAKE = "fake-guard-gpu"
WORKER_FAKE_BYTES = 5 * MiB


def _install_fake_on_worker() -> None:
    """The fake framework on a worker. Its pool is per thread: the worker plugin releases from
    its own background thread, and must not race the well's own before/after figures."""
    module = types.ModuleType(WORKER_FAKE_MODULE)
    pools = threading.local()

    def held() -> int:
        return getattr(pools, "held", 0)

    def allocate(nbytes: int) -> None:
        pools.held = held() + nbytes

    def release() -> None:
        pools.held = 0

    module.allocate = allocate  # type: ignore[attr-defined]
    sys.modules[WORKER_FAKE_MODULE] = module
    register_cleaner(WORKER_FAKE, module=WORKER_FAKE_MODULE, release=release, measure=held)


def _uninstall_fake_on_worker() -> None:
    gpu.reset_cleaner_registry()
    sys.modules.pop(WORKER_FAKE_MODULE, None)


def max_projection_unless_named(stack, *, failing, context):
    fake_module = sys.modules.get(WORKER_FAKE_MODULE)
    if fake_module is not None:
        fake_module.allocate(WORKER_FAKE_BYTES)
    context.scope.put("stash", np.ones(MiB, dtype=np.uint8))
    if context.well in failing:
        raise ValueError(f"deliberate failure in {context.well}")
    return stack.max(axis=0)


def _pipeline(failing: tuple[str, ...]) -> Pipeline:
    return Pipeline([Step(max_projection_unless_named, stack="z", name="mip-unless-named",
                          kwargs={"failing": failing})])


@pytest.fixture(scope="module")
def twelve_well_source(tmp_path_factory) -> Path:
    return write_synthetic_plate(tmp_path_factory.mktemp("twelve") / "plate", wells=12, sites=1, channels=1,
                                 z=2, size=64, seed=13)


@pytest.fixture
def fake_on_workers(client):
    client.run(_install_fake_on_worker)
    yield
    client.run(_uninstall_fake_on_worker)


@pytest.fixture(scope="module")
def single_worker_client():
    from hcs_dask.cluster import connect

    with connect(n_workers=1, threads_per_worker=1) as single:
        yield single


def test_failing_wells_are_records_and_the_other_wells_are_correct(
    twelve_well_source, tmp_path, client, fake_on_workers
):
    failing = ("A02", "A07", "A11")
    plate = open_plate(twelve_well_source)
    output = tmp_path / "out.ome.zarr"

    result = run_plate(plate, _pipeline(failing), output, client=client)

    assert result.counts() == {"ok": 9, "failed": 3}, [(r.well, r.error) for r in result.failures()]
    assert sorted(r.well for r in result.failures()) == list(failing)
    for failed in result.failures():
        assert failed.error_type == "ValueError" and failed.error == f"deliberate failure in {failed.well}"
        assert "max_projection_unless_named" in failed.traceback
        assert failed.step == "mip-unless-named" and failed.combination == {}
    for well_result in result.wells:
        assert well_result.memory["backend_bytes_after_cleanup"] == 0, well_result.well
        assert well_result.memory["backend_bytes_freed"] >= MiB, well_result.well
        # The guard on the worker released the fake pool after every well, failed or not.
        assert well_result.memory["process"]["gpu"][WORKER_FAKE] == {"before": WORKER_FAKE_BYTES, "after": 0}
    for well in plate.wells:
        if well.name in failing:
            continue
        written = zarr.open_array(output / well.row / str(well.column) / "0" / "0", mode="r")[:]
        planes = [tifffile.imread(f"{plate.root}/{path}") for _, path in well.files]
        assert written.shape == (1, 1, 64, 64)
        np.testing.assert_array_equal(written[0, 0], np.max(planes, axis=0))


# Calls per run, on the worker: decides "the first wells to run" whatever order they run in.
_CALLS_PER_RUN: Counter[str] = Counter()


def fail_the_first_wells(stack, *, first, run, context):
    _CALLS_PER_RUN[run] += 1
    if _CALLS_PER_RUN[run] <= first:
        raise ValueError(f"deliberate failure in {context.well}, one of the first {first} wells to run")
    return stack.max(axis=0)


def test_the_same_worker_process_runs_the_wells_after_a_failure(twelve_well_source, tmp_path,
                                                                 single_worker_client):
    pipeline = Pipeline([Step(fail_the_first_wells, stack="z", kwargs={"first": 3, "run": uuid.uuid4().hex})])

    result = run_plate(open_plate(twelve_well_source), pipeline, tmp_path / "out.ome.zarr",
                       client=single_worker_client)

    [worker_pid] = single_worker_client.run(os.getpid).values()
    assert {r.pid for r in result.wells} == {worker_pid}
    by_start = sorted(result.wells, key=lambda r: r.started)
    assert all(a.finished <= b.started for a, b in zip(by_start, by_start[1:]))  # one thread: one by one
    assert [r.status for r in by_start] == ["failed"] * 3 + ["ok"] * 9, [(r.well, r.status) for r in by_start]
    assert all("one of the first 3 wells" in r.error for r in by_start[:3])


def test_cleanup_stats_count_the_well_tasks_on_each_worker(twelve_well_source, tmp_path, client):
    before = {address: stats.get("tasks_seen", 0) for address, stats in cleanup_stats(client).items()}
    cleanups_before = {address: stats.get("cleanups_run", 0) for address, stats in cleanup_stats(client).items()}

    result = run_plate(open_plate(twelve_well_source), _pipeline(()), tmp_path / "out.ome.zarr", client=client)

    assert result.ok, result.failures()
    after = cleanup_stats(client)
    wells_per_worker = Counter(r.worker for r in result.wells)
    assert set(wells_per_worker) <= set(after)
    seen = {}
    for address, stats in after.items():
        assert stats["registered"], address
        seen[address] = stats["tasks_seen"] - before.get(address, 0)
        ran = wells_per_worker.get(address, 0)
        # Every well task this worker ran (plus, at most, a task that carried the pipeline).
        assert ran <= seen[address] <= ran + 1, (address, ran, stats)
        if ran:
            assert stats["cleanups_run"] > cleanups_before.get(address, 0), (address, stats)
    assert sum(wells_per_worker.values()) == 12
