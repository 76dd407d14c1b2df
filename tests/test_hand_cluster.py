"""A cluster started by hand (``dask scheduler``, ``dask worker --preload hcs_dask.plugin``), as docs/CLUSTERS.md says.

Scheduler and workers are separate processes on 127.0.0.1. A plate runs through
``hcs-dask run --scheduler FILE`` and ``run_plate(client=...)``; the preloaded plugin
counts tasks; a worker SIGKILLed mid-run costs no well; and each check of
:func:`hcs_dask.preflight.check_cluster_ready` fails with its own sentence on a cluster
that has the problem, writing nothing.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cloudpickle
import dask
import pytest
from distributed import Client, Security

from hcs_dask import load_pipeline, run_plate
from hcs_dask.formats import write_synthetic_plate
from hcs_dask.plugin import CleanupPlugin, cleanup_stats
from hcs_dask.preflight import (
    GpuResourceError,
    NoWorkersError,
    OutputNotWritableError,
    VersionMismatchError,
    check_cluster_ready,
    check_versions,
)

# Separate processes cannot import this test module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

BIN = Path(sys.executable).parent
GRAPH = Path(__file__).parent / "faulty_graph.py"
#: The worker environment docs/CLUSTERS.md gives: the nanny starts workers without MALLOC_TRIM_THRESHOLD_.
NO_MALLOC_TRIM = {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": "{'MALLOC_TRIM_THRESHOLD_': None}"}


def _environment(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "MALLOC_TRIM_THRESHOLD_"}
    return {**env, **NO_MALLOC_TRIM, **extra}


def _start(command: list, log: Path, **kwargs) -> subprocess.Popen:
    handle = open(log, "wb")
    try:
        # A session of its own, so that _stop can end the nannies' worker processes too.
        return subprocess.Popen([str(part) for part in command], stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, **kwargs)
    finally:
        handle.close()


def _stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(10)


def _start_scheduler(folder: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    scheduler_file = folder / "scheduler.json"
    process = _start([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                      "--scheduler-file", scheduler_file, *extra], folder / "scheduler.log",
                     env=env or _environment())
    deadline = time.monotonic() + 60
    while not scheduler_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            pytest.fail(f"dask scheduler did not start: {(folder / 'scheduler.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return process, scheduler_file


def _address(scheduler_file: Path) -> str:
    return json.loads(scheduler_file.read_text())["address"]


def _slow_faults(path: Path, wells) -> None:
    path.write_text(json.dumps({well: "slow" for well in wells}))


class HandCluster:
    def __init__(self, folder: Path, scheduler_file: Path, faults: Path) -> None:
        self.folder, self.scheduler_file, self.faults = folder, scheduler_file, faults

    def client(self) -> Client:
        client = Client(scheduler_file=str(self.scheduler_file), timeout="20s")
        client.wait_for_workers(2, timeout=60)
        return client


@pytest.fixture(scope="module")
def hand_cluster(tmp_path_factory):
    """``dask scheduler`` and one ``dask worker --nworkers 2 --nthreads 1 --preload hcs_dask.plugin``."""
    folder = tmp_path_factory.mktemp("hand")
    faults = folder / "faults.json"
    faults.write_text("{}")
    scheduler, scheduler_file = _start_scheduler(folder)
    workers = _start([BIN / "dask", "worker", "--host", "127.0.0.1", "--nworkers", "2", "--nthreads", "1",
                      "--no-dashboard", "--preload", "hcs_dask.plugin", "--local-directory", folder / "work",
                      "--scheduler-file", scheduler_file], folder / "workers.log",
                     env=_environment(HCS_DASK_TEST_FAULTS=str(faults)))
    try:
        cluster = HandCluster(folder, scheduler_file, faults)
        with cluster.client():
            pass
        yield cluster
    finally:
        _stop(workers, scheduler)


def _plate(folder: Path, wells: int):
    return write_synthetic_plate(folder / "plate", wells=wells, sites=1, channels=1, z=2, size=64, seed=1)


def _registered_on_scheduler(dask_scheduler) -> list[str]:
    return list(dask_scheduler.worker_plugins)


# ------------------------------------------------------------------ the runs
def test_the_preloaded_plugin_cleans_after_tasks_nobody_registered_it_for(hand_cluster):
    with hand_cluster.client() as client:
        # Before any run: the scheduler knows no plugin, so what runs on the workers is the preload's.
        assert CleanupPlugin.name not in client.run_on_scheduler(_registered_on_scheduler)
        assert client.gather(client.map(operator.neg, range(20))) == [-i for i in range(20)]
        stats = cleanup_stats(client)
        environments = client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_")
    assert len(stats) == 2 and all(s["registered"] for s in stats.values())
    assert sum(s["tasks_seen"] for s in stats.values()) >= 20
    assert all(s["cleanups_run"] >= 1 for s in stats.values() if s["tasks_seen"])
    assert set(environments.values()) == {None}  # the documented worker environment took effect


def test_cli_run_through_the_scheduler_file(hand_cluster, synthetic_plate, tmp_path):
    output, summary = tmp_path / "out.ome.zarr", tmp_path / "summary.json"
    completed = subprocess.run(
        [BIN / "hcs-dask", "run", "nuclei_count", synthetic_plate, "-o", output, "--scheduler",
         hand_cluster.scheduler_file, "--summary", summary],
        capture_output=True, text=True, timeout=240, env=_environment(),
    )
    assert completed.returncode == 0, completed.stderr
    data = json.loads(summary.read_text())
    assert data["counts"] == {"ok": 4}
    assert {well["worker"] for well in data["wells"]} <= set(_workers(hand_cluster))
    with hand_cluster.client() as client:
        stats = cleanup_stats(client)
    # The run registered the plugin under the preload's name: one plugin per worker, and it saw the wells.
    assert sum(s["tasks_seen"] for s in stats.values()) >= 4
    assert all(s["backend_bytes_freed"] >= 0 and s["cleaner_errors"] == 0 for s in stats.values())


def _workers(hand_cluster) -> list[str]:
    with hand_cluster.client() as client:
        return list(client.scheduler_info(n_workers=-1)["workers"])


def test_a_worker_sigkilled_mid_run_costs_no_well(hand_cluster, tmp_path):
    plate = _plate(tmp_path, wells=8)
    from hcs_dask import open_plate

    opened = open_plate(plate)
    _slow_faults(hand_cluster.faults, [well.name for well in opened.wells])
    killed: dict[str, int] = {}
    try:
        with hand_cluster.client() as client:
            def kill_a_busy_worker() -> None:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not killed:
                    for address, keys in client.processing().items():
                        if any("hcs-well" in str(key) for key in keys):
                            pid = client.run(os.getpid, workers=[address])[address]
                            time.sleep(0.3)  # inside the well's one-second step
                            os.kill(pid, signal.SIGKILL)
                            killed[address] = pid
                            return
                    time.sleep(0.05)

            killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
            killer.start()
            result = run_plate(opened, load_pipeline(str(GRAPH)), tmp_path / "out.ome.zarr", client=client,
                               progress=False)
            killer.join(30)
            client.wait_for_workers(2, timeout=60)  # the nanny restarted it
    finally:
        hand_cluster.faults.write_text("{}")
    assert killed, "no worker was seen running a well"
    assert [well.status for well in result.wells] == ["ok"] * 8, [(w.well, w.status, w.error) for w in result.wells]


# ---------------------------------------------------------------- preflight
def _nothing_written(folder: Path, output: Path) -> None:
    assert not output.exists()
    assert not [path.name for path in folder.iterdir() if path.name.startswith(".hcs-dask-probe")]


def test_preflight_facts_of_the_hand_cluster(hand_cluster, tmp_path):
    output = tmp_path / "out.ome.zarr"
    with hand_cluster.client() as client:
        facts = check_cluster_ready(client, pipeline=load_pipeline("nuclei_count"), output=output)
        check_versions(client.get_versions(packages=["hcs-dask", "zarr", "numpy", "cloudpickle", "msgpack"]))
    _nothing_written(tmp_path, output)
    assert facts.n_workers == 2 and facts.threads == 2 and facts.gpu_slots == 0
    # A scheduler started by hand keeps Dask's defaults; the run must know them.
    assert facts.allowed_failures == dask.config.get("distributed.scheduler.allowed-failures")
    assert facts.worker_saturation == float(dask.config.get("distributed.scheduler.worker-saturation"))
    assert facts.all_nannies and all(worker.cleanup_plugin for worker in facts.workers)
    assert facts.probed_hosts == (socket.gethostname(),)
    sentence = facts.assumes()
    assert f"allowed-failures {facts.allowed_failures}" in sentence and "2 workers (2 threads" in sentence


def test_preflight_no_workers(tmp_path):
    scheduler, scheduler_file = _start_scheduler(tmp_path)
    output = tmp_path / "out.ome.zarr"
    try:
        with Client(scheduler_file=str(scheduler_file), timeout="20s") as client:
            with pytest.raises(NoWorkersError, match=r"no worker joined the scheduler at tcp://127\.0\.0\.1:\d+ "
                                                     r"within 1 s; start workers with `dask worker"):
                check_cluster_ready(client, pipeline=load_pipeline("nuclei_count"), output=output, wait=1)
    finally:
        _stop(scheduler)
    _nothing_written(tmp_path, output)


def test_preflight_gpu_pipeline_without_a_gpu_resource(hand_cluster, tmp_path):
    output = tmp_path / "out.ome.zarr"
    with hand_cluster.client() as client:
        with pytest.raises(GpuResourceError, match=r"pipeline 'nuclei_count' has GPU steps \(.+\) but none of the "
                                                   r"2 worker\(s\) at tcp://127\.0\.0\.1:\d+ offers the GPU resource"):
            check_cluster_ready(client, pipeline=load_pipeline("nuclei_count", device="gpu"), output=output)
    _nothing_written(tmp_path, output)


def test_preflight_gpu_pipeline_with_a_gpu_resource_on_the_embedded_cluster(tmp_path):
    from hcs_dask.cluster import connect

    # A resource is only a label to the scheduler: a CPU worker that offers GPU=1 passes this check.
    with connect(n_workers=1, resources={"GPU": 1}) as gpu_client:
        facts = check_cluster_ready(gpu_client, pipeline=load_pipeline("nuclei_count", device="gpu"),
                                    output=tmp_path / "out.ome.zarr")
    assert facts.gpu_slots == 1 and "1 GPU slot" in facts.assumes()
    # connect()'s own scheduler: deaths reported at once, one well per thread.
    assert (facts.allowed_failures, facts.worker_saturation) == (0, 1.0)
    assert "allowed-failures 0" in facts.assumes()


def test_preflight_versions_that_break_the_run():
    def side(**packages):
        base = {"python": "3.11.7.final.0", "dask": "2026.8.0", "distributed": "2026.8.0", "cloudpickle": "3.1.3",
                "msgpack": "1.2.4", "numpy": "2.4.6", "zarr": "3.1.6", "hcs-dask": "0.1.0"}
        return {"host": {}, "packages": {**base, **packages}}

    same = {"client": side(), "scheduler": side(),
            "workers": {"tcp://127.0.0.1:1": side(), "tcp://127.0.0.1:2": side()}}
    check_versions(same)
    # Patch releases of python, numpy and zarr, and a scheduler without zarr, break nothing.
    check_versions({"client": side(), "scheduler": side(python="3.11.9.final.0", zarr=None),
                    "workers": {"tcp://127.0.0.1:1": side(numpy="2.3.0", zarr="3.0.8")}})
    one = "tcp://127.0.0.1:1"
    cases = [
        ({"scheduler": side(distributed="2026.7.1")},
         r"distributed 2026\.8\.0 on the client and 2 workers \(tcp://127\.0\.0\.1:1, tcp://127\.0\.0\.1:2\), "
         r"but 2026\.7\.1 on the scheduler"),
        ({"workers": {**same["workers"], one: side(python="3.12.1.final.0")}},
         r"python 3\.11 on the client, the scheduler and worker tcp://127\.0\.0\.1:2, "
         r"but 3\.12 on worker tcp://127\.0\.0\.1:1"),
        ({"workers": {one: side(**{"hcs-dask": None})}},
         r"hcs-dask 0\.1\.0 on .*, but not installed on worker tcp://127\.0\.0\.1:1"),
        ({"scheduler": side(**{"hcs-dask": None})},
         r"hcs-dask 0\.1\.0 on the client and 2 workers \(.+\), but not installed on the scheduler\. "),
        ({"workers": {one: side(numpy="1.26.4")}}, r"numpy 2 on .*, but 1 on worker"),
        ({"workers": {one: side(zarr="2.18.0")}}, r"zarr 3 on .*, but 2 on worker"),
        ({"workers": {one: side(cloudpickle="2.2.1")}}, r"cloudpickle 3\.1 on .*, but 2\.2 on worker"),
    ]
    for change, message in cases:
        with pytest.raises(VersionMismatchError, match="package versions differ in a way that breaks the run: "
                           + message):
            check_versions({**same, **change})


def _as_nobody_works() -> str | None:
    """Why a worker cannot be run as user nobody here (None when it can)."""
    if os.geteuid() != 0:
        return "running a worker as another user needs root"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                            "import hcs_dask.plugin"], capture_output=True, text=True, timeout=60, cwd="/")
    if probe.returncode != 0:
        return f"user nobody cannot import hcs_dask from {sys.executable}: {probe.stderr.strip()[-300:]}"
    return None


def test_preflight_output_a_worker_cannot_write(tmp_path):
    reason = _as_nobody_works()
    if reason:
        pytest.skip(reason)
    # A folder the client (root) writes and every user may enter, but only root may write in.
    shared = Path(tempfile.mkdtemp(prefix="hcs-preflight-"))
    home = Path(tempfile.mkdtemp(prefix="hcs-nobody-"))
    try:
        shared.chmod(0o755)
        home.chmod(0o777)
        scheduler, scheduler_file = _start_scheduler(tmp_path)
        # --no-nanny: a nanny run through setpriv cannot spawn its worker (the child exits 255 at once).
        worker = _start(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", BIN / "dask", "worker",
                         _address(scheduler_file), "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard",
                         "--no-nanny", "--preload", "hcs_dask.plugin", "--local-directory", home],
                        home / "worker.log", env=_environment(HOME=str(home)), cwd=home)
        output = shared / "out.ome.zarr"
        try:
            with Client(scheduler_file=str(scheduler_file), timeout="20s") as client:
                client.wait_for_workers(1, timeout=60)
                with pytest.raises(OutputNotWritableError) as raised:
                    check_cluster_ready(client, pipeline=load_pipeline("nuclei_count"), output=output, wait=30)
        finally:
            _stop(worker, scheduler)
        message = str(raised.value)
        assert f"the output's folder {shared} is not writable from every worker" in message
        assert "uid 65534" in message and f"cannot create a file in {shared}: Permission denied" in message
        _nothing_written(shared, output)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def test_preflight_output_on_another_file_system(hand_cluster, tmp_path):
    """A worker that sees a folder of the same name, but not the client's file in it, is another file system."""
    from hcs_dask.preflight import _probe_folder

    (tmp_path / ".hcs-dask-probe-x").write_text("the other machine's token")
    answer = _probe_folder(str(tmp_path), ".hcs-dask-probe-x", "this client's token")
    assert answer == f"sees another file in {tmp_path} than the client wrote: not the client's file system"
    absent = tmp_path / "absent"
    assert _probe_folder(str(absent), "m", "t") == f"does not see {absent} (no such folder on its host)"


