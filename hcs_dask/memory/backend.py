"""The memory backend: a well's intermediate arrays, in process, scoped by task.

Every running well task owns a *scope* keyed by its Dask task key. Arrays live
under virtual paths inside that scope. :func:`reset_scope` frees exactly one
scope, so two threads of one worker, each resetting its own scope, never lose
each other's data. :func:`reset_memory_backend` frees everything and is meant
for an idle worker only.

This module's state is the registry of scopes and the marks of the scopes whose
task is running, guarded by one lock because scopes are opened and reset from
task threads while the worker plugin inspects them from its own thread.
:func:`reset_memory_backend` empties both. It is not the package's only
module-level state: :mod:`hcs_dask.memory.gpu` keeps the GPU cleaner registry
(reset by ``reset_cleaner_registry``), and other modules keep caches of their own.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Hashable, Iterator

ScopeKey = Hashable

_lock = threading.Lock()
_scopes: dict[ScopeKey, dict[str, Any]] = {}
# Scopes whose task is still running: a safety-net reset must leave them alone.
_active: dict[ScopeKey, int] = {}


def _nbytes(value: Any) -> int:
    return int(getattr(value, "nbytes", 0) or 0)


class Scope:
    """One task's slice of the memory backend (a thin view; the data lives in the registry)."""

    __slots__ = ("key",)

    def __init__(self, key: ScopeKey) -> None:
        self.key = key

    # Every access holds the registry lock: another thread may be summing the whole
    # process's bytes (or resetting idle scopes) while this task mutates its own scope.
    def _entries(self) -> dict[str, Any]:
        return _scopes.setdefault(self.key, {})

    def put(self, path: str, array: Any) -> None:
        """Store ``array`` under the virtual ``path`` (replacing what was there)."""
        with _lock:
            self._entries()[path] = array

    def get(self, path: str) -> Any:
        with _lock:
            try:
                return self._entries()[path]
            except KeyError:
                raise KeyError(f"memory backend scope {self.key!r} has no {path!r}") from None

    def pop(self, path: str) -> Any:
        with _lock:
            return self._entries().pop(path)

    def delete_prefix(self, prefix: str) -> int:
        """Drop every path under ``prefix``; returns the bytes released."""
        with _lock:
            entries = self._entries()
            doomed = [entries.pop(p) for p in [p for p in entries if p.startswith(prefix)]]
        return sum(_nbytes(value) for value in doomed)

    def paths(self, prefix: str = "") -> list[str]:
        with _lock:
            return sorted(p for p in self._entries() if p.startswith(prefix))

    def nbytes(self) -> int:
        return nbytes(self.key)

    def __len__(self) -> int:
        with _lock:
            return len(self._entries())


def open_scope(key: ScopeKey) -> Scope:
    """Open (or re-enter) the scope of task ``key`` and mark it running.

    Pair every call with :func:`close_scope` in a ``finally``.
    """
    with _lock:
        _scopes.setdefault(key, {})
        _active[key] = _active.get(key, 0) + 1
    return Scope(key)


def close_scope(key: ScopeKey, *, reset: bool = True) -> int:
    """Mark the scope of ``key`` finished and free it; returns the bytes released.

    ``reset=False`` leaves the arrays in place; it exists for the memory-stability
    benchmark's run without cleanup, to measure what the reset prevents.
    """
    with _lock:
        remaining = _active.get(key, 1) - 1
        if remaining > 0:
            _active[key] = remaining
        else:
            _active.pop(key, None)
    return reset_scope(key) if reset else 0


@contextmanager
def scope(key: ScopeKey) -> Iterator[Scope]:
    """The scope of task ``key`` for the duration of the block, reset on exit.

    The reset in ``finally`` is the contract: whatever the block raises, the
    scope's arrays are released before the exception travels further.
    """
    opened = open_scope(key)
    try:
        yield opened
    finally:
        close_scope(key)


def reset_scope(key: ScopeKey) -> int:
    """Free the scope of task ``key``; returns the bytes it held. Other scopes are untouched."""
    with _lock:
        entries = _scopes.pop(key, None)
    if not entries:
        return 0
    freed = sum(_nbytes(v) for v in entries.values())
    entries.clear()
    return freed


def reset_scope_if_idle(key: ScopeKey) -> int:
    """Free the scope of ``key`` unless its task is running; check and free are one step."""
    with _lock:
        if key in _active:
            return 0
        entries = _scopes.pop(key, None)
    return sum(_nbytes(v) for v in entries.values()) if entries else 0


def reset_idle_scopes() -> int:
    """Free every scope whose task is not running (the worker plugin's safety net)."""
    with _lock:
        idle = [key for key in _scopes if key not in _active]
    return sum(reset_scope_if_idle(key) for key in idle)


def reset_memory_backend() -> int:
    """Free every scope, running or not. For an idle worker (or tests) only."""
    with _lock:
        keys = list(_scopes)
        _active.clear()
    return sum(reset_scope(key) for key in keys)


def is_active(key: ScopeKey) -> bool:
    with _lock:
        return key in _active


def nbytes(key: ScopeKey | None = None) -> int:
    """Bytes held by one scope, or by the whole process when ``key`` is None."""
    with _lock:
        if key is not None:
            return sum(_nbytes(v) for v in _scopes.get(key, {}).values())
        return sum(_nbytes(v) for entries in _scopes.values() for v in entries.values())


def n_entries(key: ScopeKey | None = None) -> int:
    """Number of arrays held by one scope, or by the whole process."""
    with _lock:
        if key is not None:
            return len(_scopes.get(key, {}))
        return sum(len(entries) for entries in _scopes.values())


def scope_keys() -> list[ScopeKey]:
    with _lock:
        return list(_scopes)
