"""hcs_dask: plate-scale image processing for high-content screening, as Dask task graphs.

Each well's chain of steps is one Dask task; after every task, on success and
failure alike, the well's memory-backend scope is reset and the GPU memory
pools of loaded frameworks are released, before the result is returned.
"""

from hcs_dask.compile import CompileError, PlateGraph, WellPlan, compile_plate
from hcs_dask.driver import PlateRun, run_plate, submit_plate
from hcs_dask.fingerprint import FingerprintError
from hcs_dask.guard import run_well
from hcs_dask.options import ClusterSpec, OptionError, RunPolicy
from hcs_dask.formats import PlateError, open_plate, write_synthetic_plate
from hcs_dask.memory.gpu import register_cleaner, release_gpu_pools
from hcs_dask.pipeline import Pipeline, PipelineError, Step, StepContext, load_pipeline
from hcs_dask.plate import ImageKey, Plate, Well
from hcs_dask.plugin import CleanupPlugin, cleanup_stats
from hcs_dask.results import ExecutionResult, PlateResult
from hcs_dask.store import OutputError

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
