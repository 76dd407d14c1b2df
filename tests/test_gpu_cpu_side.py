"""The CPU side of GPU support: conversions, ``--cluster cuda`` checks and wiring, GPU resources.

Nothing here needs CuPy, dask-cuda, RMM or a device. Where a GPU library would answer,
a stand-in module is put into ``sys.modules`` for one test (``monkeypatch`` removes it),
or the real one is blocked with ``sys.modules[name] = None``, so that these tests give
the same answers on a GPU machine. The ordering of the RMM and CuPy cleaners is proven
in ``test_gpu_cleaners.py``.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import time
import sys
import types
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from click.testing import CliRunner
from distributed import LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

from hcs_dask import Pipeline, Step, load_pipeline, open_plate, run_plate
from hcs_dask import cluster as cluster_module
from hcs_dask.cli import main
from hcs_dask.cluster import (
    CUDA_WORKER_CONFIG,
    EMBEDDED_WORKER_PRELOAD,
    ClusterError,
    ClusterOptionError,
    check_cluster,
    connect,
    cuda_device_count,
    embedded_config,
)
from hcs_dask.memory import gpu
from hcs_dask.memory.convert import ConversionCounter, array_type_of, to_array_type, to_host
from hcs_dask.steps import max_projection

MB = 1 << 20
# Stand-ins for RMM and dask_cuda.utils in a worker process (a preload: restarted workers get it too).
FAKE_GPU_WORKER = str(Path(__file__).with_name("fake_gpu_worker.py"))


def _real_cuda_machine() -> bool:
    return cluster_module._installed("dask_cuda") and cuda_device_count()[0] > 0


def _cupy_importable() -> bool:
    return cluster_module._installed("cupy")


def _fake_module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def _no_device_sources(monkeypatch) -> None:
    """Block NVML, nvidia-smi and CuPy: no source can tell of a device."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(cluster_module.shutil, "which", lambda name, *a, **k: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _fake_nvml(monkeypatch, count: int | None, calls: list[str] | None = None) -> None:
    """A pynvml whose nvmlInit fails (count None, like a machine without a driver) or sees ``count``."""
    calls = calls if calls is not None else []

    class NVMLError_DriverNotLoaded(Exception):  # the name pynvml gives it
        pass

    def init() -> None:
        calls.append("init")
        if count is None:
            raise NVMLError_DriverNotLoaded("Driver Not Loaded")

    monkeypatch.setitem(sys.modules, "pynvml", _fake_module(
        "pynvml", nvmlInit=init, nvmlDeviceGetCount=lambda: count,
        nvmlShutdown=lambda: calls.append("shutdown")))


# --------------------------------------------------------------- conversions
def test_identity_conversion_returns_the_same_object_and_counts_nothing():
    counter = ConversionCounter()
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    assert to_array_type(image, "numpy", counter) is image
    assert to_host(image, counter) is image
    assert counter.as_dict() == {"conversions": 0, "host_to_device_bytes": 0, "device_to_host_bytes": 0}


def test_array_type_is_read_from_the_module_without_importing_it():
    before = set(sys.modules)
    cupy_like = type("ndarray", (), {"__module__": "cupy._core.core"})()
    torch_like = type("Tensor", (), {"__module__": "torch"})()
    assert array_type_of(np.zeros(2)) == "numpy"
    assert array_type_of(np.float32(1)) == "numpy"  # a numpy scalar is host data too
    assert array_type_of(cupy_like) == "cupy"
    assert array_type_of(torch_like) == "torch"
    assert array_type_of([1, 2]) == "numpy"
    assert not {"cupy", "torch"} & (set(sys.modules) - before)


def test_counter_counts_a_device_to_host_copy_once_with_its_bytes():
    host = np.arange(6, dtype=np.float32)

    class DeviceArray:  # what to_host needs of a CuPy array: its module, nbytes and get()
        __module__ = "cupy._core.core"
        nbytes = host.nbytes

        def get(self) -> np.ndarray:
            return host

    device = DeviceArray()
    counter = ConversionCounter()
    assert to_array_type(device, "cupy", counter) is device  # already CuPy: nothing to do
    assert to_host(device, counter) is host
    assert to_host(host, counter) is host
    assert counter.as_dict() == {"conversions": 1, "host_to_device_bytes": 0, "device_to_host_bytes": 24}


