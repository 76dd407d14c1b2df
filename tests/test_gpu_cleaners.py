"""The GPU cleaner registry, proven with fake frameworks registered through the public API.

No GPU library is needed: a fake framework is a ``types.ModuleType`` put into
``sys.modules`` for the duration of a test (``monkeypatch`` removes it again).
The built-in cleaners are exercised the same way, with fake ``cupy``/``rmm``/
``torch``/``jax``/``tensorflow`` modules that record the calls they receive;
those tests are skipped where the real library is loaded in this process.
"""

from __future__ import annotations

import sys
import types
import uuid
from typing import Any

import pytest

from hcs_dask.memory import gpu
from hcs_dask.memory.gpu import CleanerReport

BUILTINS = ["rmm", "cupy", "torch", "jax", "tensorflow"]


@pytest.fixture(autouse=True)
def _clean_registry():
    gpu.reset_cleaner_registry()
    yield
    gpu.reset_cleaner_registry()


def _module_name() -> str:
    return f"hcs_fake_gpu_{uuid.uuid4().hex[:12]}"


class FakeFramework:
    """A framework whose 'pool' is a byte counter; release empties it and logs the call."""

    def __init__(self, name: str, held: int, calls: list[str]) -> None:
        self.name = name
        self.held = held
        self.calls = calls

    def measure(self) -> int:
        return self.held

    def release(self) -> None:
        self.calls.append(self.name)
        self.held = 0


def _install(monkeypatch, module: str | None = None) -> str:
    module = module or _module_name()
    monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
    return module


def _skip_if_loaded(*names: str) -> None:
    loaded = [name for name in names if sys.modules.get(name) is not None]
    if loaded:
        pytest.skip(f"the real {loaded} is loaded in this process")


# --- registry basics --------------------------------------------------------


def test_builtin_cleaners_run_rmm_first():
    assert gpu.registered_cleaners() == BUILTINS


def test_cleanup_with_nothing_loaded_imports_nothing():
    before = set(sys.modules)
    reports = gpu.release_gpu_pools()
    held = gpu.pool_bytes()
    assert set(sys.modules) == before
    loaded = {name for name in BUILTINS if sys.modules.get(name) is not None}
    assert {report.framework for report in reports} <= loaded
    assert set(held) <= loaded


def test_cleaner_of_an_absent_module_never_runs_nor_imports_it():
    calls: list[str] = []
    fake = FakeFramework("fake", 100, calls)
    module = _module_name()
    gpu.register_cleaner("fake", module=module, release=fake.release, measure=fake.measure)
    before = set(sys.modules)

    reports = gpu.release_gpu_pools(exclusive=True)

    assert calls == []
    assert "fake" not in {report.framework for report in reports}
    assert "fake" not in gpu.pool_bytes()
    assert module not in sys.modules
    assert set(sys.modules) == before


def test_module_blocked_with_none_counts_as_not_loaded(monkeypatch):
    calls: list[str] = []
    fake = FakeFramework("fake", 100, calls)
    module = _module_name()
    monkeypatch.setitem(sys.modules, module, None)
    gpu.register_cleaner("fake", module=module, release=fake.release, measure=fake.measure)
    reports = gpu.release_gpu_pools()
    assert "fake" not in {report.framework for report in reports}
    assert calls == []


def test_loaded_cleaner_measures_before_and_after(monkeypatch):
    calls: list[str] = []
    fake = FakeFramework("fake", 4096, calls)
    module = _install(monkeypatch)
    gpu.register_cleaner("fake", module=module, release=fake.release, measure=fake.measure)

    assert gpu.pool_bytes()["fake"] == 4096
    assert calls == []  # measuring releases nothing

    [report] = [r for r in gpu.release_gpu_pools() if r.framework == "fake"]
    assert report == CleanerReport("fake", 4096, 0, report.seconds, None)
    assert report.freed == 4096
    assert report.seconds >= 0
    assert calls == ["fake"]
    assert gpu.pool_bytes()["fake"] == 0


