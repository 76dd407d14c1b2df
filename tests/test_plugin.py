"""CleanupPlugin on a real LocalCluster running ordinary tasks (nothing written with hcs_dask).

One worker process with two threads, shared by the module: the concurrency tests
need a second thread, and one worker keeps every task and its scope in one
process. Statistics accumulate over the module, so each test compares figures
before and after. The restart test runs last (it replaces the worker process).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from distributed import Client, LocalCluster, get_worker

from hcs_dask.memory import backend, gpu
from hcs_dask.plugin import CleanupPlugin, cleanup_stats

FAKE_MODULE = "hcs_fake_gpu_framework_for_plugin_tests"

STATISTICS_KEYS = {
    "registered", "worker", "tasks_seen", "tasks_seceded", "cleanup_requests", "cleanups_run",
    "cleanups_skipped_disabled", "cleanup_pending", "backend_bytes_freed", "backend_scopes_reset",
    "scopes_skipped_running", "gpu_bytes_freed", "gpu_releases", "gpu_releases_unmeasured", "cleanup_seconds",
    "last_cleanup_seconds", "cleaner_errors", "last_errors", "config",
}


@pytest.fixture(scope="module")
def cluster_client():
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=True, scheduler_port=0,
                           dashboard_address=":0", silence_logs=logging.ERROR)
    client = Client(cluster)
    try:
        client.register_plugin(CleanupPlugin())
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture
def client(cluster_client):
    """The shared client; leaves the worker's backend and registry as it found them."""
    yield cluster_client
    cluster_client.run(_reset_worker_state)


# --- functions that run on the worker ----------------------------------------


def _reset_worker_state() -> None:
    backend.reset_memory_backend()
    gpu._set_cleanup_enabled(True)
    for name in ("fake-gpu", "broken-gpu", "slow-gpu"):
        if name in gpu.registered_cleaners():
            gpu.unregister_cleaner(name)
    sys.modules.pop(FAKE_MODULE, None)


def _inc(x: int) -> int:
    return x + 1


def _my_key() -> Any:
    return get_worker().get_current_task()


def _leak_into_own_scope(nbytes: int) -> Any:
    """A task not written with hcs_dask: it fills a scope under its key and never resets it."""
    key = _my_key()
    backend.Scope(key).put("leaked", np.ones(nbytes, dtype=np.uint8))
    return key


def _hold_active_scope(signal: str, nbytes: int) -> int:
    """An hcs_dask-style task: its scope is open (active) until the signal file appears."""
    with backend.scope(_my_key()) as scope:
        scope.put("intermediate", np.ones(nbytes, dtype=np.uint8))
        _wait_for(signal)
        return scope.nbytes()


def _leak_then_wait(signal: str, nbytes: int) -> Any:
    """Fills an (inactive) scope under its key, then runs on until the signal file appears."""
    key = _leak_into_own_scope(nbytes)
    _wait_for(signal)
    return key