def test_a_numpy_pipeline_converts_nothing(client, synthetic_plate, tmp_path):
    result = run_plate(open_plate(synthetic_plate), load_pipeline("nuclei_count"), tmp_path / "o.ome.zarr",
                       client=client, progress=False)
    assert result.ok
    for well in result.wells:
        assert well.memory["conversions"] == {"conversions": 0, "host_to_device_bytes": 0,
                                              "device_to_host_bytes": 0}


# ------------------------------------------------------- finding CUDA devices
def test_nvml_answers_first_and_nothing_else_is_asked(monkeypatch):
    calls: list[str] = []
    _fake_nvml(monkeypatch, 2, calls)
    monkeypatch.setitem(sys.modules, "cupy", None)

    def no_nvidia_smi(name, *args, **kwargs):
        raise AssertionError("nvidia-smi asked although NVML answered")

    monkeypatch.setattr(cluster_module.shutil, "which", no_nvidia_smi)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cuda_device_count() == (2, "NVML")
    assert calls == ["init", "shutdown"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert cuda_device_count()[0] == 1


def test_cuda_visible_devices_can_hide_every_device(monkeypatch):
    _fake_nvml(monkeypatch, 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    count, source = cuda_device_count()
    assert count == 0 and "CUDA_VISIBLE_DEVICES" in source


def test_nvidia_smi_is_asked_when_nvml_cannot_start(monkeypatch, tmp_path):
    _fake_nvml(monkeypatch, None)
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1)'\necho 'GPU 1: NVIDIA H200 (UUID: GPU-2)'\n")
    script.chmod(0o755)
    real_which = shutil.which
    monkeypatch.setattr(cluster_module.shutil, "which",
                        lambda name, *a, **k: str(script) if name == "nvidia-smi" else real_which(name, *a, **k))
    assert cuda_device_count() == (2, "nvidia-smi")


def test_no_source_means_no_device_with_every_reason(monkeypatch):
    _no_device_sources(monkeypatch)
    _fake_nvml(monkeypatch, None)
    count, source = cuda_device_count()
    assert count == 0
    assert "NVMLError_DriverNotLoaded" in source and "nvidia-smi: not on PATH" in source
    assert "CuPy: not installed" in source


# ------------------------------------------------------------ --cluster cuda
@pytest.mark.skipif(_real_cuda_machine(), reason="dask-cuda and a CUDA device are here: it would start")
def test_connect_cuda_without_gpu_fails_at_once_naming_what_is_missing():
    with pytest.raises(ClusterError) as caught:
        with connect(cluster="cuda"):
            pytest.fail("a CUDA cluster started without dask-cuda or a device")
    message = str(caught.value)
    assert message.startswith("cannot start a LocalCUDACluster")
    assert "dask-cuda is not installed (pip install 'hcs-dask[gpu]')" in message or "no CUDA device" in message


def test_missing_dask_cuda_and_device_are_both_named(monkeypatch):
    _no_device_sources(monkeypatch)
    monkeypatch.setattr(cluster_module, "_installed", lambda name: False)
    with pytest.raises(ClusterError) as caught:
        check_cluster("cuda", rmm_pool_size="1GB", rmm_for_cupy=True)
    message = str(caught.value)
    assert not isinstance(caught.value, ValueError)  # something missing, not a wrong argument
    assert "dask-cuda is not installed (pip install 'hcs-dask[gpu]')" in message
    assert "RMM is not installed and rmm_pool_size, rmm_for_cupy need(s) it" in message
    assert "CuPy is not installed and rmm_for_cupy needs it" in message
    assert "no CUDA device found (NVML: nvidia-ml-py is not installed; nvidia-smi: not on PATH; " in message


def test_dask_cuda_present_but_no_device(monkeypatch):
    _no_device_sources(monkeypatch)
    _fake_nvml(monkeypatch, 0)
    monkeypatch.setattr(cluster_module, "_installed", lambda name: name == "dask_cuda")
    with pytest.raises(ClusterError, match=r"no CUDA device found \(NVML\)") as caught:
        check_cluster("cuda")
    assert "dask-cuda" not in str(caught.value)


def test_more_workers_than_devices(monkeypatch):
    _fake_nvml(monkeypatch, 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(cluster_module, "_installed", lambda name: True)
    check_cluster("cuda", n_workers=1)
    with pytest.raises(ClusterError, match="n_workers=2 but 1 CUDA device"):
        check_cluster("cuda", n_workers=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"rmm_async": True, "rmm_managed_memory": True}, "cannot be combined", id="async+managed"),
        pytest.param({"rmm_release_threshold": "1GB"}, "needs rmm_async", id="threshold-without-async"),
        pytest.param({"rmm_async": True, "rmm_pool_size": "1GB"}, "rmm_pool_size cannot be combined with rmm_async",
                     id="pool+async"),
        pytest.param({"rmm_maximum_pool_size": "2GB"}, "needs rmm_pool_size", id="maximum-without-pool"),
        pytest.param({"rmm_reinitialize_pool": True}, "rmm_reinitialize_pool needs rmm_pool_size",
                     id="reinitialize-without-pool"),
        pytest.param({"rmm_async": "yes"}, "must be True or False", id="flag-not-bool"),
        pytest.param({"rmm_pool_size": "lots"}, "is not a size", id="size-not-a-size"),
        pytest.param({"rmm_pool_size": 1.5}, "fraction of the device's memory", id="fraction-above-one"),
        pytest.param({"rmm_pool_size": -1}, "must not be negative", id="negative"),
        pytest.param({"rmm_pool_size": True}, "must be bytes", id="size-bool"),
        pytest.param({"rmm_pool": "1GB"}, "unknown RMM option", id="unknown-option"),
        pytest.param({"threads_per_worker": 2}, "threads_per_worker=2", id="threads"),
    ],
)
def test_contradicting_rmm_options_are_refused_before_anything_is_looked_up(monkeypatch, options, message):
    def not_now() -> None:
        raise AssertionError("devices looked up before the options were checked")

    monkeypatch.setattr(cluster_module, "cuda_device_count", not_now)
    monkeypatch.setattr(cluster_module, "_installed", lambda name: not_now())
    threads = options.pop("threads_per_worker", 1)
    with pytest.raises(ClusterOptionError, match=message) as caught:
        check_cluster("cuda", threads_per_worker=threads, **options)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ClusterError)
    with pytest.raises(ClusterOptionError, match=message):
        with connect(cluster="cuda", threads_per_worker=threads, **options):
            pytest.fail("started")


