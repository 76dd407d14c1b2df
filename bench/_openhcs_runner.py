"""Runs inside OpenHCS's own virtual environment (started by ``bench/openhcs.py``); imports nothing of hcs_dask.

    python _openhcs_runner.py version
    python _openhcs_runner.py generate PLATE --wells 96      # OpenHCS's SyntheticMicroscopyGenerator
    python _openhcs_runner.py run PLATE OUT --workers 1      # the anchor pipeline; prints the phases' seconds

``run`` is the anchor workload in OpenHCS's terms: ``stack_percentile_normalize`` (percentiles 1 and
99.8) with ``variable_components=[Z_INDEX]`` (one percentile pair per z-stack), then
``create_projection`` (max) over ``Z_INDEX``; OpenHCS writes its output as TIFFs under ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import sys
import threading
import time
from pathlib import Path

__all__: list[str] = []

# This folder holds bench/openhcs.py, which would shadow the openhcs package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

_ROWS = "ABCDEFGHIJKLMNOP"


def _well_names(count: int) -> list[str]:
    columns = 12 if count <= 96 else 24
    return [f"{_ROWS[i // columns]}{i % columns + 1:02d}" for i in range(count)]


def generate(plate: Path, wells: int, size: int) -> None:
    import contextlib
    import io

    from openhcs.demo.synthetic_data import SyntheticMicroscopyGenerator

    generator = SyntheticMicroscopyGenerator(output_dir=str(plate), grid_size=(2, 2), tile_size=(size, size),
                                             wavelengths=2, z_stack_levels=3, wells=_well_names(wells),
                                             random_seed=0)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per tile
        generator.generate_dataset()


def run(plate: Path, output: Path, workers: int) -> dict[str, float]:
    start = time.perf_counter()
    from objectstate.lazy_factory import ensure_global_config_context
    from openhcs.constants.constants import VariableComponents
    from openhcs.core.config import GlobalPipelineConfig, LazyPathPlanningConfig, LazyProcessingConfig, PipelineConfig
    from openhcs.core.orchestrator.orchestrator import PipelineOrchestrator
    from openhcs.core.progress import set_progress_queue
    from openhcs.core.steps.function_step import FunctionStep
    from openhcs.processing.backends.processors.numpy_processor import create_projection, stack_percentile_normalize

    phases = {"import": time.perf_counter() - start}
    ensure_global_config_context(GlobalPipelineConfig, GlobalPipelineConfig(num_workers=workers))
    over_z = [VariableComponents.Z_INDEX]
    steps = [
        FunctionStep(func=(stack_percentile_normalize, {"low_percentile": 1.0, "high_percentile": 99.8}),
                     name="percentile_normalize", processing_config=LazyProcessingConfig(variable_components=over_z)),
        FunctionStep(func=create_projection, name="max_projection",
                     processing_config=LazyProcessingConfig(variable_components=over_z)),
    ]
    mark = time.perf_counter()
    orchestrator = PipelineOrchestrator(
        plate, pipeline_config=PipelineConfig(path_planning_config=LazyPathPlanningConfig(global_output_folder=output)))
    orchestrator.initialize()
    # OpenHCS refuses to run without a progress queue; this one is drained and dropped.
    progress = multiprocessing.get_context("spawn").Queue()
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                progress.get(timeout=0.2)
            except queue.Empty:
                continue

    threading.Thread(target=drain, daemon=True).start()
    set_progress_queue(progress)
    try:
        bundle = orchestrator.compile_pipelines(pipeline_definition=steps)
    finally:
        set_progress_queue(None)
    phases["initialize + compile"] = time.perf_counter() - mark
    mark = time.perf_counter()
    results = orchestrator.execute_compiled_plate(
        execution_bundle=bundle, progress_queue=progress,
        progress_context={"execution_id": "hcs-dask-bench", "plate_id": str(plate), "axis_id": ""})
    phases["execute"] = time.perf_counter() - mark
    stop.set()
    failed = {well: str(getattr(r, "status", r)) for well, r in results.items()
              if "success" not in str(getattr(r, "status", r)).lower()}
    if failed:
        raise SystemExit(f"OpenHCS: {len(failed)} well(s) did not succeed: {dict(list(failed.items())[:3])}")
    phases["wells"] = len(results)
    return phases


def main() -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("version")
    g = commands.add_parser("generate")
    g.add_argument("plate", type=Path)
    g.add_argument("--wells", type=int, default=96)
    g.add_argument("--size", type=int, default=128)
    r = commands.add_parser("run")
    r.add_argument("plate", type=Path)
    r.add_argument("output", type=Path)
    r.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.command == "version":
        from importlib.metadata import version

        print(version("openhcs"))
    elif args.command == "generate":
        generate(args.plate, args.wells, args.size)
    else:
        print(json.dumps(run(args.plate, args.output, args.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
