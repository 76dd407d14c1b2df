"""hcs_dask: plate-scale image processing for high-content screening, as Dask task graphs.

Each well's chain of steps is one Dask task; after every task, on success and
failure alike, the well's memory-backend scope is reset and the GPU memory
pools of loaded frameworks are released, before the result is returned.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Read at package import, before any nanny of this process can write it (see hcs_dask.cluster).
from hcs_dask import _environ  # noqa: F401

# The public names, by the module that defines them. They are imported on first use
# (``hcs_dask.run_plate``, ``from hcs_dask import Pipeline``), so that ``import hcs_dask``
# and ``hcs-dask --help`` do not pay for Dask, zarr, ome-zarr-models and pandas.
_PUBLIC = {
    "hcs_dask.compile": ("CompileError", "PlateGraph", "WellPlan", "compile_plate"),
    "hcs_dask.driver": ("PlateRun", "run_plate", "submit_plate"),
    "hcs_dask.fingerprint": ("FingerprintError",),
    "hcs_dask.guard": ("run_well",),
    "hcs_dask.options": ("ClusterSpec", "OptionError", "RunPolicy"),
    "hcs_dask.formats": ("PlateError", "open_plate", "write_synthetic_plate"),
    "hcs_dask.memory.gpu": ("register_cleaner", "release_gpu_pools"),
    "hcs_dask.pipeline": ("Pipeline", "PipelineError", "Step", "StepContext", "load_pipeline"),
    "hcs_dask.plate": ("ImageKey", "Plate", "Well"),
    "hcs_dask.plugin": ("CleanupPlugin", "cleanup_stats"),
    "hcs_dask.results": ("ExecutionResult", "PlateResult"),
    "hcs_dask.store": ("OutputError",),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

if TYPE_CHECKING:
    from hcs_dask.compile import CompileError, PlateGraph, WellPlan, compile_plate
    from hcs_dask.driver import PlateRun, run_plate, submit_plate
    from hcs_dask.fingerprint import FingerprintError
    from hcs_dask.formats import PlateError, open_plate, write_synthetic_plate
    from hcs_dask.guard import run_well
    from hcs_dask.memory.gpu import register_cleaner, release_gpu_pools
    from hcs_dask.options import ClusterSpec, OptionError, RunPolicy
    from hcs_dask.pipeline import Pipeline, PipelineError, Step, StepContext, load_pipeline
    from hcs_dask.plate import ImageKey, Plate, Well
    from hcs_dask.plugin import CleanupPlugin, cleanup_stats
    from hcs_dask.results import ExecutionResult, PlateResult
    from hcs_dask.store import OutputError


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        try:  # a submodule not imported yet: hcs_dask.cluster, hcs_dask.steps, ...
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found once, then an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "CleanupPlugin",
    "ClusterSpec",
    "CompileError",
    "ExecutionResult",
    "FingerprintError",
    "ImageKey",
    "OptionError",
    "OutputError",
    "Pipeline",
    "PipelineError",
    "Plate",
    "PlateError",
    "PlateGraph",
    "PlateResult",
    "PlateRun",
    "Step",
    "RunPolicy",
    "StepContext",
    "Well",
    "WellPlan",
    "cleanup_stats",
    "compile_plate",
    "load_pipeline",
    "open_plate",
    "register_cleaner",
    "release_gpu_pools",
    "run_plate",
    "run_well",
    "submit_plate",
    "write_synthetic_plate",
]
__version__ = "0.1.0"
