"""A worker preload for tests without a GPU: stand-ins for RMM, ``dask_cuda.utils`` and cuda-python.

``LocalCluster(preload=[path of this file])`` runs :func:`dask_setup` in every worker
process before it joins the scheduler, restarted workers included. The stand-in RMM
holds a 64 MiB ``PoolMemoryResource`` for device 0 (what dask-cuda's
``rmm_pool_size="64MiB"`` makes) and records every ``rmm.reinitialize`` call in
``sys.modules["rmm"].reinitialize_calls``.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import dask

__all__ = ["dask_setup", "install"]

POOL_BYTES = 64 << 20


def _parse_device_bytes(value: Any, device_index: int = 0, alignment_size: int = 1) -> int | None:
    if value is None:
        return None
    size = dask.utils.parse_bytes(value) if isinstance(value, str) else int(value)
    return size // alignment_size * alignment_size


def install() -> None:
    """Put the stand-ins into this process's ``sys.modules``."""
    state = {"pool": POOL_BYTES}

    class CudaMemoryResource:
        def get_upstream(self) -> None:
            return None

    class PoolMemoryResource:
        def pool_size(self) -> int:
            return state["pool"]

        def get_upstream(self) -> CudaMemoryResource:
            return CudaMemoryResource()

    resources = {0: PoolMemoryResource()}
    rmm = types.ModuleType("rmm")
    rmm.reinitialize_calls = []  # type: ignore[attr-defined]

    def reinitialize(**options: Any) -> None:
        rmm.reinitialize_calls.append(options)  # type: ignore[attr-defined]
        state["pool"] = options.get("initial_pool_size") or 0

    rmm.reinitialize = reinitialize  # type: ignore[attr-defined]
    rmm.mr = types.SimpleNamespace(  # type: ignore[attr-defined]
        get_log_filenames=lambda: {device: None for device in resources},
        get_per_device_resource=lambda device: resources[device],
    )
    runtime = types.ModuleType("cuda.bindings.runtime")
    runtime.cudaDeviceSynchronize = lambda: (0,)  # type: ignore[attr-defined]
    utils = types.ModuleType("dask_cuda.utils")
    utils.parse_device_bytes = _parse_device_bytes  # type: ignore[attr-defined]
    package = types.ModuleType("dask_cuda")
    package.utils = utils  # type: ignore[attr-defined]
    sys.modules.update({"rmm": rmm, "cuda.bindings.runtime": runtime, "dask_cuda": package,
                        "dask_cuda.utils": utils})


def dask_setup(worker: Any) -> None:
    install()