def test_freed_is_never_negative():
    assert CleanerReport("x", bytes_before=10, bytes_after=50, seconds=0.0, error=None).freed == 0


@pytest.mark.parametrize(("before", "after"), [(None, 0), (10, None), (None, None)])
def test_freed_is_unknown_when_a_figure_is(before, after):
    assert CleanerReport("x", bytes_before=before, bytes_after=after, seconds=0.0).freed is None


def test_cleaner_without_measure_reports_unknown_bytes(monkeypatch):
    calls: list[str] = []
    module = _install(monkeypatch)
    gpu.register_cleaner("nomeasure", module=module, release=lambda: calls.append("nomeasure"))
    [report] = [r for r in gpu.release_gpu_pools() if r.framework == "nomeasure"]
    assert (report.bytes_before, report.bytes_after, report.freed, report.error) == (None, None, None, None)
    assert calls == ["nomeasure"]
    assert "nomeasure" not in gpu.pool_bytes()


def test_a_measure_may_say_it_cannot_tell(monkeypatch):
    module = _install(monkeypatch)
    gpu.register_cleaner("shy", module=module, release=lambda: None, measure=lambda: None)
    [report] = [r for r in gpu.release_gpu_pools() if r.framework == "shy"]
    assert (report.bytes_before, report.bytes_after, report.error) == (None, None, None)
    assert gpu.pool_bytes()["shy"] is None


def test_raising_cleaner_is_recorded_and_the_others_still_run(monkeypatch):
    calls: list[str] = []
    module = _install(monkeypatch)

    def broken_release() -> None:
        calls.append("broken")
        raise ValueError("pool is on fire")

    def broken_measure() -> int:
        raise RuntimeError("cannot count")

    healthy = FakeFramework("healthy", 7, calls)
    gpu.register_cleaner("broken", module=module, release=broken_release, measure=lambda: 3, order=1)
    gpu.register_cleaner("unmeasurable", module=module, release=lambda: calls.append("unmeasurable"),
                         measure=broken_measure, order=2)
    gpu.register_cleaner("healthy", module=module, release=healthy.release, measure=healthy.measure, order=3)

    reports = {r.framework: r for r in gpu.release_gpu_pools()}

    assert calls == ["broken", "unmeasurable", "healthy"]
    assert reports["broken"].error == "ValueError: pool is on fire"
    assert reports["broken"].bytes_before == 3
    assert reports["unmeasurable"].error == "measure: RuntimeError: cannot count"
    assert (reports["unmeasurable"].bytes_before, reports["unmeasurable"].freed) == (None, None)
    assert reports["healthy"].error is None and reports["healthy"].freed == 7
    assert gpu.pool_bytes()["unmeasurable"] is None  # a failing measure is unknown, never raises


def test_order_decides_who_runs_first(monkeypatch):
    calls: list[str] = []
    rmm_module, cupy_module = _install(monkeypatch), _install(monkeypatch)
    # Registered CuPy first on purpose: order, not registration, decides.
    gpu.register_cleaner("cupy", module=cupy_module, release=lambda: calls.append("cupy"), order=20)
    gpu.register_cleaner("rmm", module=rmm_module, release=lambda: calls.append("rmm"), order=10)
    gpu.register_cleaner("late", module=rmm_module, release=lambda: calls.append("late"), order=20)

    reports = gpu.release_gpu_pools()

    assert calls == ["rmm", "cupy", "late"]  # ties keep registration order
    assert [r.framework for r in reports] == ["rmm", "cupy", "late"]
    assert gpu.registered_cleaners()[:3] == ["rmm", "cupy", "late"]


