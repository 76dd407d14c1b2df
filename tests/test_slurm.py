"""A real SLURM on this machine (tests/slurm/start_slurm.sh): plates through ``hcs-dask run --cluster slurm``.

A plate runs in 2 jobs, one of which is ``scancel``-ed while a well runs on it: every well
still ends ``ok``, and no job is left when the command ends. A SIGTERM or SIGINT of the
client cancels the jobs too. Where SLURM cannot be started the tests skip and say why,
except under ``CI=true``, where that fails them. Timings are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from hcs_dask.formats import write_synthetic_plate
from hcs_dask.store import Manifest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "slurm" / "start_slurm.sh"
GRAPH = Path(__file__).parent / "faulty_graph.py"
HCS_DASK = Path(sys.executable).parent / "hcs-dask"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"SLURM is required under CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm() -> str:
    """SLURM up on this machine; the start script's line of timings."""
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        _unavailable("dask-jobqueue is not installed (pip install -e '.[test]')")
    if shutil.which("sbatch") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        _unavailable("sbatch is absent and SLURM cannot be installed here (needs root and apt-get)")
    started = time.monotonic()
    try:
        run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        _unavailable(f"{SCRIPT} did not finish within 900 s")
    if run.returncode != 0:
        _unavailable(f"{SCRIPT} failed: {(run.stderr or run.stdout).strip()[-1000:]}")
    line = f"{run.stdout.strip()} (script {time.monotonic() - started:.1f} s)"
    print(f"\n{line}")
    return line


def _environment(faults: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "MALLOC_TRIM_THRESHOLD_"}
    return {
        **env,
        # The scheduler, its dashboard and the workers on the loopback interface only.
        "DASK_JOBQUEUE__SLURM__SCHEDULER_OPTIONS": '{"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}',
        "DASK_JOBQUEUE__SLURM__INTERFACE": "lo",
        "HCS_DASK_TEST_FAULTS": str(faults),  # jobs inherit the submitter's environment (sbatch --export=ALL)
    }


def _jobs(name: str) -> dict[str, str]:
    """``{job id: state}`` of this test's jobs, as squeue shows them."""
    listed = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    return dict(line.split() for line in listed.stdout.splitlines() if line.strip())


def _worker_jobs(logs: Path) -> dict[str, str]:
    """``{worker address: job id}`` from the jobs' logs (dask-worker-<id>.err) of workers that registered."""
    found = {}
    for log in logs.glob("*.err"):
        text = log.read_text(errors="replace")
        address = re.search(r"Start worker at:\s+(tcp://\S+)", text)
        if address and "Registered to:" in text:
            found[address.group(1)] = log.stem.rsplit("-", 1)[-1]
    return found


def _wait(predicate, timeout: float, what: str, process: subprocess.Popen, output: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            pytest.fail(f"hcs-dask ended (exit {process.returncode}) before {what}: {_tail(output)}")
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"no {what} within {timeout:g} s: {_tail(output)}")


def _tail(output: Path) -> str:
    return output.read_text(errors="replace")[-3000:] if output.exists() else ""


def _no_jobs_left(name: str, timeout: float = 30) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (left := _jobs(name)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _start_run(tmp_path: Path, wells: int, *extra: str, walltime: str = "00:10:00"):
    plate = write_synthetic_plate(tmp_path / "plate", wells=wells, sites=1, channels=1, z=2, size=64, seed=2)
    faults = tmp_path / "faults.json"
    from hcs_dask import open_plate

    faults.write_text(json.dumps({well.name: "slow" for well in open_plate(plate).wells}))  # 1 s per well
    name = f"hcs-test-{uuid.uuid4().hex[:8]}"
    logs, log = tmp_path / "logs", tmp_path / "hcs-dask.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [str(HCS_DASK), "run", str(GRAPH), str(plate), "-o", str(tmp_path / "out.ome.zarr"), "--cluster", "slurm",
             "--jobs", "2", "--cluster-option", "cores=1", "--cluster-option", "memory=1GB",
             "--cluster-option", f"walltime={walltime}", "--cluster-option", f"job_name={name}",
             "--cluster-option", f"log_directory={logs}", *extra],
            stdout=handle, stderr=subprocess.STDOUT, env=_environment(faults), cwd=tmp_path)
    return process, name, logs, log


