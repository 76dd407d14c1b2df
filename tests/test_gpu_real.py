"""release_gpu_pools() against the real CuPy / RMM / PyTorch / JAX on a CUDA device.

Skipped where CuPy is missing or sees no device; normal CI passes without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
from gpu_support import require_cuda_device

from hcs_dask.memory import gpu

pytestmark = pytest.mark.gpu

cupy = require_cuda_device()

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _default_allocators():
    """Each test starts from CuPy's default pool and a clean registry, and leaves them so."""
    pool = cupy.get_default_memory_pool()
    cupy.cuda.set_allocator(pool.malloc)
    gpu.reset_cleaner_registry()
    gpu.release_gpu_pools()
    yield
    cupy.cuda.set_allocator(pool.malloc)
    gpu.reset_cleaner_registry()
    gpu.release_gpu_pools()


def _report(reports: list[gpu.CleanerReport], framework: str) -> gpu.CleanerReport:
    [report] = [r for r in reports if r.framework == framework]
    assert report.error is None, report
    return report


def test_cupy_pool_goes_back_to_baseline_and_the_driver_gets_the_memory():
    pool = cupy.get_default_memory_pool()
    baseline = pool.total_bytes()

    data = cupy.ones((256 * MIB,), dtype=cupy.uint8)
    assert int(data.sum()) == 256 * MIB
    del data
    assert pool.total_bytes() >= baseline + 256 * MIB  # the pool keeps the freed block
    free_before, _ = cupy.cuda.runtime.memGetInfo()

    modules = set(sys.modules)
    report = _report(gpu.release_gpu_pools(), "cupy")
    assert set(sys.modules) == modules

    assert report.bytes_before >= baseline + 256 * MIB
    assert report.bytes_after <= baseline
    assert report.freed >= 256 * MIB
    assert pool.total_bytes() <= baseline
    free_after, _ = cupy.cuda.runtime.memGetInfo()
    assert free_after - free_before >= 200 * MIB
    assert gpu.pool_bytes()["cupy"] <= baseline


def test_cupy_fft_plan_cache_is_cleared_in_the_calling_thread():
    import cupy.fft  # noqa: F401  (the cleaner only touches an imported cupy.fft)

    signal = cupy.random.random(4096).astype(cupy.complex64)
    cupy.fft.fft(signal)
    cache = cupy.fft.config.get_plan_cache()
    size = getattr(cache, "get_curr_size", None)
    if size is None:
        pytest.skip("this CuPy's PlanCache reports no size")
    assert size() >= 1
    del signal
    _report(gpu.release_gpu_pools(), "cupy")
    assert size() == 0


def test_rmm_pool_is_reported_and_reinitialized_only_when_configured_and_exclusive():
    rmm = pytest.importorskip("rmm")
    if not hasattr(rmm, "reinitialize"):
        pytest.skip("this RMM has no reinitialize()")
    initial = 256 * MIB
    options = {"pool_allocator": True, "initial_pool_size": initial}
    rmm.reinitialize(**options)
    try:
        assert gpu.pool_bytes()["rmm"] >= initial
        buffer = rmm.DeviceBuffer(size=768 * MIB)  # more than the pool: it grows
        del buffer
        grown = gpu.pool_bytes()["rmm"]
        assert grown >= 768 * MIB

        report = _report(gpu.release_gpu_pools(exclusive=True), "rmm")
        assert report.bytes_before == grown and report.bytes_after == grown  # a pool never shrinks by itself

        gpu.configure_rmm_cleanup(reinitialize_pool=True, **options)
        gpu.release_gpu_pools()  # not exclusive (the plugin's thread): no re-initialisation
        assert gpu.pool_bytes()["rmm"] == grown
        rmm_reports = [r for r in gpu.release_gpu_pools(exclusive=True) if r.framework == "rmm"]
        assert len(rmm_reports) == 2 and all(r.error is None for r in rmm_reports), rmm_reports
        reinitialized = rmm_reports[1]
        assert reinitialized.bytes_before == grown
        assert reinitialized.bytes_after < grown
        assert gpu.pool_bytes()["rmm"] <= initial + MIB  # back to the configured pool
    finally:
        rmm.reinitialize()


def test_rmm_async_resource_backing_cupy_is_released_first():
    rmm = pytest.importorskip("rmm")
    from rmm.allocators.cupy import rmm_cupy_allocator

    previous = rmm.mr.get_current_device_resource()
    baseline = cupy.get_default_memory_pool().total_bytes()
    rmm.mr.set_current_device_resource(rmm.mr.CudaAsyncMemoryResource())
    cupy.cuda.set_allocator(rmm_cupy_allocator)
    try:
        data = cupy.ones((128 * MIB,), dtype=cupy.uint8)
        assert int(data.sum()) == 128 * MIB
        del data
        reports = gpu.release_gpu_pools()
        frameworks = [r.framework for r in reports]
        assert frameworks.index("rmm") < frameworks.index("cupy")
        assert all(r.error is None for r in reports), reports
        # CuPy's own pool is not where the memory lived: it did not grow.
        assert _report(reports, "cupy").bytes_before <= baseline
        # RMM does not give Python the handle of this resource's pool: its bytes are unknown, not 0.
        if not callable(getattr(rmm.mr.get_current_device_resource(), "pool_handle", None)):
            assert (_report(reports, "rmm").bytes_before, _report(reports, "rmm").bytes_after) == (None, None)
    finally:
        cupy.cuda.set_allocator(cupy.get_default_memory_pool().malloc)
        rmm.mr.set_current_device_resource(previous)