def test_register_replaces_and_unregister_removes(monkeypatch):
    calls: list[str] = []
    module = _install(monkeypatch)
    gpu.register_cleaner("mine", module=module, release=lambda: calls.append("first"))
    gpu.register_cleaner("mine", module=module, release=lambda: calls.append("second"))
    gpu.release_gpu_pools()
    assert calls == ["second"]
    assert gpu.registered_cleaners().count("mine") == 1

    gpu.unregister_cleaner("mine")
    assert "mine" not in gpu.registered_cleaners()
    with pytest.raises(KeyError, match="mine"):
        gpu.unregister_cleaner("mine")


def test_reset_restores_the_builtins(monkeypatch):
    gpu.register_cleaner("mine", module=_install(monkeypatch), release=lambda: None)
    gpu.unregister_cleaner("cupy")
    gpu.reset_cleaner_registry()
    assert gpu.registered_cleaners() == BUILTINS


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        pytest.param({"name": "", "module": "m", "release": print}, ValueError, id="empty-name"),
        pytest.param({"name": "x", "module": "", "release": print}, ValueError, id="empty-module"),
        pytest.param({"name": "x", "module": "m", "release": 3}, TypeError, id="release-not-callable"),
        pytest.param({"name": "x", "module": "m", "release": print, "measure": 3}, TypeError, id="measure"),
        pytest.param({"name": "x", "module": "m", "release": print, "order": 1.5}, TypeError, id="order"),
    ],
)
def test_register_validates(kwargs: dict[str, Any], error: type[Exception]):
    name = kwargs.pop("name")
    with pytest.raises(error):
        gpu.register_cleaner(name, **kwargs)
    assert gpu.registered_cleaners() == BUILTINS


def test_exclusive_cleaners_run_only_on_exclusive_calls(monkeypatch):
    calls: list[str] = []
    module = _install(monkeypatch)
    gpu.register_cleaner("global-reset", module=module, release=lambda: calls.append("global"), exclusive=True)
    gpu.register_cleaner("pool", module=module, release=lambda: calls.append("pool"))

    gpu.release_gpu_pools()
    assert calls == ["pool"]
    gpu.release_gpu_pools(exclusive=True)
    assert calls == ["pool", "global", "pool"]


def test_measurement_switch_disables_cleanup(monkeypatch):
    calls: list[str] = []
    fake = FakeFramework("fake", 10, calls)
    gpu.register_cleaner("fake", module=_install(monkeypatch), release=fake.release, measure=fake.measure)
    assert gpu.cleanup_enabled()

    assert gpu._set_cleanup_enabled(False) is True
    try:
        assert not gpu.cleanup_enabled()
        assert gpu.release_gpu_pools() == []
        assert calls == []
        assert gpu.pool_bytes() == {"fake": 10}  # measuring still works: the benchmark needs it
    finally:
        assert gpu._set_cleanup_enabled(True) is False
    assert [r.freed for r in gpu.release_gpu_pools() if r.framework == "fake"] == [10]


def test_configure_rmm_cleanup_validates_and_registers_an_exclusive_cleaner():
    with pytest.raises(ValueError, match="options"):
        gpu.configure_rmm_cleanup(reinitialize_pool=True)
    with pytest.raises(ValueError, match="without reinitialize_pool"):
        gpu.configure_rmm_cleanup(pool_allocator=True)
    gpu.configure_rmm_cleanup(reinitialize_pool=True, pool_allocator=True)
    # Last, after every framework (a user's cleaner of a late order too) gave back its blocks.
    gpu.register_cleaner("late", module="late", release=lambda: None, order=10**9)
    assert gpu.registered_cleaners() == [*BUILTINS, "late", "rmm-reinitialize"]
    gpu.configure_rmm_cleanup(reinitialize_pool=False)
    assert gpu.registered_cleaners() == [*BUILTINS, "late"]


# --- the built-in cleaners, against fake frameworks -------------------------