def test_a_plate_through_slurm_with_one_job_killed_mid_run(slurm, tmp_path):
    summary = tmp_path / "summary.json"
    start = time.monotonic()
    # 40 one-second wells: after the kill, the other job alone needs longer than the
    # replacement takes to be submitted (lost-worker-timeout, 15 s, plus a check).
    process, name, logs, log = _start_run(tmp_path, 40, "--summary", str(summary))
    output = tmp_path / "out.ome.zarr"
    try:
        _wait(lambda: list(_jobs(name).values()) == ["RUNNING"] * 2, 120, "2 running jobs", process, log)
        running_at = time.monotonic() - start
        workers = _wait(lambda: (found := _worker_jobs(logs)) and len(found) == 2 and found, 180,
                        "2 connected workers", process, log)
        connected_at = time.monotonic() - start

        def busy_job():
            records = Manifest(output).read_wells()
            busy = [r for r in records.values() if r.get("status") == "running" and r.get("worker") in workers]
            done = sum(r.get("status") == "ok" for r in records.values())
            return done >= 1 and busy and (workers[busy[0]["worker"]], busy[0]["well"], done)

        job, well, done_before = _wait(busy_job, 120, "a well running after the first ok well", process, log)
        subprocess.run(["scancel", job], check=True, timeout=30)
        killed_at = time.monotonic() - start
        process.wait(300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    finished_at = time.monotonic() - start
    left = _no_jobs_left(name)
    data = json.loads(summary.read_text())
    attempts = {w["well"]: w["attempts"] for w in data["wells"]}
    retried = {well: n for well, n in attempts.items() if n != 1}
    print(f"\nslurm: {slurm}\n  2 jobs running at {running_at:.1f} s, 2 workers connected at {connected_at:.1f} s; "
          f"job {job} scancelled at {killed_at:.1f} s while {well} ran on it ({done_before} wells ok by then); "
          f"plate done at {finished_at:.1f} s: {data['counts']}; wells with more than 1 attempt {retried}; "
          f"wells per worker {sorted(Counter(w['worker'] for w in data['wells']).values())}")
    assert process.returncode == 0, _tail(log)
    assert data["counts"] == {"ok": 40}, _tail(log)
    assert attempts[well] <= 2  # the killed well ran again, once, elsewhere
    replaced = re.search(r"SLURM job\(s\) SLURMCluster-\d ended; submitting 1 replacement\(s\)", log.read_text())
    assert replaced, _tail(log)
    assert not left, f"jobs left after the run: {left}"


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_client_cancels_the_jobs(slurm, tmp_path, sent):
    process, name, logs, log = _start_run(tmp_path, 40)
    try:
        _wait(lambda: list(_jobs(name).values()) == ["RUNNING"] * 2, 120, "2 running jobs", process, log)
        _wait(lambda: len(_worker_jobs(logs)) >= 1, 180, "a connected worker", process, log)
        process.send_signal(sent)
        process.wait(120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    left = _no_jobs_left(name)
    assert process.returncode != 0, _tail(log)
    if sent == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM, _tail(log)
    assert not left, f"jobs left after {sent.name}: {left}"


def test_run_plate_with_cluster_slurm_from_python(slurm, tmp_path, monkeypatch):
    from hcs_dask import load_pipeline, open_plate, run_plate

    plate = write_synthetic_plate(tmp_path / "plate", wells=4, sites=1, channels=1, z=2, size=64, seed=3)
    name = f"hcs-test-{uuid.uuid4().hex[:8]}"
    for variable, value in _environment(tmp_path / "no-faults.json").items():
        monkeypatch.setenv(variable, value)
    result = run_plate(open_plate(plate), load_pipeline(str(GRAPH)), tmp_path / "out.ome.zarr", cluster="slurm",
                       cluster_options={"jobs": 1, "cores": 1, "memory": "1GB", "job_name": name,
                                        "log_directory": str(tmp_path / "logs")}, progress=False)
    assert [well.status for well in result.wells] == ["ok"] * 4
    assert not _no_jobs_left(name)


def test_a_refused_submission_exits_2_with_the_batch_system_s_words(slurm, tmp_path):
    process, name, logs, log = _start_run(tmp_path, 4, "--cluster-option", "queue=no-such-partition")
    try:
        process.wait(120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    text = log.read_text()
    assert process.returncode == 2, _tail(log)
    assert "error: SLURM refused the job submission" in text and "invalid partition" in text.lower()
    assert not _no_jobs_left(name)
