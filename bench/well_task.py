"""The well task without Dask: ``run_well`` called in this process, well after well, against the bare loop.

What a well task costs over its bare work, with neither a scheduler, a worker's event loop nor
another process in the figure: ``hcs_dask.guard.run_well`` (the manifest records, the chain,
the pyramid-less field writes with their NGFF metadata, the cleanup, the durable commit) on
every well of a compiled plate, against ``bare_loop.bare_loop`` on the same plate (the same
reads, arithmetic and pixel bytes, plain zarr). Variants alternate, ``--repeats`` times: bare,
``run_well``, and ``run_well`` with ``fsync=False``; the best run of each counts. Prints ms per
well, the difference to the bare work per well (the target of issue 14's item 3 is ≤ 5 ms inside
the task, the fsync's share printed apart), and the process CPU per well. Exits 0.

    python bench/well_task.py                       # the anchor plate (96 wells, 128 px), 3 repeats
    python bench/well_task.py --plate FOLDER        # an ImageXpress-style plate (OpenHCS's generator's too)
    python bench/well_task.py --quick               # 12 wells, 1 repeat
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import cloudpickle
from _common import LoadMonitor, PlateSpec, anchor_pipeline, best, note, subset, synthetic_plate, table, workdir_from
from bare_loop import bare_loop, scan_plate

from hcs_dask import compile_plate, open_plate
from hcs_dask.guard import run_well

ANCHOR = PlateSpec(wells=96, sites=4, channels=2, z=3, size=128)
TARGET_MS = 5.0


def run_wells(plate, output: Path, *, fsync: bool) -> tuple[float, float]:
    """Compile (with layout) outside the clocks, then run every well; returns their seconds and CPU seconds."""
    pipeline = anchor_pipeline()
    graph = compile_plate(plate, pipeline, output, overwrite=True, fsync=fsync)
    blob = cloudpickle.dumps(pipeline)

    def wells() -> None:
        for plan in graph.plans:
            result = run_well(plan, blob, 1, "bench-1")
            if not result.ok:
                raise SystemExit(f"well {plan.well.name} failed: {result.error}")

    return timed(wells)


def timed(work) -> tuple[float, float]:
    """Seconds and process CPU seconds of ``work()``."""
    start, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plate", help="an ImageXpress-style plate folder (default: the synthetic anchor plate)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="12 wells, 1 repeat")
    parser.add_argument("--workdir", help="where plates and outputs go (kept); default a temporary folder")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    with workdir_from(args.workdir) as workdir:
        folder = Path(args.plate) if args.plate else synthetic_plate(workdir, ANCHOR)[0]
        plate = open_plate(folder)
        if args.quick:
            plate = subset(plate, 12)
        wells = {w.name for w in plate.wells}
        index = {well: sites for well, sites in scan_plate(folder).items() if well in wells}
        n = len(index)
        variants = {
            "bare": lambda: timed(lambda: bare_loop(index, workdir / "bare.zarr")),
            "run_well": lambda: run_wells(plate, workdir / "task.ome.zarr", fsync=True),
            "run_well, no fsync": lambda: run_wells(plate, workdir / "task-nofsync.ome.zarr", fsync=False),
        }
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        with LoadMonitor() as load:
            run_wells(plate, workdir / "warm.ome.zarr", fsync=True)  # imports and caches, outside the clock
            for repeat in range(repeats):
                for name, variant in variants.items():
                    wall, used = variant()
                    seconds[name].append(wall)
                    cpu[name].append(used)
                    print(f"  repeat {repeat + 1}: {name:20} {seconds[name][-1]:6.2f} s", flush=True)
        for path in ("bare.zarr", "task.ome.zarr", "task-nofsync.ome.zarr", "warm.ome.zarr"):
            shutil.rmtree(workdir / path, ignore_errors=True)
    bare = best(seconds["bare"]) / n * 1e3
    rows = []
    for name in variants:
        per_well = best(seconds[name]) / n * 1e3
        rows.append([name, ", ".join(f"{s:.2f}" for s in seconds[name]), per_well, per_well - bare,
                     best(cpu[name]) / n * 1e3])
    table(["variant", "runs (s)", "ms/well", "− bare ms/well", "CPU ms/well"], rows,
          title=f"{n} wells of {folder}, in this process (no Dask): best of {repeats}")
    task = best(seconds["run_well"]) / n * 1e3 - bare
    nofsync = best(seconds["run_well, no fsync"]) / n * 1e3 - bare
    print(f"\nrun_well over the bare work: {task:.1f} ms/well with the durable commit, {nofsync:.1f} ms/well "
          f"without fsync (the fsyncs: {task - nofsync:.1f} ms/well on this disk); target ≤ {TARGET_MS:g} ms")
    load.report()
    note("a Dask worker adds its event loop, the task's transitions and the client's round trip: "
         "bench/throughput.py measures those")


if __name__ == "__main__":
    main()