def _fake_cupy(log: list[str], *, pool_bytes: int, allocator: Any = None) -> types.ModuleType:
    cupy = types.ModuleType("cupy")

    class Pool:
        def __init__(self, held: int) -> None:
            self.held = held

        def total_bytes(self) -> int:
            return self.held

        def free_all_blocks(self) -> None:
            log.append("cupy.free_all_blocks")
            self.held = 0

        def malloc(self, nbytes: int) -> None:  # pragma: no cover - never allocates
            raise AssertionError

    class PinnedPool:
        def free_all_blocks(self) -> None:
            log.append("cupy.pinned.free_all_blocks")

    pool, pinned = Pool(pool_bytes), PinnedPool()

    class Device:
        def synchronize(self) -> None:
            log.append("cupy.synchronize")

    cupy.get_default_memory_pool = lambda: pool  # type: ignore[attr-defined]
    cupy.get_default_pinned_memory_pool = lambda: pinned  # type: ignore[attr-defined]
    cupy.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        Device=Device,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
        get_allocator=lambda: allocator or pool.malloc,
    )
    return cupy


def test_builtin_cupy_synchronizes_before_freeing_and_clears_fft_plans(monkeypatch):
    _skip_if_loaded("cupy", "rmm")
    log: list[str] = []
    monkeypatch.setattr(gpu, "_cupy_has_device_cached", None)
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(log, pool_bytes=1 << 20))
    plan_cache = types.SimpleNamespace(clear=lambda: log.append("cupy.fft.plan_cache.clear"))
    fft_config = types.ModuleType("cupy.fft.config")
    fft_config.get_plan_cache = lambda: plan_cache  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy.fft.config", fft_config)

    [report] = gpu.release_gpu_pools()

    assert report.framework == "cupy" and report.error is None
    assert (report.bytes_before, report.bytes_after) == (1 << 20, 0)
    assert log == [
        "cupy.synchronize",
        "cupy.free_all_blocks",
        "cupy.pinned.free_all_blocks",
        "cupy.fft.plan_cache.clear",
    ]


def test_builtin_cupy_on_an_unused_device_creates_no_context(monkeypatch):
    _skip_if_loaded("cupy", "rmm")
    log: list[str] = []
    monkeypatch.setattr(gpu, "_cupy_has_device_cached", None)
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(log, pool_bytes=0))
    [report] = gpu.release_gpu_pools()
    assert report.error is None
    assert "cupy.synchronize" not in log  # cudaDeviceSynchronize would create a context


def _fake_rmm(resources: dict[int, Any], log: list[str], **attributes: Any) -> types.ModuleType:
    """An RMM holding ``resources`` per device, as rmm.mr keeps them.

    ``is_initialized()`` says True whatever it holds, as RMM's does; the current-device
    functions fail the test: they ask the CUDA runtime (and make a default resource).
    """
    rmm = types.ModuleType("rmm")

    def get_per_device_resource(device: int) -> Any:
        log.append(f"rmm.get_per_device_resource({device})")
        return resources[device]

    rmm.mr = types.SimpleNamespace(  # type: ignore[attr-defined]
        get_log_filenames=lambda: {device: None for device in resources},
        get_per_device_resource=get_per_device_resource,
        get_current_device_resource=lambda: pytest.fail("asked RMM for the current device's resource"),
        is_initialized=lambda: True,
    )
    rmm.is_initialized = lambda: True  # type: ignore[attr-defined]
    for name, value in attributes.items():
        setattr(rmm, name, value)
    return rmm


def _fake_runtime(log: list[str], **attributes: Any) -> types.ModuleType:
    runtime = types.ModuleType("cuda.bindings.runtime")

    def synchronize() -> tuple[int]:
        log.append("cudaDeviceSynchronize")
        return (0,)

    runtime.cudaDeviceSynchronize = synchronize  # type: ignore[attr-defined]
    for name, value in attributes.items():
        setattr(runtime, name, value)
    return runtime


