"""The plate run you can hold (submit, watch, cancel, resume), interrupts, and run options
that are refused before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dask
import pytest
from click.testing import CliRunner

from hcs_dask import OptionError, PlateRun, load_pipeline, open_plate, run_plate, submit_plate
from hcs_dask.cli import main
from hcs_dask.formats import write_synthetic_plate
from hcs_dask.options import ClusterSpec, RunPolicy
from hcs_dask.store import Manifest

GRAPH = Path(__file__).parent / "faulty_graph.py"


@pytest.fixture
def slow_plate(tmp_path, monkeypatch):
    """Six wells of one second each (the fault switch is read by the workers)."""
    root = write_synthetic_plate(tmp_path / "plate", wells=6, sites=1, channels=1, z=2, size=32, seed=2)
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({w.name: "slow" for w in open_plate(root).wells}))
    monkeypatch.setenv("HCS_DASK_TEST_FAULTS", str(faults))
    return root


@pytest.mark.slow
def test_submit_watch_cancel_and_resume(slow_plate, tmp_path):
    output = tmp_path / "o.ome.zarr"
    run = submit_plate(slow_plate, GRAPH, output, n_workers=1)  # a path and a pipeline file, as the CLI takes
    assert isinstance(run, PlateRun) and not run.done
    assert run.dashboard_link and run.dashboard_link.startswith("http")
    deadline = time.monotonic() + 60
    while run.status().get("running", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    status = run.status()
    assert status["running"] == 1 and status["queued"] >= 1, status
    bar = run.progress()
    assert bar.total == 6
    assert "PlateRun" in repr(run) and "<b>" in run._repr_html_()
    run.cancel(grace=5)
    assert run.done
    result = run.result()
    counts = result.counts()
    assert counts.get("cancelled", 0) >= 1 and sum(counts.values()) == 6, counts
    records = Manifest(output).read_wells()
    assert {r["status"] for r in records.values()} <= {"ok", "cancelled"}
    assert {w: r["status"] for w, r in records.items()} == {r.well: r.status for r in result.wells}

    resumed = run_plate(slow_plate, GRAPH, output, resume=True, n_workers=2, progress=False)
    assert resumed.counts() == {"ok": 6}


@pytest.mark.slow
def test_wait_with_a_timeout_then_result(slow_plate, tmp_path):
    run = submit_plate(open_plate(slow_plate), load_pipeline(GRAPH), tmp_path / "o.ome.zarr", n_workers=2)
    with pytest.raises(TimeoutError, match="not finished"):
        run.wait(timeout=0.2)
    assert run.result().counts() == {"ok": 6}
    assert run.wait().counts() == {"ok": 6}


@pytest.mark.slow
def test_an_interrupt_to_the_process_group_cancels_cleanly_and_resume_completes(slow_plate, tmp_path):
    # A notebook's stop button signals the kernel's whole process group, workers included.
    output = tmp_path / "o.ome.zarr"
    script = tmp_path / "interrupted.py"
    script.write_text(textwrap.dedent(f'''
        from hcs_dask import run_plate
        if __name__ == "__main__":
            try:
                run_plate({str(slow_plate)!r}, {str(GRAPH)!r}, {str(output)!r}, n_workers=2, progress=False)
            except KeyboardInterrupt:
                print("INTERRUPTED", flush=True)
    '''))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ), start_new_session=True)
    manifest = Manifest(output)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "ok" not in [r.get("status") for r in manifest.read_wells().values()]:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "INTERRUPTED" in stdout
    assert "KeyboardInterrupt" not in stderr, stderr  # no worker printed one
    statuses = {r["status"] for r in manifest.read_wells().values()}
    assert statuses <= {"ok", "cancelled"} and "cancelled" in statuses
    assert run_plate(slow_plate, GRAPH, output, resume=True, n_workers=2, progress=False).counts() == {"ok": 6}


@pytest.mark.parametrize(("args", "named"), [
    (["--memory-limit", "4gigs"], "memory_limit (--memory-limit)='4gigs' is not a size"),
    (["--memory-limit", "4"], "too small to start a worker"),
    (["--memory-limit", "1MB"], "too small to start a worker"),
    (["--workers", "-1"], "n_workers (--workers) must be a whole number >= 1"),
    (["--workers", "0"], "n_workers (--workers) must be a whole number >= 1"),
    (["--threads-per-worker", "0"], "threads_per_worker (--threads-per-worker) must be a whole number >= 1"),
    (["--well-timeout", "0"], "well_timeout (--well-timeout) must be a number of seconds > 0"),
    (["--resume", "--overwrite"], "overwrite (--overwrite) and resume (--resume) contradict"),
    (["--scheduler", "tcp://127.0.0.1:9"], "cannot reach the Dask scheduler at tcp://127.0.0.1:9"),
], ids=["memory-unit", "memory-4-bytes", "memory-1MB", "workers-negative", "workers-zero", "threads-zero",
        "timeout-zero", "resume-overwrite", "unreachable-scheduler"])
def test_bad_run_options_exit_2_naming_the_option_and_write_nothing(tmp_path, args, named, synthetic_source):
    output = tmp_path / "out.ome.zarr"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        outcome = CliRunner().invoke(main, ["run", "max_projection", str(synthetic_source), "-o", str(output),
                                            *args])
    assert outcome.exit_code == 2, outcome.output
    assert named in outcome.output
    assert "Traceback" not in outcome.output
    assert not output.exists()


def test_option_dataclasses_validate_when_built():
    with pytest.raises(OptionError, match="n_workers"):
        ClusterSpec(n_workers=-1)
    with pytest.raises(OptionError, match="either client= or scheduler="):
        ClusterSpec(client=object(), scheduler="tcp://127.0.0.1:8786")
    with pytest.raises(OptionError, match="stall_timeout"):
        RunPolicy(stall_timeout=float("nan"))
    with pytest.raises(OptionError, match="resources"):
        RunPolicy(resources={"GPU": 0})
    with pytest.raises(TypeError, match="unknown run option.*n_worker"):
        submit_plate("nowhere", "max_projection", "out.ome.zarr", n_worker=2)
    assert RunPolicy(resources={"GPU": 1}).resources == {"GPU": 1}
    assert ClusterSpec(memory_limit="2GB").embedded