@pytest.mark.parametrize(
    "options",
    [
        {"rmm_pool_size": "8GB", "rmm_maximum_pool_size": 0.9, "rmm_reinitialize_pool": True},
        {"rmm_async": True, "rmm_release_threshold": "2GiB", "rmm_maximum_pool_size": "0.8"},
        {"rmm_managed_memory": True, "rmm_pool_size": 2 ** 30, "rmm_for_cupy": True},
        {"rmm_for_cupy": True},
    ],
    ids=["pool", "async", "managed", "cupy-only"],
)
def test_valid_rmm_options_pass(monkeypatch, options):
    monkeypatch.setattr(cluster_module, "_installed", lambda name: True)
    monkeypatch.setattr(cluster_module, "cuda_device_count", lambda: (1, "test"))
    check_cluster("cuda", **options)


def test_rmm_options_belong_to_the_cuda_cluster_only(client):
    with pytest.raises(ClusterOptionError, match="rmm_pool_size='1GB': RMM options apply to cluster='cuda'"):
        check_cluster("local", rmm_pool_size="1GB", rmm_async=False)
    check_cluster("local", rmm_pool_size=None, rmm_async=False)  # defaults, as the command line passes them
    with pytest.raises(ClusterOptionError, match="unknown cluster kind 'torque'"):
        check_cluster("torque")
    with pytest.raises(ClusterOptionError, match="cluster='cuda' configure.* cannot be combined with an existing client"):
        with connect(client=client, cluster="cuda"):
            pass
    with pytest.raises(ClusterOptionError, match="rmm_async=True configure.*existing scheduler"):
        with connect(scheduler="tcp://127.0.0.1:1", rmm_async=True):
            pass
    with pytest.raises(ClusterOptionError, match="cluster='cuda', rmm_pool_size='1GB' configure"):
        check_cluster("cuda", scheduler="scheduler.json", rmm_pool_size="1GB")
    # Defaults (as the command line passes them) are no options at all.
    with connect(client=client, cluster="local", rmm_async=False, rmm_pool_size=None) as same:
        assert same is client