def _resource(name: str, upstream: Any = None, **methods: Any) -> Any:
    """An instance of a class called ``name`` (the cleaner reads RMM's class names)."""
    namespace = {key: staticmethod(value) for key, value in methods.items()}
    namespace["get_upstream"] = lambda self: upstream
    return type(name, (), namespace)()


def _no_rmm_method(*args: Any) -> Any:
    pytest.fail("the cleaner called into an RMM resource")


def test_builtin_rmm_never_initialised_is_never_asked_anything(monkeypatch):
    _skip_if_loaded("rmm", "cuda.bindings.runtime", "cuda.cudart", "cupy")
    log: list[str] = []
    reinitialize = lambda **kwargs: log.append("reinitialize")  # noqa: E731
    monkeypatch.setitem(sys.modules, "rmm", _fake_rmm({}, log, reinitialize=reinitialize))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _fake_runtime(log))
    gpu.configure_rmm_cleanup(reinitialize_pool=True, pool_allocator=True, initial_pool_size=1 << 20)

    reports = gpu.release_gpu_pools(exclusive=True)

    assert sys.modules["rmm"].is_initialized()  # what RMM says: useless as a gate
    assert [(r.framework, r.bytes_before, r.bytes_after, r.error) for r in reports] == [
        ("rmm", 0, 0, None), ("rmm", 0, 0, None)]
    assert log == []  # no resource looked up, no device sync, no re-initialisation
    assert gpu.pool_bytes() == {"rmm": 0}


def test_builtin_rmm_resource_without_a_pool_holds_zero_and_is_not_synchronised(monkeypatch):
    _skip_if_loaded("rmm", "cuda.bindings.runtime", "cuda.cudart", "cupy")
    log: list[str] = []
    # What distributed's RMM metric leaves behind on a GPU worker: RMM's default resource.
    plain = _resource("StatisticsResourceAdaptor", _resource("CudaMemoryResource"), allocate=_no_rmm_method)
    monkeypatch.setitem(sys.modules, "rmm", _fake_rmm({0: plain}, log))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _fake_runtime(log))
    [report] = gpu.release_gpu_pools(exclusive=True)
    assert (report.bytes_before, report.bytes_after, report.error) == (0, 0, None)
    assert log == ["rmm.get_per_device_resource(0)"] * 3  # measure, release, measure; no sync


def test_builtin_rmm_async_resource_syncs_reports_unknown_bytes_and_runs_before_cupy(monkeypatch):
    _skip_if_loaded("cupy", "rmm", "cuda.bindings.runtime", "cuda.cudart")
    log: list[str] = []

    def rmm_cupy_allocator(nbytes: int) -> None:  # pragma: no cover - never allocates
        raise AssertionError

    rmm_cupy_allocator.__module__ = "rmm.allocators.cupy"
    # dask-cuda's rmm_async with a maximum: a limit over a CudaAsyncMemoryResource, whose pool
    # handle RMM does not give to Python. Its statistics count what is in use, not what the
    # pool holds: the pool's bytes are unknown, not the 5000 in use and not 0.
    async_resource = _resource("CudaAsyncMemoryResource")
    statistics = _resource("StatisticsResourceAdaptor", _resource("LimitingResourceAdaptor", async_resource))
    statistics.allocation_counts = {"current_bytes": 5000}
    monkeypatch.setattr(gpu, "_cupy_has_device_cached", None)
    monkeypatch.setitem(sys.modules, "rmm", _fake_rmm({0: statistics}, []))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _fake_runtime(log))
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(log, pool_bytes=0, allocator=rmm_cupy_allocator))

    reports = gpu.release_gpu_pools()

    assert [r.framework for r in reports] == ["rmm", "cupy"]
    assert all(r.error is None for r in reports), reports
    assert (reports[0].bytes_before, reports[0].bytes_after, reports[0].freed) == (None, None, None)
    assert gpu.pool_bytes()["rmm"] is None
    # RMM syncs first; CuPy, backed by RMM, syncs although its own pool is empty.
    assert log[:2] == ["cudaDeviceSynchronize", "cupy.synchronize"]


