"""Bytes to disk for every writer of the store: metadata documents, atomic writes, fsyncs."""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import zarr

__all__ = ["fsync_path", "fsync_paths", "group_document", "metadata_files", "publish", "stage_file",
           "stop_flushers", "write_file", "write_files"]


def metadata_files(build: Callable[[zarr.Group], Any]) -> dict[str, bytes]:
    """The ``zarr.json`` files zarr writes for ``build(group)`` run on an empty in-memory group.

    Keys are store paths (``"zarr.json"``, ``"0/zarr.json"``, …); no chunk data is written.

    Examples
    --------
    >>> sorted(metadata_files(lambda group: group.create_group("A")))
    ['A/zarr.json', 'zarr.json']
    """
    files: dict[str, Any] = {}
    build(zarr.open_group(zarr.storage.MemoryStore(files), mode="w", zarr_format=3))
    return {key: buffer.to_bytes() for key, buffer in files.items()}


def group_document(attributes: dict) -> bytes:
    """A zarr v3 group's ``zarr.json`` with these attributes (values JSON-encoded, others as ``str``).

    Examples
    --------
    >>> json.loads(group_document({"a": 1}))
    {'zarr_format': 3, 'node_type': 'group', 'attributes': {'a': 1}}
    """
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}, default=str).encode()


def write_file(path: Path, data: bytes, *, atomic: bool = False, durable: bool = False,
               flush_folders: Sequence[Path] = ()) -> None:
    """Write ``data`` to ``path``.

    ``atomic``: through a temporary file in the same folder and a rename, so a reader sees the
    old file or the new one. ``durable``: the file is flushed to disk before that rename, and
    (with ``atomic``) the folder after it, so that the rename itself survives a power cut;
    ``flush_folders`` are flushed together with that folder (the folders above a new one).
    """
    if not atomic:
        with open(path, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        return
    staged = stage_file(path, data)
    if durable:
        fsync_path(staged)
    publish(staged, path, durable=durable, flush_folders=flush_folders)


def stage_file(path: Path, data: bytes) -> Path:
    """Write ``data`` to the temporary file that :func:`publish` renames to ``path``; returns its path.

    Not flushed: a caller that flushes many files at once (:func:`fsync_paths`) flushes it with them.
    """
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(staged, "wb") as handle:
        handle.write(data)
    return staged


def publish(staged: Path, path: Path, *, durable: bool = False, flush_folders: Sequence[Path] = ()) -> None:
    """Rename a :func:`stage_file` into place; ``durable``: then flush its folder (and ``flush_folders``).

    With ``durable`` the staged file must have been flushed already: the rename is what makes
    it visible, and a power cut must not leave a visible name on unflushed data.
    """
    os.replace(staged, path)
    if durable:
        if flush_folders:
            fsync_paths([path.parent, *flush_folders])
        else:
            fsync_path(path.parent)


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: fsync waits on the disk, not the CPU: a few threads flush many small files together, each its
#: own share of them one after the other, and the calling thread one share itself. A well's
#: fields are some 20-30 files and folders. Measured on ext4 (2-core VM, 21 paths a well):
#: one thread 3.4-3.7 ms; 8 shares 1.5 ms wall and 1.0 ms CPU; one path per task of a 32-thread
#: pool the same 1.5 ms wall but 1.8 ms CPU (the hand-offs), CPU the other worker of a 2-core
#: machine needs. Threads start only as they are needed.
_FLUSHERS = 8
_flushers_pool: ThreadPoolExecutor | None = None
_flushers_lock = threading.Lock()


def _flushers() -> ThreadPoolExecutor:
    global _flushers_pool
    with _flushers_lock:
        if _flushers_pool is None:
            _flushers_pool = ThreadPoolExecutor(max_workers=_FLUSHERS - 1, thread_name_prefix="hcs-dask-fsync")
        return _flushers_pool


def _in_shares(work: Callable[[Any], Any], items: Iterable[Any]) -> None:
    """``work(item)`` for every item: up to :data:`_FLUSHERS` shares at once, one of them on this thread.

    Returns when every share has ended; then raises the error of the first share (in order) that failed.
    """
    items = list(items)
    shares = [items[start::_FLUSHERS] for start in range(min(_FLUSHERS, len(items)))]

    def run(share: list[Any]) -> None:
        for item in share:
            work(item)

    futures = [_flushers().submit(run, share) for share in shares[1:]]
    error: BaseException | None = None
    try:
        if shares:
            run(shares[0])
    except BaseException as raised:  # noqa: BLE001  (raised below, once the other shares have ended)
        error = raised
    for future in futures:
        raised = future.exception()  # waits for the share to end
        if error is None:
            error = raised
    if error is not None:
        raise error


def stop_flushers() -> None:
    """End the threads that flush and write files; the next :func:`fsync_paths` starts new ones.

    Every call that used them has returned by then, so they are idle and end at once. The
    console script calls this before it exits without the interpreter's teardown, which it
    does only where no thread but daemon ones is left (``hcs_dask.cli.entry``).
    """
    global _flushers_pool
    with _flushers_lock:
        pool, _flushers_pool = _flushers_pool, None
    if pool is not None:
        pool.shutdown(wait=True)


def fsync_paths(paths: Iterable[str | Path]) -> None:
    """:func:`fsync_path` on every path, a few at a time; returns when all are on disk."""
    _in_shares(fsync_path, paths)


def write_files(files: dict[Path, bytes], *, durable: bool = False) -> None:
    """:func:`write_file` (not atomic) for every path, a few at a time; ``durable``: each one flushed."""
    _in_shares(lambda item: write_file(item[0], item[1], durable=durable), files.items())