def _install_fake_dask_cuda(monkeypatch, *, processes: bool) -> list[dict[str, Any]]:
    """dask_cuda whose LocalCUDACluster records its arguments and starts a LocalCluster instead.

    In-process workers (``processes=False``) share this process's ``sys.modules`` (the
    stand-in ``dask_cuda.utils`` included) and its cleaner registry, which the test reads.
    Worker processes get their stand-ins from the preload ``tests/fake_gpu_worker.py``.
    """
    calls: list[dict[str, Any]] = []
    recorded = {**embedded_config(), **CUDA_WORKER_CONFIG}

    class LocalCUDACluster(LocalCluster):
        def __init__(self, *, n_workers=None, threads_per_worker=1, memory_limit="auto", resources=None,
                     **kwargs):
            # What only dask-cuda understands is recorded, not passed on.
            rmm = {name: kwargs.pop(name) for name in list(kwargs) if name.startswith("rmm_") or name == "pre_import"}
            calls.append({
                "n_workers": n_workers, "threads_per_worker": threads_per_worker, "memory_limit": memory_limit,
                "resources": resources, **rmm, **kwargs,
                "config": {name: dask.config.get(name) for name in recorded},
            })
            super().__init__(n_workers=n_workers or 1, threads_per_worker=threads_per_worker, processes=processes,
                             memory_limit=memory_limit, resources=resources, **kwargs)

    def parse_device_bytes(value, device_index=0, alignment_size=1):
        if value is None:
            return None
        size = dask.utils.parse_bytes(value) if isinstance(value, str) else int(value)
        return size // alignment_size * alignment_size

    package = _fake_module("dask_cuda", LocalCUDACluster=LocalCUDACluster)
    monkeypatch.setitem(sys.modules, "dask_cuda", package)
    monkeypatch.setitem(sys.modules, "dask_cuda.utils", _fake_module("dask_cuda.utils",
                                                                      parse_device_bytes=parse_device_bytes))
    monkeypatch.setattr(cluster_module, "_installed", lambda name: True)
    monkeypatch.setattr(cluster_module, "cuda_device_count", lambda: (1, "test"))
    return calls


@pytest.fixture
def fake_dask_cuda(monkeypatch):
    """The stand-in dask_cuda with in-process workers."""
    calls = _install_fake_dask_cuda(monkeypatch, processes=False)
    gpu.reset_cleaner_registry()
    yield calls
    gpu.reset_cleaner_registry()


@pytest.fixture
def fake_dask_cuda_processes(monkeypatch):
    """The stand-in dask_cuda with worker processes under nannies, as dask-cuda starts them."""
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    return _install_fake_dask_cuda(monkeypatch, processes=True)