def test_builtin_rmm_async_view_reports_the_pools_reserved_bytes(monkeypatch):
    _skip_if_loaded("cupy", "rmm", "cuda.bindings.runtime", "cuda.cudart")
    log: list[str] = []
    reserved = {0xBEEF: 3 << 20}

    class cudaMemPool_t(int):  # noqa: N801 - cuda-python's name
        pass

    def get_attribute(pool: Any, attribute: str) -> tuple[int, int]:
        assert isinstance(pool, cudaMemPool_t)
        log.append(f"cudaMemPoolGetAttribute({attribute})")
        return 0, reserved[int(pool)]

    runtime = _fake_runtime(log, cudaMemPool_t=cudaMemPool_t, cudaMemPoolGetAttribute=get_attribute,
                            cudaMemPoolAttr=types.SimpleNamespace(
                                cudaMemPoolAttrReservedMemCurrent="ReservedMemCurrent"))
    view = _resource("CudaAsyncViewMemoryResource", pool_handle=lambda: 0xBEEF)
    monkeypatch.setitem(sys.modules, "rmm", _fake_rmm({0: view}, []))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)

    def release_at_sync() -> tuple[int]:
        log.append("cudaDeviceSynchronize")
        reserved[0xBEEF] = 1 << 20  # the release threshold kept 1 MiB
        return (0,)

    runtime.cudaDeviceSynchronize = release_at_sync  # type: ignore[attr-defined]

    [report] = gpu.release_gpu_pools()

    assert (report.bytes_before, report.bytes_after, report.freed, report.error) == (3 << 20, 1 << 20, 2 << 20, None)
    assert log == ["cudaMemPoolGetAttribute(ReservedMemCurrent)", "cudaDeviceSynchronize",
                   "cudaMemPoolGetAttribute(ReservedMemCurrent)"]


def test_builtin_rmm_pool_without_a_figure_is_unknown(monkeypatch):
    _skip_if_loaded("rmm")
    arena = _resource("ArenaMemoryResource", _resource("CudaMemoryResource"))
    monkeypatch.setitem(sys.modules, "rmm", _fake_rmm({0: arena}, []))
    [report] = gpu.release_gpu_pools()
    assert (report.bytes_before, report.bytes_after, report.error) == (None, None, None)


def test_builtin_rmm_reinitializes_a_pool_only_when_configured_and_exclusive(monkeypatch):
    _skip_if_loaded("rmm", "cuda.bindings.runtime", "cuda.cudart")
    log: list[str] = []
    state = {"size": 1 << 30}
    pool = _resource("PoolMemoryResource", _resource("CudaMemoryResource"), pool_size=lambda: state["size"])

    def reinitialize(**kwargs: Any) -> None:
        log.append(f"reinitialize {sorted(kwargs.items())}")
        state["size"] = 1 << 20

    monkeypatch.setitem(sys.modules, "rmm", _fake_rmm({0: pool}, [], reinitialize=reinitialize))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _fake_runtime([]))

    [report] = gpu.release_gpu_pools(exclusive=True)
    assert (report.framework, report.bytes_before, report.freed) == ("rmm", 1 << 30, 0)
    assert log == []  # a pool is never re-initialised unless configured

    gpu.configure_rmm_cleanup(reinitialize_pool=True, pool_allocator=True, initial_pool_size=1 << 20)
    gpu.release_gpu_pools()  # not exclusive: the plugin's background thread
    assert log == []
    first, reinitialized = gpu.release_gpu_pools(exclusive=True)
    assert log == ["reinitialize [('initial_pool_size', 1048576), ('pool_allocator', True)]"]
    # Both report as "rmm": per-framework figures stay per framework.
    assert (first.framework, first.bytes_before, first.freed) == ("rmm", 1 << 30, 0)
    assert reinitialized.framework == "rmm" and reinitialized.error is None
    assert (reinitialized.bytes_before, reinitialized.bytes_after) == (1 << 30, 1 << 20)
    assert gpu.pool_bytes() == {"rmm": 1 << 20}


