"""The guarantee on every cluster shape: threads > 1, several workers, resource-restricted
workers, a cluster hcs_dask did not start (``allowed-failures`` 3), with real ``os._exit``
and ``SIGSEGV``; timeouts from outside the worker; the record when the error's text
cannot be made; resume after a killed run.

Faults are switched per well through the file named by ``HCS_DASK_TEST_FAULTS``
(see ``faulty_graph.py``), so every test here starts its own cluster after setting it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hcs_dask import load_pipeline, open_plate, run_plate
from hcs_dask.formats import write_synthetic_plate
from hcs_dask.store import Manifest

GRAPH = Path(__file__).parent / "faulty_graph.py"


@pytest.fixture
def faults(tmp_path, monkeypatch):
    path = tmp_path / "faults.json"
    monkeypatch.setenv("HCS_DASK_TEST_FAULTS", str(path))
    return path


def _plate(tmp_path, wells, seed=1):
    return write_synthetic_plate(tmp_path / "plate", wells=wells, sites=1, channels=1, z=2, size=32, seed=seed)


def _set_faults(path, plate_root, culprit: dict[str, str], others: str | None = "slow:1"):
    names = [w.name for w in open_plate(plate_root).wells]
    table = {name: others for name in names if others}
    table.update(culprit)
    path.write_text(json.dumps(table))
    return names


def _assert_only_culprit_lost(result, culprit: str, cause: str):
    by_well = {r.well: r for r in result.wells}
    lost = by_well[culprit]
    assert lost.status == "worker_died", lost
    assert cause in lost.cause
    assert lost.attempts == 2  # its own run and one retry (worker_death_retries=1), nothing more
    for name, record in by_well.items():
        if name != culprit:
            assert record.status == "ok", record
            assert record.attempts == 1, record  # a neighbour's death is not charged


@pytest.mark.slow
def test_four_threads_per_worker_one_exit_costs_only_that_well(tmp_path, faults):
    root = _plate(tmp_path, 8)
    _set_faults(faults, root, {"A01": "exit"})
    result = run_plate(open_plate(root), load_pipeline(GRAPH), tmp_path / "o.ome.zarr", n_workers=1,
                       threads_per_worker=4, progress=False)
    _assert_only_culprit_lost(result, "A01", "exited with status 1")
    records = Manifest(tmp_path / "o.ome.zarr").read_wells()
    assert {w: r["attempts"] for w, r in records.items() if w != "A01"} == {w: 1 for w in records if w != "A01"}


@pytest.mark.slow
def test_two_workers_one_exit_charges_no_neighbour(tmp_path, faults):
    root = _plate(tmp_path, 6)
    _set_faults(faults, root, {"A01": "exit"})
    result = run_plate(open_plate(root), load_pipeline(GRAPH), tmp_path / "o.ome.zarr", n_workers=2,
                       progress=False)
    _assert_only_culprit_lost(result, "A01", "exited with status 1")


@pytest.mark.slow
def test_segfault_on_resource_restricted_workers_costs_only_that_well(tmp_path, faults):
    # Resource-restricted tasks are never queued by the scheduler: the run places them itself.
    root = _plate(tmp_path, 6)
    _set_faults(faults, root, {"A02": "segv"})
    result = run_plate(open_plate(root), load_pipeline(GRAPH), tmp_path / "o.ome.zarr", n_workers=2,
                       threads_per_worker=2, cluster_options={"resources": {"SLOT": 2}},
                       resources={"SLOT": 1}, progress=False)
    _assert_only_culprit_lost(result, "A02", "SIGSEGV")


@pytest.mark.slow
def test_a_cluster_not_started_by_hcs_dask_keeps_the_guarantee(tmp_path, faults):
    from distributed import Client, LocalCluster

    root = _plate(tmp_path, 6)
    _set_faults(faults, root, {"A03": "exit"})
    # Dask's own defaults: allowed-failures 3, worker-saturation 1.1.
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, scheduler_port=0,
                      dashboard_address=":0", host="127.0.0.1") as cluster, Client(cluster) as client:
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) == 3
        result = run_plate(open_plate(root), load_pipeline(GRAPH), tmp_path / "o.ome.zarr", client=client,
                           progress=False)
    _assert_only_culprit_lost(result, "A03", "exited with status 1")


@pytest.mark.slow
def test_an_exception_whose_text_cannot_be_made_is_still_cleaned_and_recorded(tmp_path, faults):
    from hcs_dask.cluster import connect
    from hcs_dask.memory import backend

    root = _plate(tmp_path, 2)
    _set_faults(faults, root, {"A01": "badstr"}, others=None)
    with connect(n_workers=1) as client:
        result = run_plate(open_plate(root), load_pipeline(GRAPH), tmp_path / "o.ome.zarr", client=client,
                           progress=False)
        left = client.run(lambda: (backend.nbytes(), [k for k in backend.scope_keys() if backend.is_active(k)]))
    failed = result["A01"]
    assert failed.status == "failed" and failed.error_type == "Unprintable"
    assert "could not be made" in failed.error and "this message cannot be made" in failed.error
    assert "faulty_max" in failed.traceback and failed.step == "faulty_max"
    assert failed.memory["backend_bytes_after_cleanup"] == 0
    assert failed.memory["backend_bytes_freed"] >= 64 * 2**20
    assert list(left.values()) == [(0, [])]
    assert result["A02"].ok


@pytest.mark.slow
@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
def test_a_gil_holding_well_times_out_from_outside(tmp_path, faults, manifest):
    root = _plate(tmp_path, 2)
    _set_faults(faults, root, {"A01": "gil"}, others=None)
    start = time.monotonic()
    result = run_plate(open_plate(root), load_pipeline(GRAPH), tmp_path / "o.ome.zarr", n_workers=1,
                       well_timeout=4, manifest=manifest, progress=False)
    assert result["A01"].status == "timeout" and "well_timeout=4" in result["A01"].cause
    assert result["A02"].ok and result["A02"].attempts == 1
    assert time.monotonic() - start < 120


@pytest.mark.slow
def test_resume_after_a_killed_run_takes_start_times_from_the_current_attempt(tmp_path, faults):
    root = _plate(tmp_path, 4)
    _set_faults(faults, root, {}, others="slow:2")
    output = tmp_path / "run.ome.zarr"
    process = subprocess.Popen(
        [sys.executable, "-m", "hcs_dask.cli", "run", str(GRAPH), str(root), "-o", str(output), "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ), start_new_session=True)
    manifest = Manifest(output)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if [r for r in manifest.read_wells().values() if r.get("status") == "running"]:
            break
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the client and its cluster, at once
    process.wait(timeout=10)
    stale = [r for r in manifest.read_wells().values() if r.get("status") == "running"]
    assert stale, "the killed run should leave 'running' records behind"
    time.sleep(max(0.0, 4.5 - (time.time() - min(r["started"] for r in stale))))
    # Every stale record is now older than the timeout; the wells themselves take 2 s.
    resumed = run_plate(open_plate(root), load_pipeline(GRAPH), output, resume=True, n_workers=1,
                        well_timeout=4, progress=False)
    assert resumed.counts() == {"ok": 4}, resumed.failures()


@pytest.mark.slow
def test_per_well_memory_figures_say_when_they_are_process_wide(tmp_path, faults):
    root = _plate(tmp_path, 4)
    _set_faults(faults, root, {}, others="slow:1")
    result = run_plate(open_plate(root), load_pipeline(GRAPH), tmp_path / "o.ome.zarr", n_workers=1,
                       threads_per_worker=2, progress=False)
    assert result.ok
    for well in result.wells:
        assert well.memory["backend_bytes_before"] == 0  # this well's scope, not the process's
        assert well.memory["process"]["threads"] == 2
    assert any(well.memory["process"]["shared"] for well in result.wells)


def test_a_fixed_helper_runs_when_the_same_pipeline_object_runs_again(tmp_path, client):
    graph = tmp_path / "helper_graph.py"
    graph.write_text(textwrap.dedent('''
        from hcs_dask import Pipeline, Step

        def helper(stack, well):
            if well == "A02":
                raise RuntimeError("helper is broken for A02")
            return stack.max(axis=0)

        def project(stack, *, context):
            return helper(stack, context.well)

        pipeline = Pipeline([Step(project, stack="z")], name="helper")
    '''))
    root = _plate(tmp_path, 2)
    pipeline = load_pipeline(graph)
    first = run_plate(open_plate(root), pipeline, tmp_path / "first.ome.zarr", client=client, progress=False)
    assert first["A02"].status == "failed" and "broken" in first["A02"].error
    module = sys.modules[pipeline.steps[0].func.__module__]
    exec("def helper(stack, well):\n    return stack.max(axis=0)\n", module.__dict__)  # the fix, as in a notebook
    second = run_plate(open_plate(root), pipeline, tmp_path / "second.ome.zarr", client=client, progress=False)
    assert second.ok, second.failures()


def test_a_manifest_that_cannot_be_written_fails_the_wells_not_the_run(tmp_path, client):
    import shutil

    from hcs_dask.compile import compile_plate
    from hcs_dask.driver import submit_graph
    from hcs_dask.memory import backend

    root = _plate(tmp_path, 3)
    graph = compile_plate(open_plate(root), load_pipeline("max_projection"), tmp_path / "o.ome.zarr")
    wells = Manifest(graph.output).folder / "wells"
    shutil.rmtree(wells)
    wells.write_text("not a folder")  # every record write now fails, on the workers and the client
    result = submit_graph(graph, client).result()
    assert [r.status for r in result.wells] == ["failed"] * 3
    for record in result.wells:
        assert record.error_type in ("NotADirectoryError", "FileNotFoundError"), record
        assert record.memory["backend_bytes_after_cleanup"] == 0
    assert all(nbytes == 0 for nbytes in client.run(backend.nbytes).values())