# ---------------------------------------------------------------------- TLS
def test_tls_scheduler_through_the_command_line(tmp_path, synthetic_plate):
    security = Security.temporary()  # one self-signed certificate: its own CA
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text(security.tls_scheduler_cert)
    key.write_text(security.tls_scheduler_key)
    tls = ["--tls-ca-file", cert, "--tls-cert", cert, "--tls-key", key]
    scheduler, scheduler_file = _start_scheduler(tmp_path, "--protocol", "tls", *tls)
    worker = _start([BIN / "dask", "worker", "--scheduler-file", scheduler_file, "--host", "127.0.0.1",
                     "--nthreads", "1", "--no-dashboard", "--preload", "hcs_dask.plugin", *tls],
                    tmp_path / "worker.log", env=_environment())
    try:
        assert _address(scheduler_file).startswith("tls://127.0.0.1:")
        output = tmp_path / "out.ome.zarr"
        completed = subprocess.run(
            [BIN / "hcs-dask", "run", "nuclei_count", synthetic_plate, "-o", output, "--scheduler", scheduler_file,
             *tls], capture_output=True, text=True, timeout=240, env=_environment(),
        )
        assert completed.returncode == 0, completed.stderr
        assert "4 ok" in completed.stdout
        # The same from Python, with the Dask config's TLS settings instead of the options.
        with dask.config.set({"distributed.comm.tls.ca-file": str(cert), "distributed.comm.tls.client.cert": str(cert),
                              "distributed.comm.tls.client.key": str(key)}):
            with Client(scheduler_file=str(scheduler_file), timeout="20s") as client:
                client.wait_for_workers(1, timeout=60)
                stats = cleanup_stats(client)
        assert sum(s["tasks_seen"] for s in stats.values()) >= 4
    finally:
        _stop(worker, scheduler)


def test_tls_options_need_a_ca_and_a_certificate(tmp_path, synthetic_plate):
    from click.testing import CliRunner

    from hcs_dask.cli import main

    key = tmp_path / "key.pem"
    key.write_text("not used")
    output = tmp_path / "out.ome.zarr"
    result = CliRunner().invoke(main, ["run", "nuclei_count", str(synthetic_plate), "-o", str(output),
                                       "--scheduler", "tls://127.0.0.1:1", "--tls-key", str(key)])
    assert result.exit_code == 2 and "TLS needs --tls-ca-file and --tls-cert" in result.output
    assert not output.exists()