def test_builtin_rmm_reinitializes_only_after_cupy_gave_back_its_blocks(monkeypatch):
    _skip_if_loaded("cupy", "rmm", "cuda.bindings.runtime", "cuda.cudart")
    log: list[str] = []

    def rmm_cupy_allocator(nbytes: int) -> None:  # pragma: no cover - never allocates
        raise AssertionError

    rmm_cupy_allocator.__module__ = "rmm.allocators.cupy"
    pool = _resource("PoolMemoryResource", _resource("CudaMemoryResource"), pool_size=lambda: 1 << 30)
    monkeypatch.setattr(gpu, "_cupy_has_device_cached", None)
    monkeypatch.setitem(sys.modules, "rmm", _fake_rmm({0: pool}, [],
                                                      reinitialize=lambda **kwargs: log.append("rmm.reinitialize")))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _fake_runtime(log))
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(log, pool_bytes=0, allocator=rmm_cupy_allocator))
    # CuPy's FFT plans hold work areas allocated from RMM's pool.
    plan_cache = types.SimpleNamespace(clear=lambda: log.append("cupy.fft.plan_cache.clear"))
    fft_config = types.ModuleType("cupy.fft.config")
    fft_config.get_plan_cache = lambda: plan_cache  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy.fft.config", fft_config)
    gpu.configure_rmm_cleanup(reinitialize_pool=True, pool_allocator=True, initial_pool_size=1 << 20)

    reports = gpu.release_gpu_pools(exclusive=True)

    assert [r.framework for r in reports] == ["rmm", "cupy", "rmm"]
    assert all(r.error is None for r in reports), reports
    assert log == ["cupy.synchronize", "cupy.free_all_blocks", "cupy.pinned.free_all_blocks",
                   "cupy.fft.plan_cache.clear", "cudaDeviceSynchronize", "rmm.reinitialize"]


def test_builtin_torch_releases_only_an_initialized_cuda(monkeypatch):
    _skip_if_loaded("torch")
    log: list[str] = []
    state = {"initialized": False, "reserved": 2048}

    def empty_cache() -> None:
        log.append("empty_cache")
        state["reserved"] = 0

    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        is_initialized=lambda: state["initialized"],
        synchronize=lambda: log.append("synchronize"),
        empty_cache=empty_cache,
        ipc_collect=lambda: log.append("ipc_collect"),
        memory_reserved=lambda: state["reserved"],
    )
    monkeypatch.setitem(sys.modules, "torch", torch)

    [report] = gpu.release_gpu_pools()
    assert (report.bytes_before, log) == (0, [])  # CUDA never initialised: nothing to do

    state["initialized"] = True
    [report] = gpu.release_gpu_pools()
    assert log == ["synchronize", "empty_cache", "ipc_collect"]
    assert (report.bytes_before, report.bytes_after, report.error) == (2048, 0, None)


def _fake_jax(monkeypatch, *, initialized: bool, devices: list[Any]) -> None:
    jax = types.ModuleType("jax")
    # clear_caches frees no device memory and makes every jitted function compile again.
    jax.clear_caches = lambda: pytest.fail("jax.clear_caches() called")  # type: ignore[attr-defined]
    # Asking for devices before JAX did would initialise the backends (and preallocate).
    jax.local_devices = (lambda: devices) if initialized else (  # type: ignore[attr-defined]
        lambda: pytest.fail("backends initialised"))
    bridge = types.ModuleType("jax._src.xla_bridge")
    bridge.backends_are_initialized = lambda: initialized  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "jax", jax)
    monkeypatch.setitem(sys.modules, "jax._src.xla_bridge", bridge)


