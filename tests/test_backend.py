"""The memory backend: per-task scopes, byte accounting, and resets that touch one scope only.

Everything here runs in the test process on real numpy arrays; the backend is
process state, so every test starts and ends with an empty backend.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from hcs_dask.memory import backend


@pytest.fixture(autouse=True)
def _empty_backend():
    backend.reset_memory_backend()
    yield
    backend.reset_memory_backend()


def _array(nbytes: int, value: int = 1) -> np.ndarray:
    return np.full(nbytes, value, dtype=np.uint8)


# --- one scope ------------------------------------------------------------------


def test_put_get_pop_and_paths():
    scope = backend.open_scope("task-a")
    first, second = _array(100), _array(50, 2)
    scope.put("src/a", first)
    scope.put("src/b", second)
    scope.put("step0/a", _array(10))

    assert scope.get("src/a") is first  # the backend holds the array itself, no copy
    assert scope.paths() == ["src/a", "src/b", "step0/a"]
    assert scope.paths("src/") == ["src/a", "src/b"]
    assert len(scope) == 3

    scope.put("src/a", _array(30))  # replacing a path replaces its bytes
    assert scope.nbytes() == 30 + 50 + 10

    assert scope.pop("src/b") is second
    assert scope.paths() == ["src/a", "step0/a"]
    with pytest.raises(KeyError, match="task-a.*src/b"):
        scope.get("src/b")
    with pytest.raises(KeyError):
        scope.pop("src/b")


def test_delete_prefix_drops_one_prefix_and_returns_its_bytes():
    scope = backend.open_scope("task-a")
    scope.put("step0/(1, 1, 1, 1)", _array(100))
    scope.put("step0/(1, 1, 2, 1)", _array(200))
    scope.put("step1/(1, 1, 1, 1)", _array(7))

    assert scope.delete_prefix("step0/") == 300
    assert scope.paths() == ["step1/(1, 1, 1, 1)"]
    assert scope.delete_prefix("nothing/") == 0
    assert scope.nbytes() == 7


def test_nbytes_and_n_entries_per_scope_and_process_wide():
    a, b = backend.open_scope("task-a"), backend.open_scope(("hcs-well", "plate", "B02"))
    a.put("x", _array(1000))
    a.put("y", _array(24))
    b.put("x", _array(4096))
    b.put("label", "not an array")  # objects without nbytes count as 0 bytes

    assert backend.nbytes("task-a") == 1024
    assert backend.nbytes(("hcs-well", "plate", "B02")) == 4096
    assert backend.nbytes() == 1024 + 4096
    assert backend.n_entries("task-a") == 2
    assert backend.n_entries(("hcs-well", "plate", "B02")) == 2
    assert backend.n_entries() == 4
    assert backend.nbytes("never-opened") == 0 and backend.n_entries("never-opened") == 0
    assert set(backend.scope_keys()) == {"task-a", ("hcs-well", "plate", "B02")}


# --- resets ---------------------------------------------------------------------


def test_reset_scope_frees_exactly_one_scope():
    mine, other = backend.open_scope("mine"), backend.open_scope("other")
    kept = _array(500, 7)
    mine.put("a", _array(300))
    mine.put("b", _array(200))
    other.put("a", kept)

    assert backend.reset_scope("mine") == 500
    assert backend.nbytes("mine") == 0 and backend.n_entries("mine") == 0
    assert other.get("a") is kept and int(kept.sum()) == 500 * 7  # same object, same values
    assert backend.nbytes() == 500
    assert backend.reset_scope("mine") == 0  # a second reset finds nothing


def test_reset_memory_backend_frees_every_scope_running_or_not():
    for key, nbytes in (("a", 10), ("b", 20), ("c", 30)):
        backend.open_scope(key).put("x", _array(nbytes))
    backend.close_scope("c", reset=False)  # finished but not reset

    assert backend.reset_memory_backend() == 60
    assert backend.nbytes() == 0 and backend.n_entries() == 0
    assert backend.scope_keys() == []
    assert not backend.is_active("a") and not backend.is_active("b")


def test_close_scope_without_reset_keeps_the_arrays_but_marks_the_scope_finished():
    scope = backend.open_scope("task-a")
    scope.put("x", _array(64))
    assert backend.is_active("task-a")

    assert backend.close_scope("task-a", reset=False) == 0
    assert not backend.is_active("task-a")
    assert backend.nbytes("task-a") == 64  # still there: only a reset frees it
    assert backend.reset_scope_if_idle("task-a") == 64  # and now the safety net may


def test_close_scope_resets_by_default():
    backend.open_scope("task-a").put("x", _array(64))
    assert backend.close_scope("task-a") == 64
    assert backend.nbytes() == 0 and not backend.is_active("task-a")


def test_reopened_scope_stays_active_until_closed_as_often_as_opened():
    backend.open_scope("task-a")
    backend.open_scope("task-a")
    backend.close_scope("task-a", reset=False)
    assert backend.is_active("task-a")
    backend.close_scope("task-a", reset=False)
    assert not backend.is_active("task-a")


def test_reset_scope_if_idle_leaves_an_active_scope_alone():
    scope = backend.open_scope("running")
    data = _array(128, 3)
    scope.put("x", data)

    assert backend.reset_scope_if_idle("running") == 0
    assert scope.get("x") is data and backend.nbytes("running") == 128

    backend.close_scope("running", reset=False)
    assert backend.reset_scope_if_idle("running") == 128
    assert backend.nbytes() == 0


def test_reset_idle_scopes_frees_finished_and_foreign_scopes_only():
    running = backend.open_scope("running")
    running.put("x", _array(100))
    backend.open_scope("finished").put("x", _array(20))
    backend.close_scope("finished", reset=False)
    backend.Scope("never-opened").put("x", _array(3))  # a task that never opened its scope

    assert backend.reset_idle_scopes() == 23
    assert backend.scope_keys() == ["running"]
    assert backend.nbytes("running") == 100


def test_scope_context_manager_resets_on_error():
    with pytest.raises(ZeroDivisionError):
        with backend.scope("task-a") as scope:
            scope.put("x", _array(256))
            assert backend.is_active("task-a")
            1 / 0
    assert backend.nbytes() == 0 and not backend.is_active("task-a")


# --- two threads, one process ---------------------------------------------------


def test_two_threads_resetting_their_own_scopes_never_lose_each_others_data():
    """Two task threads of one worker, interleaved at a barrier, each checking its arrays right
    before its own reset while the other thread puts or resets at the same moment."""
    iterations, per_iteration = 300, 6
    barrier = threading.Barrier(2, timeout=30)
    errors: list[str] = []

    def task_thread(thread: int) -> None:
        key = ("hcs-well", "plate", f"thread-{thread}")
        try:
            for iteration in range(iterations):
                scope = backend.open_scope(key)
                value = (thread * 100 + iteration) % 251
                expected = {f"step0/{i}": value for i in range(per_iteration)}
                for path, fill in expected.items():
                    scope.put(path, np.full(1000 + thread, fill, dtype=np.uint8))
                barrier.wait()  # both scopes are full: from here on the two threads race
                if scope.paths() != sorted(expected):
                    raise AssertionError(f"iteration {iteration}: paths {scope.paths()}")
                for path, fill in expected.items():
                    array = scope.get(path)
                    if array.shape != (1000 + thread,) or not (array == fill).all():
                        raise AssertionError(f"iteration {iteration}: {path} was overwritten")
                freed = backend.close_scope(key)
                if freed != per_iteration * (1000 + thread):
                    raise AssertionError(f"iteration {iteration}: reset freed {freed} bytes")
                if backend.n_entries(key) != 0:
                    raise AssertionError(f"iteration {iteration}: scope not empty after its reset")
        except Exception as error:  # reported on the main thread; the barrier frees the other one
            errors.append(f"thread {thread}: {type(error).__name__}: {error}")
            barrier.abort()

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so that puts, checks and resets interleave
    try:
        threads = [threading.Thread(target=task_thread, args=(t,)) for t in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(previous)

    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    assert backend.nbytes() == 0


def test_process_wide_figures_while_two_threads_put_and_delete():
    """The worker plugin and run_well read process-wide figures while task threads fill and
    empty their own scopes: reading must never fail or block them."""
    stop = threading.Event()
    errors: list[str] = []

    def task_thread(key: str) -> None:
        scope = backend.open_scope(key)
        small = np.zeros(8)
        i = 0
        try:
            while not stop.is_set():
                scope.put(f"p{i % 64}", small)
                i += 1
                if i % 64 == 0:
                    scope.delete_prefix("p")
        except Exception as error:
            errors.append(f"{key}: {type(error).__name__}: {error}")
        finally:
            backend.close_scope(key)

    def reader() -> None:
        try:
            while not stop.is_set():
                backend.nbytes()
                backend.n_entries()
                backend.scope_keys()
        except Exception as error:
            errors.append(f"reader: {type(error).__name__}: {error}")

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=task_thread, args=(k,)) for k in ("a", "b")]
        threads.append(threading.Thread(target=reader))
        for thread in threads:
            thread.start()
        stop.wait(0.5)
        stop.set()
        for thread in threads:
            thread.join(10)
    finally:
        sys.setswitchinterval(previous)

    assert not errors, errors
    assert backend.nbytes() == 0


class _Hook:
    """A stored object whose size is read through a callback: lets a test pause a thread
    exactly while the backend is reading the scope that holds it."""

    def __init__(self, on_size) -> None:
        self._on_size = on_size

    @property
    def nbytes(self) -> int:
        self._on_size()
        return 1


def test_process_wide_nbytes_in_the_middle_of_another_threads_delete_prefix():
    """Deterministic form of the race above: the writer's delete_prefix reads a size, which
    starts a process-wide nbytes() in another thread; that reader then pauses *inside* its walk
    over the writer's scope until the writer's call has returned. A scope changed outside the
    lock would raise 'dictionary changed size during iteration' in the reader."""
    reader_inside, writer_done = threading.Event(), threading.Event()
    outcome: list[BaseException | int] = []

    def reader() -> None:
        try:
            outcome.append(backend.nbytes())
        except BaseException as error:  # handed to the main thread
            outcome.append(error)

    reader_thread = threading.Thread(target=reader)

    def writer_pauses() -> None:
        reader_thread.start()
        # Bounded: where the size is read under the lock, the reader cannot get in until later.
        reader_inside.wait(0.5)

    def reader_pauses() -> None:
        reader_inside.set()
        writer_done.wait(5)

    scope = backend.open_scope("writer")
    scope.put("x/1", _Hook(writer_pauses))
    scope.put("x/2", _array(8))
    scope.put("y", _Hook(reader_pauses))
    assert scope.delete_prefix("x/") == 1 + 8
    writer_done.set()
    if not reader_thread.is_alive() and not outcome:
        reader_thread.start()  # the backend did not read the sizes at all
    reader_thread.join(10)

    [result] = outcome
    if isinstance(result, BaseException):
        raise result
    assert result == 1
    assert scope.paths() == ["y"]
