"""Where wells run: an embedded LocalCluster, a LocalCUDACluster, or an existing scheduler."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import dask

#: How the embedded scheduler treats worker deaths. hcs_dask retries a well whose
#: worker died itself (``worker_death_retries``), so the scheduler must not: with
#: ``allowed-failures`` 0 a death is reported at once as ``KilledWorker``. With
#: ``worker-saturation`` 1.0 a worker holds only as many wells as it has threads, so
#: a death implicates only the wells actually running there, never queued neighbours.
EMBEDDED_SCHEDULER_CONFIG = {
    "distributed.scheduler.allowed-failures": 0,
    "distributed.scheduler.worker-saturation": 1.0,
}

class ClusterError(RuntimeError):
    """A cluster that cannot be started or reached, with what is missing."""


def available_cores() -> int:
    """Cores this process may use (CPU affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def connect(
    *,
    client: Any = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | float | None = "auto",
    cluster: str = "local",
    **cluster_options: Any,
) -> Iterator[Any]:
    """Yield a ``distributed.Client``: the given one, one for ``scheduler``, or an embedded cluster.

    Only what this function started is closed on exit; a client passed in stays open.
    ``scheduler`` is an address (``tcp://host:8786``) or the path of a scheduler file.
    An external scheduler keeps its own ``allowed-failures`` (dask's default 3): it
    retries a dead worker's tasks itself before hcs_dask sees ``KilledWorker``.
    """
    from distributed import Client, LocalCluster

    if client is not None:
        yield client
        return
    if scheduler is not None:
        try:
            if Path(scheduler).is_file():
                remote = Client(scheduler_file=scheduler, timeout="20s")
            else:
                remote = Client(scheduler, timeout="20s")
        except OSError as error:
            raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {error}") from error
        try:
            yield remote
        finally:
            remote.close()
        return
    if cluster != "local":
        raise ClusterError(f"unknown cluster kind {cluster!r}; use 'local'")
    with dask.config.set(EMBEDDED_SCHEDULER_CONFIG):
        cluster = LocalCluster(
            n_workers=n_workers or available_cores(),
            threads_per_worker=threads_per_worker,
            processes=True,
            memory_limit=memory_limit,
            scheduler_port=0,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
            **cluster_options,
        )
    try:
        with Client(cluster) as local:
            yield local
    finally:
        cluster.close()