def test_rmm_async_view_reports_its_pools_reserved_bytes():
    rmm = pytest.importorskip("rmm")
    runtime = pytest.importorskip("cuda.bindings.runtime")
    if not hasattr(rmm.mr, "CudaAsyncViewMemoryResource"):
        pytest.skip("this RMM has no CudaAsyncViewMemoryResource")
    _, device = runtime.cudaGetDevice()
    status, pool = runtime.cudaDeviceGetDefaultMemPool(device)
    assert status == runtime.cudaError_t.cudaSuccess

    def reserved() -> int:
        status, value = runtime.cudaMemPoolGetAttribute(
            pool, runtime.cudaMemPoolAttr.cudaMemPoolAttrReservedMemCurrent)
        assert status == runtime.cudaError_t.cudaSuccess
        return int(value)

    previous = rmm.mr.get_current_device_resource()
    rmm.mr.set_current_device_resource(rmm.mr.CudaAsyncViewMemoryResource(pool))
    try:
        buffer = rmm.DeviceBuffer(size=64 * MIB)
        held = gpu.pool_bytes()["rmm"]
        assert held == reserved() and held >= 64 * MIB
        del buffer
        report = _report(gpu.release_gpu_pools(), "rmm")
        assert report.bytes_before is not None and report.bytes_after == reserved()
        assert report.bytes_after <= report.bytes_before
    finally:
        rmm.mr.set_current_device_resource(previous)


def _run_python(code: str, **environment: str) -> dict:
    """Run ``code`` in a fresh interpreter (no CUDA context yet); it prints one JSON object."""
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                               timeout=240, env={**os.environ, **environment})
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_rmm_cleaner_creates_no_cuda_context_where_rmm_was_only_imported():
    pytest.importorskip("rmm")
    pytest.importorskip("cuda.bindings.driver")
    state = _run_python("""
        import json
        import rmm
        from cuda.bindings import driver
        from hcs_dask.memory import gpu

        def context_active():
            assert driver.cuInit(0)[0] == driver.CUresult.CUDA_SUCCESS
            _, device = driver.cuDeviceGet(0)
            _, flags, active = driver.cuDevicePrimaryCtxGetState(device)
            return bool(active)

        before = context_active()
        reports = gpu.release_gpu_pools(exclusive=True)
        print(json.dumps({"is_initialized": bool(rmm.is_initialized()), "context_before": before,
                          "context_after": context_active(), "held": gpu.pool_bytes(),
                          "reports": [[r.framework, r.bytes_before, r.bytes_after, r.error] for r in reports]}))
    """)
    if state["context_before"]:
        pytest.skip("importing RMM here created a CUDA context by itself")
    assert state["is_initialized"]  # what RMM says although nothing initialised it: no gate
    assert state["reports"] == [["rmm", 0, 0, None]]
    assert state["held"] == {"rmm": 0}
    assert not state["context_after"]


def test_jax_cleanup_keeps_compiled_functions_and_reports_the_device_pool():
    if importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed")
    state = _run_python("""
        import json
        import jax
        import jax.numpy as jnp
        from hcs_dask.memory import gpu

        try:
            device = jax.devices("gpu")[0]
        except RuntimeError:
            print(json.dumps({"gpu": False}))
            raise SystemExit
        double = jax.jit(lambda x: x * 2)
        double(jnp.ones(1 << 20, device=device)).block_until_ready()
        compiled = double._cache_size()
        [report] = [r for r in gpu.release_gpu_pools(exclusive=True) if r.framework == "jax"]
        stats = device.memory_stats() or {}
        print(json.dumps({"gpu": True, "compiled": compiled, "still_compiled": double._cache_size(),
                          "report": [report.bytes_before, report.bytes_after, report.error],
                          "pool_bytes": stats.get("pool_bytes")}))
    """, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if not state["gpu"]:
        pytest.skip("this JAX has no GPU backend")
    assert state["compiled"] >= 1 and state["still_compiled"] == state["compiled"]  # nothing to compile again
    before, after, error = state["report"]
    assert error is None
    assert after == state["pool_bytes"] and before == after  # measured, nothing released


def test_torch_cache_goes_back_to_baseline():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    torch.cuda.init()
    gpu.release_gpu_pools()
    baseline = torch.cuda.memory_reserved()
    data = torch.ones(256 * MIB, dtype=torch.uint8, device="cuda")
    del data
    assert torch.cuda.memory_reserved() >= baseline + 256 * MIB

    report = _report(gpu.release_gpu_pools(), "torch")
    assert report.freed >= 256 * MIB
    assert torch.cuda.memory_reserved() <= baseline