def _jax_device(platform: str, stats: dict[str, int] | None) -> Any:
    return types.SimpleNamespace(platform=platform, memory_stats=lambda: stats)


def test_builtin_jax_never_clears_caches_and_holds_nothing_before_its_backends_start(monkeypatch):
    _skip_if_loaded("jax")
    _fake_jax(monkeypatch, initialized=False, devices=[])
    [report] = gpu.release_gpu_pools(exclusive=True)
    assert (report.framework, report.bytes_before, report.bytes_after, report.error) == ("jax", 0, 0, None)


def test_builtin_jax_reports_its_bfc_pool_and_releases_nothing(monkeypatch):
    _skip_if_loaded("jax")
    stats = {"bytes_in_use": 1 << 20, "pool_bytes": 64 << 20, "bytes_limit": 60 << 30}
    _fake_jax(monkeypatch, initialized=True, devices=[_jax_device("cpu", None), _jax_device("gpu", stats)])
    [report] = gpu.release_gpu_pools(exclusive=True)
    # The BFC pool keeps what it took: reported as it is, before and after.
    assert (report.bytes_before, report.bytes_after, report.freed, report.error) == (64 << 20, 64 << 20, 0, None)
    assert gpu.pool_bytes() == {"jax": 64 << 20}


@pytest.mark.parametrize(("allocator", "stats", "expected"), [
    pytest.param("platform", {"bytes_in_use": 3 << 20}, 3 << 20, id="platform-allocator-holds-what-is-in-use"),
    pytest.param(None, {"bytes_in_use": 3 << 20}, None, id="in-use-is-not-what-a-pool-holds"),
    pytest.param(None, None, None, id="no-statistics"),
])
def test_builtin_jax_without_a_pool_figure(monkeypatch, allocator, stats, expected):
    _skip_if_loaded("jax")
    if allocator is None:
        monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)
    else:
        monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", allocator)
    _fake_jax(monkeypatch, initialized=True, devices=[_jax_device("gpu", stats)])
    [report] = gpu.release_gpu_pools()
    assert (report.bytes_before, report.bytes_after, report.error) == (expected, expected, None)


def test_builtin_tensorflow_is_exclusive_and_never_imports_keras(monkeypatch):
    _skip_if_loaded("tensorflow", "keras", "tf_keras")
    log: list[str] = []
    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))

    assert gpu.release_gpu_pools() == []  # not exclusive: Keras state may be in use by another task
    [report] = gpu.release_gpu_pools(exclusive=True)
    assert report.error is None and log == []
    assert "keras" not in sys.modules

    keras = types.ModuleType("keras")
    keras.backend = types.SimpleNamespace(  # type: ignore[attr-defined]
        clear_session=lambda: log.append("clear_session")
    )
    monkeypatch.setitem(sys.modules, "keras", keras)
    gpu.release_gpu_pools(exclusive=True)
    assert log == ["clear_session"]


def test_plugin_statistics_count_releases_of_unknown_bytes_apart():
    from hcs_dask.plugin import _Statistics

    statistics = _Statistics(max_error_messages=5)
    reports = [CleanerReport("rmm", None, None, 0.0), CleanerReport("cupy", 10, 4, 0.0),
               CleanerReport("rmm", 8, 2, 0.0)]
    statistics.add_run(seconds=0.0, backend_freed=0, scopes_reset=0, skipped_running=0, reports=reports,
                       failure=None)
    figures = statistics.as_dict()
    assert figures["gpu_bytes_freed"] == {"cupy": 6, "rmm": 6}  # only what is known, never a made-up 0
    assert figures["gpu_releases"] == {"rmm": 2, "cupy": 1}
    assert figures["gpu_releases_unmeasured"] == {"rmm": 1}
    assert figures["cleaner_errors"] == 0