def test_cuda_cluster_gets_gpu_resources_one_thread_and_the_rmm_options(fake_dask_cuda):
    with connect(cluster="cuda", rmm_pool_size="64MiB", rmm_maximum_pool_size="1000MB", rmm_for_cupy=True,
                 rmm_reinitialize_pool=True, pre_import=["cupy"]) as cuda_client:
        workers = cuda_client.scheduler_info(n_workers=-1)["workers"].values()
        assert [w["resources"] for w in workers] == [{"GPU": 1}]
        assert [w["nthreads"] for w in workers] == [1]
        # The worker was told to re-create the same pool after each well.
        assert "rmm-reinitialize" in gpu.registered_cleaners()
        assert gpu._rmm_config == {"pool_allocator": True, "managed_memory": False,
                                   "initial_pool_size": 64 * MB, "maximum_pool_size": 1000 * 10**6 // 256 * 256}
        # Last: after CuPy's pools and FFT plans gave back what they held from the old pool.
        assert gpu.registered_cleaners()[-1] == "rmm-reinitialize"
    [call] = fake_dask_cuda
    assert call == {
        "n_workers": None, "threads_per_worker": 1, "memory_limit": "auto", "resources": {"GPU": 1},
        "rmm_pool_size": "64MiB", "rmm_maximum_pool_size": "1000MB", "rmm_async": False,
        "rmm_release_threshold": None, "rmm_managed_memory": False, "rmm_allocator_external_lib_list": ["cupy"],
        "scheduler_port": 0, "dashboard_address": ":0", "silence_logs": call["silence_logs"],
        "pre_import": ["cupy"], "config": {**embedded_config(), **CUDA_WORKER_CONFIG},
        "preload": [EMBEDDED_WORKER_PRELOAD],  # workers ignore a notebook's SIGINT
    }


def test_cuda_cluster_without_reinitialisation_configures_no_cleaner(fake_dask_cuda):
    with connect(cluster="cuda", rmm_async=True, rmm_release_threshold="1GB", resources={"MEM": 1}):
        assert "rmm-reinitialize" not in gpu.registered_cleaners()
    [call] = fake_dask_cuda
    assert call["resources"] == {"GPU": 1, "MEM": 1}
    assert (call["rmm_async"], call["rmm_release_threshold"], call["rmm_allocator_external_lib_list"]) == (
        True, "1GB", None)


@pytest.mark.parametrize(("arguments", "message"), [
    pytest.param((None,), "needs the pool size", id="no-pool"),
    pytest.param(("4 gigs",), "rmm_pool_size='4 gigs' is not a size", id="bad-size"),
    pytest.param(("1GB", 2.0), "rmm_maximum_pool_size=2.0", id="bad-fraction"),
    pytest.param(("1GB", None, "yes"), "rmm_managed_memory must be True or False", id="bad-flag"),
])
def test_rmm_reinitialize_plugin_validates_its_options(arguments, message):
    with pytest.raises(ClusterOptionError, match=message):
        cluster_module.RMMReinitializePlugin(*arguments)


def _worker_state() -> dict[str, Any]:
    """On a worker: its process, its cleanup's RMM setting and its JAX preallocation setting."""
    return {"pid": os.getpid(), "cleaners": gpu.registered_cleaners(), "rmm_config": dict(gpu._rmm_config),
            "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")}


def _one_worker_state(client: Any, configured: bool) -> dict[str, Any]:
    """The state of the one worker, once the scheduler's plugins are set up on it."""
    deadline = time.monotonic() + 30
    while True:
        [state] = client.run(_worker_state).values()
        if not configured or "rmm-reinitialize" in state["cleaners"] or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def _exclusive_cleanup() -> dict[str, Any]:
    """On a worker, as the well's guard on a single-threaded worker cleans: what ran, what RMM was asked."""
    reports = gpu.release_gpu_pools(exclusive=True)
    return {"reports": [(r.framework, r.bytes_before, r.bytes_after, r.error) for r in reports],
            "reinitialize_calls": sys.modules["rmm"].reinitialize_calls}


