"""What the run manifest costs: a 96-well plate with ``manifest=True`` (the default) and without.

The manifest is the per-well record in the store (the attributes of the zarr group
``OUT/hcs_dask/wells/<well>/``: written ``running`` by the task, then its outcome, each an
atomic rename, the outcome's flushed to disk with its folders; read back by the client instead
of transferring the result). ``run_plate(..., manifest=False)`` switches it off.
Both variants run alternately (``--repeats`` each, at least 2) on one embedded cluster that is
started and warmed up first, on the anchor plate (4 sites × 2 channels × 3 z at 128 px,
percentile normalisation + max projection). Prints each run, and the per-well overhead in ms
(best of each variant, and median); exits 0.

    python bench/manifest_overhead.py            # 96 wells, 1 worker, 3 repeats each (~4 min on 2 cores)
    python bench/manifest_overhead.py --quick    # smoke run: 24 wells, 2 repeats each
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time

from _common import (
    PlateSpec,
    anchor_pipeline,
    cpu_seconds,
    embedded_cluster,
    note,
    LoadMonitor,
    subset,
    synthetic_plate,
    table,
    workdir_from,
)

from hcs_dask import open_plate, run_plate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 24 wells, 2 repeats each")
    parser.add_argument("--wells", type=int, default=None, help="wells (default 96; 24 with --quick)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of each variant, ≥ 2 (default 3; 2 with --quick)")
    parser.add_argument("--workers", type=int, default=1, help="workers (default 1: the cost per well shows whole)")
    parser.add_argument("--workdir", help="keep the synthetic plate here and reuse it (default: a temp folder)")
    args = parser.parse_args(argv)
    wells = args.wells or (24 if args.quick else 96)
    repeats = max(2, args.repeats or (2 if args.quick else 3))
    pipeline = anchor_pipeline()
    times: dict[bool, list[float]] = {True: [], False: []}
    cpus: dict[bool, list[float]] = {True: [], False: []}
    with LoadMonitor() as load, workdir_from(args.workdir) as work:
        root, written = synthetic_plate(work, PlateSpec(wells, 4, 2, 3, 128))
        if written:
            print(f"wrote the {wells}-well plate in {written:.1f} s")
        plate = open_plate(root)
        out = work / "out"
        out.mkdir(exist_ok=True)
        with embedded_cluster(args.workers) as (client, started):
            for manifest in (True, False):
                run_plate(subset(plate, 1), pipeline, out / "warmup.ome.zarr", client=client, overwrite=True,
                          progress=False, manifest=manifest)
            print(f"cluster of {args.workers} worker(s) started in {started:.1f} s (not counted)")
            for repeat in range(repeats):
                for manifest in ((True, False) if repeat % 2 == 0 else (False, True)):
                    cpu = cpu_seconds(client)
                    start = time.perf_counter()
                    result = run_plate(plate, pipeline, out / f"manifest-{manifest}.ome.zarr", client=client,
                                       overwrite=True, progress=False, manifest=manifest)
                    times[manifest].append(time.perf_counter() - start)
                    cpus[manifest].append(cpu_seconds(client) - cpu)
                    if not result.ok:
                        failed = result.failures()[0]
                        raise SystemExit(f"run failed: {failed.well}: {failed.error_type}: {failed.error}")
                    print(f"  repeat {repeat + 1}: manifest={manifest!s:5s} {times[manifest][-1]:7.2f} s", flush=True)
        shutil.rmtree(out, ignore_errors=True)

    rows = []
    for manifest in (True, False):
        rows.append([f"manifest={manifest}", ", ".join(f"{v:.2f}" for v in times[manifest]), min(times[manifest]),
                     statistics.median(times[manifest]), min(times[manifest]) / wells * 1e3,
                     min(cpus[manifest]) / wells * 1e3])
    table(["variant", "runs (s)", "best s", "median s", "ms/well (best)", "CPU ms/well (best)"], rows,
          title=f"{wells} wells × 4 sites × 2 channels × 3 z, 128 px, {args.workers} worker(s); "
                "run_plate on a started cluster")
    best_ms = (min(times[True]) - min(times[False])) / wells * 1e3
    median_ms = (statistics.median(times[True]) - statistics.median(times[False])) / wells * 1e3
    cpu_ms = (min(cpus[True]) - min(cpus[False])) / wells * 1e3
    print(f"\nmanifest overhead per well: {best_ms:.1f} ms (best of each), {median_ms:.1f} ms (medians), "
          f"{cpu_ms:.1f} ms CPU (client + scheduler + workers)")
    load.report()
    load.warn_if_busy()
    if args.quick:
        note("--quick: fewer wells and repeats; indicative only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