def _wait_for(signal: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(signal):
        if time.monotonic() > deadline:
            raise TimeoutError(signal)
        time.sleep(0.01)


def _scope_nbytes(key: Any) -> int:
    return backend.nbytes(key)


def _put_foreign_scope(key: str, nbytes: int) -> None:
    backend.Scope(key).put("x", np.ones(nbytes, dtype=np.uint8))


def _task_state(key: Any, dask_worker: Any) -> str | None:
    ts = dask_worker.state.tasks.get(key)
    return None if ts is None else ts.state


def _install_fake_framework() -> None:
    """A fake GPU framework on the worker: a byte counter that tasks 'allocate' into."""
    module = types.ModuleType(FAKE_MODULE)
    module.held = 0  # type: ignore[attr-defined]
    sys.modules[FAKE_MODULE] = module

    def release() -> None:
        module.held = 0  # type: ignore[attr-defined]

    def broken() -> None:
        raise MemoryError("fake driver refused")

    gpu.register_cleaner("fake-gpu", module=FAKE_MODULE, release=release,
                         measure=lambda: module.held, order=5)  # type: ignore[attr-defined]
    gpu.register_cleaner("broken-gpu", module=FAKE_MODULE, release=broken, order=6)


def _install_slow_cleaner(seconds: float) -> None:
    sys.modules.setdefault(FAKE_MODULE, types.ModuleType(FAKE_MODULE))
    gpu.register_cleaner("slow-gpu", module=FAKE_MODULE, release=lambda: time.sleep(seconds))


def _allocate_on_fake_framework(nbytes: int) -> int:
    module = sys.modules[FAKE_MODULE]
    module.held += nbytes  # type: ignore[attr-defined]
    return nbytes


def _plugin_identity(dask_worker: Any) -> int:
    return id(dask_worker.plugins[CleanupPlugin.name])


# --- helpers on the client ---------------------------------------------------


def _stats(client: Client) -> dict[str, Any]:
    [stats] = cleanup_stats(client).values()
    return stats


def _eventually(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def _on_worker(client: Client, function: Callable[..., Any], *args: Any) -> Any:
    [result] = client.run(function, *args).values()
    return result


def _swap_plugin(client: Client, plugin: CleanupPlugin) -> None:
    client.unregister_worker_plugin(CleanupPlugin.name)
    client.register_plugin(plugin)


# --- tests -----------------------------------------------------------------------


def test_init_validates_configuration():
    with pytest.raises(TypeError):
        CleanupPlugin(release_gpu="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        CleanupPlugin(reset_idle_scopes=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CleanupPlugin(max_error_messages=0)
    assert CleanupPlugin.name == "hcs-dask-cleanup" and CleanupPlugin.idempotent is True


def test_counts_ordinary_tasks_and_reports_a_plain_dict(client):
    before = _stats(client)
    assert set(before) == STATISTICS_KEYS

    futures = client.map(_inc, range(20), pure=False)
    assert client.gather(futures) == list(range(1, 21))
    after = _stats(client)

    assert after["registered"] is True
    assert after["worker"] in cleanup_stats(client)
    assert after["tasks_seen"] - before["tasks_seen"] >= 20
    assert after["cleanup_requests"] - before["cleanup_requests"] >= 20
    assert after["cleanups_run"] > before["cleanups_run"]
    assert after["cleanup_seconds"] >= before["cleanup_seconds"]
    assert after["cleanup_pending"] is False
    assert after["config"] == {"release_gpu": True, "reset_idle_scopes": True, "max_error_messages": 5}
    assert isinstance(after["gpu_bytes_freed"], dict) and isinstance(after["last_errors"], list)


def test_safety_net_frees_a_scope_the_task_left_behind(client):
    before = _stats(client)
    nbytes = 3_000_000
    key = client.submit(_leak_into_own_scope, nbytes, pure=False).result()

    after = _stats(client)  # waits for the cleanup the task's end queued
    assert _on_worker(client, _scope_nbytes, key) == 0
    assert after["backend_bytes_freed"] - before["backend_bytes_freed"] >= nbytes
    assert after["backend_scopes_reset"] > before["backend_scopes_reset"]


def test_without_idle_sweep_only_the_finished_tasks_scope_is_reset(client):
    _swap_plugin(client, CleanupPlugin(reset_idle_scopes=False))
    try:
        client.run(_put_foreign_scope, "not-a-task-key", 1000)
        key = client.submit(_leak_into_own_scope, 2000, pure=False).result()
        stats = _stats(client)
        assert stats["config"]["reset_idle_scopes"] is False
        assert _on_worker(client, _scope_nbytes, key) == 0
        assert _on_worker(client, _scope_nbytes, "not-a-task-key") == 1000

        _swap_plugin(client, CleanupPlugin())
        client.submit(_inc, 1, pure=False).result()
        _stats(client)
        assert _on_worker(client, _scope_nbytes, "not-a-task-key") == 0  # the idle sweep takes it
    finally:
        _swap_plugin(client, CleanupPlugin())


def test_active_scope_of_a_running_task_survives_other_tasks_cleanups(client, tmp_path: Path):
    signal = str(tmp_path / "release-long-task")
    nbytes = 1_000_000
    long_task = client.submit(_hold_active_scope, signal, nbytes, pure=False)
    _eventually(lambda: _on_worker(client, _scope_nbytes, long_task.key) == nbytes)
    before = _stats(client)

    assert client.gather(client.map(_inc, range(10), pure=False)) == list(range(1, 11))
    after = _stats(client)

    assert after["cleanups_run"] > before["cleanups_run"]
    assert _on_worker(client, _scope_nbytes, long_task.key) == nbytes  # untouched while running
    Path(signal).touch()
    assert long_task.result() == nbytes  # the task itself still saw all its data
    assert _on_worker(client, _scope_nbytes, long_task.key) == 0  # its own guard reset it


def test_cancelled_task_keeps_its_scope_until_its_thread_returns(client, tmp_path: Path):
    signal = str(tmp_path / "release-cancelled-task")
    nbytes = 500_000
    future = client.submit(_leak_then_wait, signal, nbytes, pure=False)
    key = future.key
    _eventually(lambda: _on_worker(client, _scope_nbytes, key) == nbytes)

    future.cancel()
    _eventually(lambda: _on_worker(client, _task_state, key) == "cancelled")
    # executing -> released has been seen: the thread runs on, its (inactive)
    # scope must survive the cleanups that other tasks trigger.
    assert client.gather(client.map(_inc, range(5), pure=False)) == list(range(1, 6))
    _stats(client)
    assert _on_worker(client, _scope_nbytes, key) == nbytes

    before = _stats(client)
    Path(signal).touch()
    # The thread returns: cancelled -> memory, and the safety net frees what it left.
    _eventually(lambda: _on_worker(client, _scope_nbytes, key) == 0)
    after = _stats(client)
    assert after["tasks_seen"] > before["tasks_seen"]


def test_fake_framework_cleaner_runs_from_the_plugin_and_its_bytes_are_counted(client):
    client.run(_install_fake_framework)
    before = _stats(client)

    assert client.submit(_allocate_on_fake_framework, 1_000_000, pure=False).result() == 1_000_000
    after = _stats(client)

    freed = after["gpu_bytes_freed"].get("fake-gpu", 0) - before["gpu_bytes_freed"].get("fake-gpu", 0)
    assert freed >= 1_000_000
    assert after["gpu_releases"]["fake-gpu"] > before["gpu_releases"].get("fake-gpu", 0)
    # A raising cleaner is counted and described, and never stops the others.
    assert after["cleaner_errors"] > before["cleaner_errors"]
    assert "broken-gpu: MemoryError: fake driver refused" in after["last_errors"]
    assert len(after["last_errors"]) <= 5
    assert _on_worker(client, lambda: sys.modules[FAKE_MODULE].held) == 0


def test_bursts_of_tasks_are_coalesced_into_few_cleanups(client):
    client.run(_install_slow_cleaner, 0.2)  # each cleanup takes 200 ms on the cleanup thread
    before = _stats(client)
    assert len(client.gather(client.map(_inc, range(200), pure=False))) == 200
    [after] = cleanup_stats(client, wait=10.0).values()

    requests = after["cleanup_requests"] - before["cleanup_requests"]
    runs = after["cleanups_run"] - before["cleanups_run"]
    assert requests >= 200
    # Everything requested is done (nothing queued behind), in far fewer runs.
    assert after["cleanup_pending"] is False
    assert 1 <= runs <= requests // 2


def test_measurement_switch_turns_the_safety_net_off(client):
    client.run(gpu._set_cleanup_enabled, False)
    before = _stats(client)
    key = client.submit(_leak_into_own_scope, 1000, pure=False).result()
    after = _stats(client)
    assert after["cleanups_skipped_disabled"] > before["cleanups_skipped_disabled"]
    assert _on_worker(client, _scope_nbytes, key) == 1000

    client.run(gpu._set_cleanup_enabled, True)
    client.submit(_inc, 1, pure=False).result()
    _stats(client)
    assert _on_worker(client, _scope_nbytes, key) == 0


def test_registering_again_is_idempotent(client):
    identity = _on_worker(client, _plugin_identity)
    client.submit(_inc, 1, pure=False).result()
    before = _stats(client)

    client.register_plugin(CleanupPlugin())
    client.register_plugin(CleanupPlugin(release_gpu=False))  # same name: ignored too

    assert _on_worker(client, _plugin_identity) == identity
    after = _stats(client)
    assert after["tasks_seen"] >= before["tasks_seen"] >= 1  # not reset
    assert after["config"]["release_gpu"] is True


def test_worker_without_the_plugin_reports_unregistered(client):
    client.unregister_worker_plugin(CleanupPlugin.name)
    try:
        assert list(cleanup_stats(client).values()) == [{"registered": False}]
    finally:
        client.register_plugin(CleanupPlugin())
    assert _stats(client)["registered"] is True


def test_restarted_worker_gets_the_plugin_again_with_fresh_statistics(client):
    client.submit(_inc, 1, pure=False).result()
    assert _stats(client)["tasks_seen"] >= 1

    client.restart()

    stats = _stats(client)
    assert stats["registered"] is True and stats["tasks_seen"] == 0
    assert client.gather(client.map(_inc, range(3), pure=False)) == [1, 2, 3]
    assert _stats(client)["tasks_seen"] == 3