@pytest.mark.timeout(240)
def test_restarted_cuda_workers_keep_the_rmm_reinitialisation_and_jax_setting(fake_dask_cuda_processes):
    with connect(cluster="cuda", n_workers=1, rmm_pool_size="64MiB", rmm_reinitialize_pool=True,
                 preload=[FAKE_GPU_WORKER]) as cuda_client:
        first = _one_worker_state(cuda_client, configured=True)
        cuda_client.restart()
        restarted = _one_worker_state(cuda_client, configured=True)
        cleanup = cuda_client.submit(_exclusive_cleanup, pure=False).result()
    assert first["pid"] != restarted["pid"]  # a new worker process
    options = {"pool_allocator": True, "managed_memory": False, "initial_pool_size": 64 * MB,
               "maximum_pool_size": None}
    for state in (first, restarted):
        assert state["cleaners"][-1] == "rmm-reinitialize", state
        assert state["rmm_config"] == options
        assert state["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    # The restarted worker's cleanup re-created its pool: after CuPy (not loaded here), last.
    assert cleanup == {"reports": [("rmm", 64 * MB, 64 * MB, None), ("rmm", 64 * MB, 64 * MB, None)],
                       "reinitialize_calls": [options]}
    # distributed.nanny.environ, not pre-spawn-environ: this process's environment is untouched.
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ


@pytest.mark.timeout(240)
def test_a_jax_preallocation_exported_in_the_shell_wins(fake_dask_cuda_processes, monkeypatch):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    with connect(cluster="cuda", n_workers=1) as cuda_client:
        state = _one_worker_state(cuda_client, configured=False)
    assert state["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    assert "rmm-reinitialize" not in state["cleaners"]


def test_a_cuda_cluster_that_fails_to_start_is_a_cluster_error(fake_dask_cuda, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setattr(sys.modules["dask_cuda"], "LocalCUDACluster", broken)
    with pytest.raises(ClusterError, match="LocalCUDACluster did not start: RuntimeError: CUDA driver"):
        with connect(cluster="cuda"):
            pass


@pytest.mark.skipif(_real_cuda_machine(), reason="dask-cuda and a CUDA device are here: it would start")
def test_cli_cluster_cuda_without_gpu_exits_2_and_writes_nothing(synthetic_plate, tmp_path):
    # Needs the --cluster option of `hcs-dask run` and the cluster check before the output is written.
    output = tmp_path / "out.ome.zarr"
    result = CliRunner().invoke(main, ["run", "nuclei_count", str(synthetic_plate), "-o", str(output),
                                       "--cluster", "cuda"], catch_exceptions=False)
    text = result.output + (getattr(result, "stderr", "") or "")
    assert "No such option" not in text
    assert result.exit_code == 2, text
    assert "cannot start a LocalCUDACluster" in text
    assert "dask-cuda" in text or "no CUDA device" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plate"]


# ---------------------------------------------------------- GPU resources
@pytest.mark.timeout(120)
def test_gpu_pipeline_on_a_cluster_without_gpus_fails_at_once(client, synthetic_plate, tmp_path):
    pipeline = load_pipeline("nuclei_count", device="gpu")
    with pytest.raises(ClusterError) as caught:
        run_plate(open_plate(synthetic_plate), pipeline, tmp_path / "o.ome.zarr", client=client, progress=False)
    message = str(caught.value)
    assert "has GPU steps (background, max_projection, smooth, count_nuclei)" in message
    assert "--cluster cuda" in message


class _ResourceRecorder(SchedulerPlugin):
    """Records the resource restrictions of each well task as it starts processing."""

    name = "hcs-test-resources"

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.seen: dict[Any, dict[str, float] | None] = {}

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "processing" and isinstance(key, tuple) and key[0] == "hcs-well":
            task = self.scheduler.tasks.get(key)
            restrictions = getattr(task, "resource_restrictions", None)
            self.seen[key] = dict(restrictions) if restrictions else None


@pytest.mark.timeout(240)
def test_gpu_steps_ask_for_the_gpu_resource_and_fail_cleanly_without_cupy(synthetic_plate, tmp_path):
    plate = open_plate(synthetic_plate)
    on_gpu = Pipeline([Step(max_projection, stack="z", name="project_on_gpu", array_type="cupy")], name="gpu-only")
    on_cpu = Pipeline([Step(max_projection, stack="z", name="project")], name="cpu-only")
    with connect(n_workers=1, resources={"GPU": 1}) as gpu_client:
        # The embedded scheduler lives in this process: the recorder is added directly.
        scheduler = gpu_client.cluster.scheduler
        recorder = _ResourceRecorder(scheduler)
        scheduler.add_plugin(recorder)
        gpu_result = run_plate(plate, on_gpu, tmp_path / "gpu.ome.zarr", client=gpu_client, progress=False)
        gpu_seen, recorder.seen = recorder.seen, {}
        cpu_result = run_plate(plate, on_cpu, tmp_path / "cpu.ome.zarr", client=gpu_client, progress=False)
        scheduler.remove_plugin(name=recorder.name)
    wells = [w.name for w in plate.wells]
    assert gpu_seen == {("hcs-well", plate.name, well): {"GPU": 1} for well in wells}
    assert recorder.seen == {("hcs-well", plate.name, well): None for well in wells}
    assert cpu_result.ok
    if not _cupy_importable():
        for well in gpu_result.wells:
            assert (well.status, well.step, well.error_type) == ("failed", "project_on_gpu", "ModuleNotFoundError")
            assert "cupy" in well.error
            assert well.memory["backend_bytes_after_cleanup"] == 0
            assert well.memory["cleanups"] == 1
