"""Linear in plate size: run time per well for 96, 384 and 1536 wells; scan and compile of a
276,480-file plate.

1. ``run``: small images (1 site, 1 channel, 2 z, 48 px; the anchor's percentile
   normalisation + max projection) so that the per-well fixed costs of hcs_dask dominate.
   Each plate runs through ``run_plate`` on one embedded cluster (started and timed first; a
   one-well warm-up pays the worker imports). The smallest plate runs first and again last
   (its best time is the reference), so that drift shows. Printed: wall time, ms per well,
   the per-well ratio to the smallest plate, and the CPU per well of this process (client and
   scheduler: where a cost growing with the plate would sit) and of the workers.
2. ``scan``: a 1536-well × 9-site × 4-channel × 5-z ImageXpress folder of zero-byte files
   (276,480 names in ``ZStep_<n>/`` folders) is indexed with ``open_plate(read_headers=False)``,
   then compiled (``dataclasses.replace(plate, shape=(64, 64), dtype="uint16")``: the files are
   empty) without and with the layout writing. These run in a fresh child process whose
   resident set size is printed after each phase; also the pickled size of one ``WellPlan``
   against the whole plate index.

Targets are printed as PASS/FAIL lines; exits 0 either way.

    python bench/scaling.py                   # 96, 384, 1536 wells + the 276k-file scan (~10 min on 2 cores)
    python bench/scaling.py --quick           # smoke run: 24, 96 wells; 1536 × 1 × 1 × 5 scan folder
    python bench/scaling.py --skip-run        # only the scan and compile figures
    python bench/scaling.py --workdir /tmp/hcs-bench   # keep plates and the 276k-file folder
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    PlateSpec,
    anchor_pipeline,
    cpu_seconds,
    embedded_cluster,
    note,
    peak_rss_mb,
    LoadMonitor,
    rss_mb,
    subset,
    synthetic_plate,
    table,
    verdict,
    workdir_from,
)

from hcs_dask import compile_plate, open_plate, run_plate
from hcs_dask.cluster import available_cores
from hcs_dask.plate import row_name

# Targets (issue 6).
LINEAR_TOLERANCE = 0.10
SCAN_TARGET_S = 5.0
COMPILE_TARGET_S = 5.0

SCAN_SHAPE = {"wells": 1536, "sites": 9, "channels": 4, "z": 5}


# ------------------------------------------------------------------------------- runs


def _process_cpu_only() -> float:
    return cpu_seconds(None)


def bench_runs(work: Path, sizes: list[int], workers: int, image: int, z: int) -> list[dict[str, Any]]:
    pipeline = anchor_pipeline()
    plates = {}
    for wells in sizes:
        root, written = synthetic_plate(work, PlateSpec(wells, 1, 1, z, image))
        if written:
            print(f"wrote the {wells}-well plate in {written:.1f} s")
        plates[wells] = open_plate(root)
    # Every size twice, the second time in reverse order, and the best of its two taken: a
    # reference with two chances against sizes with one read as growth (384 ÷ 96 = 1.18 and
    # 1.21 in two sessions, 1.10 with 384 run twice and 96 once).
    order = sizes + sizes[::-1]
    results: dict[int, list[dict[str, float]]] = {wells: [] for wells in sizes}
    with embedded_cluster(workers) as (client, started):
        warm = time.perf_counter()
        run_plate(subset(plates[sizes[0]], 1), pipeline, work / "out" / "warmup.ome.zarr", client=client,
                  overwrite=True, progress=False)
        print(f"cluster of {workers} worker(s) started in {started:.1f} s; "
              f"warm-up well {time.perf_counter() - warm:.2f} s")
        for wells in order:
            own = _process_cpu_only()
            total = cpu_seconds(client)
            start = time.perf_counter()
            result = run_plate(plates[wells], pipeline, work / "out" / f"scale-{wells}.ome.zarr", client=client,
                               overwrite=True, progress=False)
            wall = time.perf_counter() - start
            own = _process_cpu_only() - own
            total = cpu_seconds(client) - total
            if not result.ok:
                failed = result.failures()[0]
                raise SystemExit(f"run failed: {failed.well}: {failed.error_type}: {failed.error}")
            results[wells].append({"wall": wall, "execute": result.seconds, "client_cpu": own,
                                   "worker_cpu": total - own})
            print(f"  {wells:5d} wells: {wall:7.2f} s", flush=True)
    rows = []
    reference = min(r["wall"] for r in results[sizes[0]]) / sizes[0]
    for wells in sizes:
        best = min(results[wells], key=lambda r: r["wall"])
        per_well = best["wall"] / wells
        rows.append({"wells": wells, "runs": [r["wall"] for r in results[wells]], **best,
                     "ms_per_well": per_well * 1e3, "ratio": per_well / reference})
    return rows


# ------------------------------------------------------------------------------- scan


def _guid(text: str) -> str:
    digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest().upper()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:]}"


def write_empty_plate(folder: Path, *, wells: int, sites: int, channels: int, z: int) -> tuple[int, float]:
    """An ImageXpress folder of zero-byte images (MetaXpress names with GUIDs, ``ZStep_<n>/``
    folders). Returns the number of files and the seconds spent (0 when cached)."""
    done = folder.with_name(folder.name + ".complete")
    count = wells * sites * channels * z
    if done.exists():
        return count, 0.0
    start = time.perf_counter()
    columns = 48 if wells > 384 else 24 if wells > 96 else 12
    names = [f"{row_name(i // columns)}{i % columns + 1:02d}" for i in range(wells)]
    for zi in range(1, z + 1):
        plane = folder / f"ZStep_{zi}" if z > 1 else folder
        plane.mkdir(parents=True, exist_ok=True)
        for well in names:
            for site in range(1, sites + 1):
                for channel in range(1, channels + 1):
                    name = f"Scan_{well}_s{site}_w{channel}{_guid(f'{well}/{site}/{channel}/{zi}')}.tif"
                    os.close(os.open(plane / name, os.O_CREAT | os.O_WRONLY, 0o644))
    done.touch()
    return count, time.perf_counter() - start


def scan_child(folder: str, output: str) -> None:
    """Runs in a fresh process: scan, compile without and with layout; prints one JSON line."""
    figures: dict[str, Any] = {"rss_start_mb": rss_mb()}
    start = time.perf_counter()
    plate = open_plate(folder, read_headers=False)
    figures["scan_s"] = time.perf_counter() - start
    figures["rss_after_scan_mb"] = rss_mb()
    figures["peak_after_scan_mb"] = peak_rss_mb()
    figures["wells"], figures["files"] = len(plate.wells), plate.n_images
    plate = dataclasses.replace(plate, shape=(64, 64), dtype="uint16")
    pipeline = anchor_pipeline()
    start = time.perf_counter()
    graph = compile_plate(plate, pipeline, Path(output) / "plan-only.ome.zarr", overwrite=True, write_layout=False)
    figures["compile_s"] = time.perf_counter() - start
    figures["peak_after_compile_mb"] = peak_rss_mb()
    start = time.perf_counter()
    graph = compile_plate(plate, pipeline, Path(output) / "with-layout.ome.zarr", overwrite=True)
    figures["compile_layout_s"] = time.perf_counter() - start
    figures["peak_after_layout_mb"] = peak_rss_mb()
    figures["rss_end_mb"] = rss_mb()
    figures["plan_bytes"] = len(pickle.dumps(graph.plans[0], protocol=5))
    figures["plate_bytes"] = len(pickle.dumps(plate, protocol=5))
    figures["pipeline_bytes"] = len(pickle.dumps(pipeline, protocol=5))
    print(json.dumps(figures))


def bench_scan(work: Path, shape: dict[str, int]) -> dict[str, Any]:
    folder = work / "plates" / "empty_{wells}w_{sites}s_{channels}c_{z}z".format(**shape)
    count, written = write_empty_plate(folder, **shape)
    if written:
        print(f"wrote {count:,} empty files in {written:.1f} s")
    # The first listing after writing may still be warming the dentry cache: list once.
    for _ in os.walk(folder):
        pass
    (work / "out").mkdir(exist_ok=True)
    child = subprocess.run([sys.executable, __file__, "--scan-child", str(folder), str(work / "out")],
                           capture_output=True, text=True, check=False)
    if child.returncode != 0:
        raise SystemExit(f"scan child failed:\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1]) | {"expected_files": count}


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 24 and 96 wells; a 7,680-file scan folder")
    parser.add_argument("--sizes", help="comma-separated well counts (default 96,384,1536)")
    parser.add_argument("--workers", type=int, default=available_cores(), help="workers (default: all cores)")
    parser.add_argument("--image", type=int, default=48, help="image side in px (default 48)")
    parser.add_argument("--z", type=int, default=2, help="z planes (default 2)")
    parser.add_argument("--skip-run", action="store_true", help="only the scan and compile figures")
    parser.add_argument("--skip-scan", action="store_true", help="only the run figures")
    parser.add_argument("--workdir", help="keep plates here and reuse them (default: a temp folder)")
    parser.add_argument("--scan-child", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scan_child:
        scan_child(*args.scan_child)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([24, 96] if args.quick else [96, 384, 1536])
    scan_shape = dict(SCAN_SHAPE, sites=1, channels=1) if args.quick else SCAN_SHAPE
    with LoadMonitor() as load, workdir_from(args.workdir) as work:
        (work / "out").mkdir(exist_ok=True)
        runs = [] if args.skip_run else bench_runs(work, sizes, args.workers, args.image, args.z)
        scan = None if args.skip_scan else bench_scan(work, scan_shape)

    if runs:
        table(["wells", "runs (s)", "best s", "ms/well", "per-well ratio", "client+scheduler CPU ms/well",
               "worker CPU ms/well"],
              [[r["wells"], ", ".join(f"{v:.1f}" for v in r["runs"]), r["wall"], r["ms_per_well"], r["ratio"],
                r["client_cpu"] / r["wells"] * 1e3, r["worker_cpu"] / r["wells"] * 1e3] for r in runs],
              title=f"run time by plate size: {args.workers} worker(s), 1 site, 1 channel, {args.z} z, "
                    f"{args.image} px, anchor pipeline (run_plate on a started cluster)")
    if scan:
        table(["phase", "seconds", "RSS after MB", "peak RSS MB"], [
            ["start (imports)", float("nan"), scan["rss_start_mb"], float("nan")],
            ["scan: open_plate(read_headers=False)", scan["scan_s"], scan["rss_after_scan_mb"],
             scan["peak_after_scan_mb"]],
            ["compile_plate(write_layout=False)", scan["compile_s"], float("nan"), scan["peak_after_compile_mb"]],
            ["compile_plate (with layout)", scan["compile_layout_s"], scan["rss_end_mb"],
             scan["peak_after_layout_mb"]],
        ], title=f"scan and compile: {scan['wells']} wells, {scan['files']:,} files (client process)")
        print(f"pickled: one WellPlan {scan['plan_bytes']:,} B, the whole plate index {scan['plate_bytes']:,} B, "
              f"the pipeline {scan['pipeline_bytes']:,} B")
    load.report()

    print()
    for r in runs[1:]:
        verdict(r["ratio"] <= 1 + LINEAR_TOLERANCE,
                f"{r['wells']} wells: per-well time {r['ratio']:.2f}× that of {runs[0]['wells']} wells "
                f"(≤ {1 + LINEAR_TOLERANCE:.2f})")
    if scan:
        files_ok = scan["files"] == scan["expected_files"]
        verdict(files_ok, f"scan found {scan['files']:,} of {scan['expected_files']:,} files")
        verdict(scan["scan_s"] <= SCAN_TARGET_S, f"scan {scan['scan_s']:.2f} s ≤ {SCAN_TARGET_S:g} s")
        verdict(scan["compile_s"] <= COMPILE_TARGET_S,
                f"compile_plate without layout {scan['compile_s']:.2f} s ≤ {COMPILE_TARGET_S:g} s")
        verdict(scan["compile_layout_s"] <= COMPILE_TARGET_S,
                f"compile_plate with layout {scan['compile_layout_s']:.2f} s ≤ {COMPILE_TARGET_S:g} s")
    load.warn_if_busy()
    if args.quick:
        note("--quick: smaller plates and scan folder than the targets'; indicative only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
