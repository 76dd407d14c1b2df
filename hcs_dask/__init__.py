"""hcs_dask: plate-scale image processing for high-content screening, as Dask task graphs.

Each well's chain of steps is one Dask task; after every task, on success and
failure alike, the well's memory-backend scope is reset and the GPU memory
pools of loaded frameworks are released, before the result is returned.
"""

import os as _os

#: Whether the user's environment set MALLOC_TRIM_THRESHOLD_ before hcs_dask was imported
#: (a Dask nanny started later in this process sets it too; see hcs_dask.cluster).
_USER_SET_MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_" in _os.environ

from hcs_dask.compile import CompileError, PlateGraph, WellPlan, compile_plate
from hcs_dask.execute import run_plate, run_well
from hcs_dask.fingerprint import FingerprintError
from hcs_dask.formats import PlateError, open_plate, write_synthetic_plate
from hcs_dask.memory.gpu import register_cleaner, release_gpu_pools
from hcs_dask.pipeline import Pipeline, PipelineError, Step, StepContext, load_pipeline
from hcs_dask.plate import ImageKey, Plate, Well
from hcs_dask.plugin import CleanupPlugin, cleanup_stats
from hcs_dask.results import ExecutionResult, PlateResult
from hcs_dask.store import OutputError

__all__ = [
    "CleanupPlugin",
    "CompileError",
    "ExecutionResult",
    "FingerprintError",
    "ImageKey",
    "OutputError",
    "Pipeline",
    "PipelineError",
    "Plate",
    "PlateError",
    "PlateGraph",
    "PlateResult",
    "Step",
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
    "write_synthetic_plate",
]
__version__ = "0.1.0"
