"""Nothing lost: every fault is a record of its own, the store stays valid, --resume completes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tifffile
import zarr

from hcs_dask import load_pipeline, open_plate, run_plate
from hcs_dask.compile import ResumeError
from hcs_dask.formats import write_synthetic_plate
from hcs_dask.store import Manifest

GRAPH = Path(__file__).parent / "faulty_graph.py"
FAULTS = {"A02": "raise", "A05": "raise", "B01": "raise", "A08": "exit", "B04": "memory", "B07": "sleep"}
CORRUPT = "B10"


@pytest.fixture
def faults(tmp_path, monkeypatch):
    """The fault switch file; workers inherit the variable when the cluster spawns them."""
    path = tmp_path / "faults.json"
    monkeypatch.setenv("HCS_DASK_TEST_FAULTS", str(path))
    return path


def _expected(plate, well_name):
    well = plate.well(well_name)
    planes = [tifffile.imread(f"{plate.root}/{p}") for _, p in well.files]
    return np.max(planes, axis=0)


def _written(output: Path, well: str) -> np.ndarray:
    row, column = well[0], int(well[1:])
    return zarr.open_array(output / row / str(column) / "0" / "0", mode="r")[0, 0]


def _listed_images(output: Path, well: str) -> list:
    group = zarr.open_group(output / well[0] / str(int(well[1:])), mode="r")
    return group.attrs["ome"]["well"]["images"]


def _validate(output: Path) -> None:
    import ome_zarr_models

    assert type(ome_zarr_models.open_ome_zarr(output)).__name__ == "HCS"


@pytest.mark.slow
def test_every_fault_is_its_own_record_and_resume_completes(tmp_path, faults):
    root = write_synthetic_plate(tmp_path / "plate", wells=24, sites=1, channels=1, z=2, size=64, seed=11)
    plate = open_plate(root)
    victim = next(root / p for k, p in plate.well(CORRUPT).files)
    pristine = victim.read_bytes()
    victim.write_bytes(pristine[: len(pristine) // 2])
    faults.write_text(json.dumps(FAULTS))
    pipeline = load_pipeline(GRAPH)
    output = tmp_path / "faulty.ome.zarr"

    result = run_plate(open_plate(root), pipeline, output, n_workers=2, memory_limit="700MB",
                       well_timeout=8, worker_death_retries=1, progress=False)

    by_well = {r.well: r for r in result.wells}
    for well in ("A02", "A05", "B01"):
        assert by_well[well].status == "failed" and "injected failure" in by_well[well].error
        assert by_well[well].step == "faulty_max" and "faulty_max" in by_well[well].traceback
    assert by_well["A08"].status == "worker_died" and "exited with status 1" in by_well["A08"].cause
    assert by_well["A08"].attempts == 2  # one retry of a worker death, by default
    assert by_well["B04"].status == "worker_died" and by_well["B04"].cause.startswith("memory")
    assert by_well["B07"].status == "timeout" and "well_timeout" in by_well["B07"].cause
    assert by_well[CORRUPT].status == "failed" and str(victim) in by_well[CORRUPT].error
    faulty = set(FAULTS) | {CORRUPT}
    for well in set(by_well) - faulty:
        assert by_well[well].status == "ok", by_well[well]
        np.testing.assert_array_equal(_written(output, well), _expected(plate, well))
    _validate(output)
    records = Manifest(output).read_wells()
    assert {w: r["status"] for w, r in records.items()} == {w: r.status for w, r in by_well.items()}
    for well in faulty:
        assert _listed_images(output, well) == []

    ok_files = {p: p.stat().st_mtime_ns for w in set(by_well) - faulty
                for p in (output / w[0] / str(int(w[1:]))).rglob("*") if p.is_file()}
    faults.write_text("{}")
    victim.write_bytes(pristine)
    resumed = run_plate(open_plate(root), pipeline, output, resume=True, n_workers=2, progress=False)
    assert resumed.counts() == {"ok": 24}
    assert {p: p.stat().st_mtime_ns for p in ok_files} == ok_files

    clean = tmp_path / "clean.ome.zarr"
    assert run_plate(open_plate(root), pipeline, clean, n_workers=2, progress=False).ok
    for well in by_well:
        field = f"{well[0]}/{int(well[1:])}/0"
        levels = [d["path"] for d in zarr.open_group(clean / field, mode="r").attrs["ome"]["multiscales"][0]["datasets"]]
        for level in levels:
            np.testing.assert_array_equal(zarr.open_array(output / field / level, mode="r")[:],
                                          zarr.open_array(clean / field / level, mode="r")[:])
    _validate(output)


def test_resume_refuses_another_pipeline_or_plate(tmp_path, faults, client):
    root = write_synthetic_plate(tmp_path / "plate", wells=2, sites=1, channels=1, z=2, size=32, seed=2)
    output = tmp_path / "o.ome.zarr"
    assert run_plate(open_plate(root), load_pipeline(GRAPH), output, client=client).ok
    with pytest.raises(ResumeError, match="pipeline differs"):
        run_plate(open_plate(root), load_pipeline("max_projection"), output, resume=True, client=client)
    other = write_synthetic_plate(tmp_path / "other", wells=3, sites=1, channels=1, z=2, size=32, seed=2)
    with pytest.raises(ResumeError, match="plate differs"):
        run_plate(open_plate(other), load_pipeline(GRAPH), output, resume=True, client=client)
    with pytest.raises(ResumeError, match="no earlier hcs_dask run"):
        run_plate(open_plate(root), load_pipeline(GRAPH), tmp_path / "never.ome.zarr", resume=True, client=client)


def test_output_error_fails_only_the_affected_well(tmp_path, faults, client):
    from hcs_dask.compile import compile_plate
    from hcs_dask.driver import submit_graph

    root = write_synthetic_plate(tmp_path / "plate", wells=3, sites=1, channels=1, z=2, size=32, seed=4)
    graph = compile_plate(open_plate(root), load_pipeline(GRAPH), tmp_path / "o.ome.zarr")
    # A file where well A02's field folder must go: the OS refuses, and the well says so.
    (Path(graph.output) / "A" / "2" / "0").write_text("in the way")
    result = submit_graph(graph, client).result()
    by_well = {r.well: r for r in result.wells}
    assert by_well["A01"].ok and by_well["A03"].ok
    failed = by_well["A02"]
    assert failed.status == "failed" and failed.step == "write"
    assert "A/2/0" in failed.error  # zarr names the path it could not write


def _start_slow_run(tmp_path, faults, *, wells: int, seed: int):
    """``hcs-dask run`` as a separate process on a plate whose wells take a second each."""
    root = write_synthetic_plate(tmp_path / "plate", wells=wells, sites=1, channels=1, z=2, size=32, seed=seed)
    faults.write_text(json.dumps({w.name: "slow" for w in open_plate(root).wells}))
    output = tmp_path / "run.ome.zarr"
    process = subprocess.Popen(
        [sys.executable, "-m", "hcs_dask.cli", "run", str(GRAPH), str(root), "-o", str(output), "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ),
    )
    return root, output, process


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_sigkill_of_the_run_leaves_a_valid_store_and_no_workers(tmp_path, faults):
    root, output, process = _start_slow_run(tmp_path, faults, wells=12, seed=5)
    manifest = Manifest(output)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        statuses = [r.get("status") for r in manifest.read_wells().values()]
        if statuses.count("ok") >= 3:
            break
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("the run made no progress")
    family = _children(process.pid)
    assert family, "the embedded cluster's processes should be children of the run"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"orphans after 30 s: {[(p.pid, p.name()) for p in alive]}"

    _validate(output)
    records = manifest.read_wells()
    ok = {w for w, r in records.items() if r["status"] == "ok"}
    assert 3 <= len(ok) < 12
    for well in records:
        listed = _listed_images(output, well)
        if well in ok:
            assert listed == [{"path": "0"}]
            assert _written(output, well).shape == (32, 32)
        else:
            assert listed == []  # a half-written well is referenced by nothing

    faults.write_text("{}")
    completed = subprocess.run(
        [sys.executable, "-m", "hcs_dask.cli", "run", str(GRAPH), str(root), "-o", str(output), "--workers", "2",
         "--resume"], capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, completed.stderr
    assert {r["status"] for r in manifest.read_wells().values()} == {"ok"}
    _validate(output)


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_its_cluster(tmp_path, faults):
    _, output, process = _start_slow_run(tmp_path, faults, wells=8, seed=6)
    manifest = Manifest(output)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "ok" not in [r.get("status") for r in manifest.read_wells().values()]:
        time.sleep(0.2)
    family = _children(process.pid)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) != 0
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"orphans after Ctrl-C: {[(p.pid, p.name()) for p in alive]}"
    _validate(output)


def test_a_stalled_run_says_which_wells_are_stuck_where(tmp_path, faults, caplog):
    root = write_synthetic_plate(tmp_path / "plate", wells=2, sites=1, channels=1, z=2, size=32, seed=7)
    faults.write_text(json.dumps({"A01": "sleep"}))
    with caplog.at_level("WARNING", logger="hcs_dask"):
        result = run_plate(open_plate(root), load_pipeline(GRAPH), tmp_path / "s.ome.zarr", n_workers=1,
                           well_timeout=6, stall_timeout=2, progress=False)
    assert result["A01"].status == "timeout" and result["A02"].ok
    stalls = [r.getMessage() for r in caplog.records if "no well has finished" in r.getMessage()]
    assert stalls and "A01 on tcp://" in stalls[0]


def test_a_cluster_restart_mid_run_returns_with_every_well_marked(tmp_path, faults):
    import threading

    from hcs_dask.cluster import connect

    root = write_synthetic_plate(tmp_path / "plate", wells=6, sites=1, channels=1, z=2, size=32, seed=8)
    faults.write_text(json.dumps({w.name: "slow" for w in open_plate(root).wells}))
    output = tmp_path / "r.ome.zarr"
    with connect(n_workers=2) as client:
        def restart_soon():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not Manifest(output).read_wells():
                time.sleep(0.1)
            client.restart()

        restarter = threading.Thread(target=restart_soon)
        restarter.start()
        result = run_plate(open_plate(root), load_pipeline(GRAPH), output, client=client, progress=False)
        restarter.join()
    assert len(result.wells) == 6
    assert set(result.counts()) <= {"ok", "cancelled", "worker_died"}
