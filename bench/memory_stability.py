"""Memory stability of long runs: what the per-well cleanup costs, and what it prevents.

Runs wells one after another on one single-threaded worker process and prints:

1. the worker's RSS after each well, as a least-squares slope in MB per well, with the
   cleanup and with it turned off (``gpu._set_cleanup_enabled(False)``, the measurement
   switch that exists for this benchmark only). Each well stashes an array in its
   memory-backend scope and makes a reference cycle that holds another array;
2. the median cleanup time per well and its share of the well's time, on those small
   wells and on the 256-px, 4-site, 2-channel, 3-z well of the bundled ``nuclei_count``;
3. the peak RSS of one well with 4 timepoints, processed with sequential combinations
   (one timepoint at a time, cleanup after each) and without.

Targets are printed as PASS/FAIL lines; the script exits 0 either way (a benchmark, not a
test). Every variant runs in a fresh embedded cluster of one single-threaded worker, started
as ``run_plate`` starts it (``hcs_dask.cluster.connect``: the same scheduler settings and
worker environment, so glibc's adaptive malloc, not Dask's ``MALLOC_TRIM_THRESHOLD_``).

    python bench/memory_stability.py            # 200 wells, a few minutes on 2 cores
    python bench/memory_stability.py --quick    # smoke run: 30 wells, smaller images
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hcs_dask import Pipeline, Step, load_pipeline, open_plate, run_plate, write_synthetic_plate
from hcs_dask.memory import gpu

MB = 1e6
GPU_MODULES = ("rmm", "cupy", "torch", "jax", "tensorflow")

# Targets (issue 6).
SLOPE_TARGET_MB = 0.05
CLEANUP_TARGET_S = 1e-3
SHARE_TARGET = 0.01


# --- the well's steps (shipped to the worker by value: this file is __main__ there) --------


def leave_garbage(stack: np.ndarray, *, stash_bytes: int, cycle_bytes: int, context: Any) -> np.ndarray:
    """A max projection that leaves what a careless step leaves: an array stashed in the
    well's scope, and a reference cycle that keeps another array alive until a collection."""
    context.scope.put("stash", np.ones(stash_bytes, dtype=np.uint8))  # np.ones touches every page
    cycle: list[Any] = [np.ones(cycle_bytes, dtype=np.uint8)]
    cycle.append(cycle)
    return stack.max(axis=0)


def as_float64(image: np.ndarray) -> np.ndarray:
    """Widen each plane, so that one timepoint's intermediates are a visible amount of memory."""
    return image.astype(np.float64)


def to_float32(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32)


# --- worker-side probes (run with client.run) ---------------------------------------------


def _loaded_gpu_modules() -> list[str]:
    return [name for name in GPU_MODULES if sys.modules.get(name) is not None]


def _rss_now_and_peak() -> tuple[int, int]:
    import resource

    import psutil

    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024
    return psutil.Process().memory_info().rss, peak


def _time_idle_gpu_release(repeat: int) -> float:
    """Median seconds of release_gpu_pools() alone: the GPU part of the cleanup with nothing loaded."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        gpu.release_gpu_pools()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- helpers ---------------------------------------------------------------------------------


@contextmanager
def fresh_worker() -> Iterator[Any]:
    """A new single-threaded worker process (so peaks and growth belong to this variant only)."""
    from hcs_dask.cluster import connect

    with connect(n_workers=1, threads_per_worker=1) as client:
        yield client


def on_worker(client: Any, function: Any, *args: Any) -> Any:
    [value] = client.run(function, *args).values()
    return value


def slope_mb_per_well(rss_bytes: list[int]) -> float:
    if len(rss_bytes) < 2:
        return float("nan")
    x = np.arange(len(rss_bytes), dtype=float)
    return float(np.polyfit(x, np.asarray(rss_bytes, dtype=float) / MB, 1)[0])


def in_execution_order(result: Any) -> list[Any]:
    return sorted(result.wells, key=lambda r: r.started)


def verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}  {text}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


# --- the three measurements --------------------------------------------------------------


def run_slope(plate_root: Path, work: Path, *, cleanup: bool, stash_mb: float) -> dict[str, Any]:
    stash = int(stash_mb * MB)
    pipeline = Pipeline(
        [Step(leave_garbage, stack="z", name="leave_garbage",
              kwargs={"stash_bytes": stash, "cycle_bytes": stash // 2})],
        name="memory-stability",
    )
    with fresh_worker() as client:
        on_worker(client, _rss_now_and_peak)  # imports psutil/resource before the first well
        if not cleanup:
            on_worker(client, gpu._set_cleanup_enabled, False)
        loaded = on_worker(client, _loaded_gpu_modules)
        start = time.perf_counter()
        result = run_plate(open_plate(plate_root), pipeline, work / f"slope-{cleanup}.ome.zarr",
                           client=client, progress=False)
        seconds = time.perf_counter() - start
        if not cleanup:
            on_worker(client, gpu._set_cleanup_enabled, True)
            plugin, idle_gpu_release = {}, float("nan")
        else:
            from hcs_dask import cleanup_stats

            [plugin] = cleanup_stats(client).values()
            idle_gpu_release = on_worker(client, _time_idle_gpu_release, 200)
    wells = in_execution_order(result)
    return {
        "ok": result.counts(),
        "rss": [r.memory["process"]["rss_after_cleanup_bytes"] for r in wells],
        # Process-wide bytes in the backend when each well started (after_cleanup is the well's own scope).
        "backend": [r.memory["backend_bytes_before"] for r in wells],
        "cleanup_s": [r.memory["cleanup_seconds"] for r in wells],
        "well_s": [r.seconds for r in wells],
        "loaded": loaded,
        "seconds": seconds,
        "plugin": plugin,
        "idle_gpu_release": idle_gpu_release,
    }


def run_nuclei(plate_root: Path, work: Path) -> dict[str, Any]:
    with fresh_worker() as client:
        loaded = on_worker(client, _loaded_gpu_modules)
        result = run_plate(open_plate(plate_root), load_pipeline("nuclei_count"), work / "nuclei.ome.zarr",
                           client=client, progress=False)
    wells = in_execution_order(result)[1:]  # the first well pays the imports
    return {
        "ok": result.counts(),
        "cleanup_s": [r.memory["cleanup_seconds"] for r in wells],
        "well_s": [r.seconds for r in wells],
        "loaded": loaded,
    }


def run_peak(plate_root: Path, warmup_root: Path, work: Path, *, sequential: bool) -> dict[str, Any]:
    # The peak comes from the float64 planes of the first step; one 2-D image per timepoint
    # is written, so the output itself stays small.
    steps = [
        Step(as_float64, name="as_float64"),
        Step(np.max, stack=("channel", "z"), kwargs={"axis": (0, 1)}, name="max_projection"),
        Step(to_float32, name="to_float32"),
    ]
    pipeline = Pipeline(steps, name="peak", sequential=("timepoint",) if sequential else None)
    tag = "seq" if sequential else "all"
    with fresh_worker() as client:
        # A tiny well first, so imports and codecs are loaded before the baseline is taken.
        run_plate(open_plate(warmup_root), pipeline, work / f"warmup-{tag}.ome.zarr", client=client, progress=False)
        rss_before, peak_before = on_worker(client, _rss_now_and_peak)
        result = run_plate(open_plate(plate_root), pipeline, work / f"peak-{tag}.ome.zarr",
                           client=client, progress=False)
        _, peak_after = on_worker(client, _rss_now_and_peak)
    [well] = result.wells
    return {
        "ok": result.counts(),
        "error": None if well.ok else f"{well.error_type} in step {well.step!r} {well.combination}: {well.error}",
        "rss_before": rss_before,
        "peak_before": peak_before,
        "peak": peak_after,
        "rise": peak_after - rss_before,
        "cleanups": well.memory["cleanups"],
        "seconds": well.seconds,
    }


# --- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wells", type=int, default=None,
                        help="wells in the slope runs (default 200; 30 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer wells, smaller images")
    parser.add_argument("--stash-mb", type=float, default=4.0,
                        help="MB each well stashes in its scope (the cycle holds half as much; default 4)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="first wells left out of the slope fit (default 10; 5 with --quick)")
    parser.add_argument("--peak-size", type=int, default=None,
                        help="image side of the 4-timepoint plate (default 256; 128 with --quick)")
    parser.add_argument("--peak-z", type=int, default=None,
                        help="z planes of the 4-timepoint plate (default 32; 16 with --quick)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the per-well figures of the slope runs")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write plates (default: a temp folder)")
    args = parser.parse_args(argv)

    quick = args.quick
    n_wells = args.wells if args.wells is not None else (30 if quick else 200)
    warmup = args.warmup if args.warmup is not None else (5 if quick else 10)
    if n_wells < warmup + 3:
        parser.error(f"--wells must be at least {warmup + 3} (the warm-up of {warmup} wells is not fitted)")
    nuclei = dict(wells=3, sites=2, size=128) if quick else dict(wells=9, sites=4, size=256)
    peak_size = args.peak_size or (128 if quick else 256)
    peak_z = args.peak_z or (16 if quick else 32)
    peak_channels = 3

    with tempfile.TemporaryDirectory(prefix="hcs-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        print(f"memory stability benchmark ({'quick' if quick else 'full'})")
        print(f"  slope runs: {n_wells} wells of 1 site x 1 channel x 2 z x 64 px; each well stashes "
              f"{args.stash_mb:g} MB in its scope and leaves a reference cycle holding {args.stash_mb / 2:g} MB")
        t = time.perf_counter()
        slope_root = write_synthetic_plate(work / "slope", wells=n_wells, sites=1, channels=1, z=2, size=64, seed=1)
        nuclei_root = write_synthetic_plate(work / "nuclei", wells=nuclei["wells"], sites=nuclei["sites"],
                                            channels=2, z=3, size=nuclei["size"], seed=2)
        peak_root = write_synthetic_plate(work / "peak", wells=1, sites=1, channels=peak_channels, z=peak_z,
                                          timepoints=4, size=peak_size, seed=3)
        warmup_root = write_synthetic_plate(work / "warmup", wells=1, sites=1, channels=peak_channels, z=peak_z,
                                            timepoints=4, size=64, seed=4)
        print(f"  plates written in {time.perf_counter() - t:.1f} s")

        with_cleanup = run_slope(slope_root, work, cleanup=True, stash_mb=args.stash_mb)
        without_cleanup = run_slope(slope_root, work, cleanup=False, stash_mb=args.stash_mb)
        nuclei_run = run_nuclei(nuclei_root, work)
        peak_sequential = run_peak(peak_root, warmup_root, work, sequential=True)
        peak_whole = run_peak(peak_root, warmup_root, work, sequential=False)

    # -- 1. RSS after each well ------------------------------------------------------
    print()
    print("1. worker RSS after each well (one worker process, one thread, execution order)")
    print(f"   with cleanup: {with_cleanup['ok']} in {with_cleanup['seconds']:.1f} s; "
          f"without: {without_cleanup['ok']} in {without_cleanup['seconds']:.1f} s")
    print(f"   {'well #':>7} {'RSS with cleanup':>17} {'RSS without':>12} {'backend without*':>17}")
    every = max(1, n_wells // 10)
    rows = sorted(set(range(0, n_wells, every)) | {warmup, n_wells - 1})
    for i in rows:
        mark = "  <- first fitted well" if i == warmup else ""
        print(f"   {i + 1:>7} {with_cleanup['rss'][i] / MB:>14.1f} MB {without_cleanup['rss'][i] / MB:>9.1f} MB "
              f"{without_cleanup['backend'][i] / MB:>14.1f} MB{mark}")
    print("   * memory-backend bytes of the whole worker process when the well started")
    slope_on = slope_mb_per_well(with_cleanup["rss"][warmup:])
    slope_off = slope_mb_per_well(without_cleanup["rss"][warmup:])
    print(f"   least-squares slope over wells {warmup + 1}..{n_wells} (the first {warmup} are warm-up, not fitted):")
    print(f"     with cleanup    {slope_on:+8.4f} MB/well")
    print(f"     without cleanup {slope_off:+8.4f} MB/well")

    # -- 2. cleanup time ---------------------------------------------------------------
    def time_figures(run: dict[str, Any]) -> tuple[float, float, float]:
        cleanup = statistics.median(run["cleanup_s"])
        well = statistics.median(run["well_s"])
        share = statistics.median(c / w for c, w in zip(run["cleanup_s"], run["well_s"]) if w > 0)
        return cleanup, well, share

    small_cleanup, small_well, small_share = time_figures({
        "cleanup_s": with_cleanup["cleanup_s"][warmup:], "well_s": with_cleanup["well_s"][warmup:]})
    big_cleanup, big_well, big_share = time_figures(nuclei_run)
    nuclei_label = f"nuclei_count, {nuclei['size']} px, {nuclei['sites']} sites, 2 ch, 3 z"
    print()
    print("2. the guard's cleanup time per well (medians; GPU frameworks loaded on the worker: "
          f"{', '.join(sorted(set(with_cleanup['loaded']) | set(nuclei_run['loaded']))) or 'none'})")
    print(f"   {'wells':<40} {'cleanup':>10} {'well':>11} {'share':>7}")
    print(f"   {'slope wells (stash + cycle)':<40} {ms(small_cleanup):>10} {ms(small_well):>11} {small_share:>7.2%}")
    print(f"   {nuclei_label:<40} {ms(big_cleanup):>10} {ms(big_well):>11} {big_share:>7.2%}"
          f"   {nuclei_run['ok']}, {len(nuclei_run['well_s'])} wells after the first")
    print(f"   release_gpu_pools() alone on the idle worker, nothing loaded: {ms(with_cleanup['idle_gpu_release'])} "
          "(median of 200); the rest of a cleanup is freeing the scope's arrays and gc.collect(1)")
    plugin = with_cleanup["plugin"]
    if plugin.get("cleanups_run"):
        print(f"   worker plugin safety net in the slope run: {plugin['cleanups_run']} cleanups for "
              f"{plugin['tasks_seen']} tasks, mean {ms(plugin['cleanup_seconds'] / plugin['cleanups_run'])}, "
              f"{plugin['backend_bytes_freed']} bytes left for it to free")

    # -- 3. sequential combinations --------------------------------------------------------
    per_timepoint = peak_channels * peak_z * peak_size * peak_size
    print()
    print(f"3. peak worker RSS of one well with 4 timepoints ({peak_channels} channels x {peak_z} z x "
          f"{peak_size} px; float64 intermediates, {per_timepoint * 8 / MB:.0f} MB per timepoint)")
    print(f"   {'variant':<34} {'RSS before':>11} {'peak':>10} {'rise':>10} {'cleanups':>9} {'well':>8}")
    for label, run in (("sequential=('timepoint',)", peak_sequential), ("all timepoints at once", peak_whole)):
        print(f"   {label:<34} {run['rss_before'] / MB:>8.0f} MB {run['peak'] / MB:>7.0f} MB "
              f"{run['rise'] / MB:>7.0f} MB {run['cleanups']:>9} {run['seconds']:>6.2f} s   {run['ok']}")
        if run["error"]:
            print(f"     the well failed: {run['error']}")
    print("   (rise: peak RSS of the worker during the well minus its RSS just before; fresh worker each)")
    ratio = peak_whole["rise"] / peak_sequential["rise"] if peak_sequential["rise"] > 0 else float("nan")
    if peak_sequential["error"] or peak_whole["error"]:
        print("   (the rises are not comparable: a well failed)")
    else:
        print(f"   the rise without sequential combinations is {ratio:.1f}x the rise with them")

    # -- verdicts --------------------------------------------------------------------------
    nothing_loaded = not (with_cleanup["loaded"] or nuclei_run["loaded"])
    target_well = "" if not quick else " (quick run: not the target's 256-px, 4-site well)"
    print()
    few = " (quick run: too few wells past the warm-up for this figure)" if quick else ""
    print(verdict(slope_on <= SLOPE_TARGET_MB,
                  f"RSS slope with cleanup {slope_on:+.4f} MB/well <= {SLOPE_TARGET_MB} MB/well{few}"))
    grows = args.stash_mb / 2
    print(verdict(slope_off >= grows,
                  f"RSS slope without cleanup {slope_off:+.4f} MB/well grows visibly "
                  f"(>= half the {args.stash_mb:g} MB stashed per well)"))
    loaded_note = "" if nothing_loaded else " (a GPU framework IS loaded: target does not apply)"
    print(verdict(small_cleanup <= CLEANUP_TARGET_S,
                  f"median cleanup {ms(small_cleanup)} <= 1 ms per well, no GPU framework loaded, "
                  f"slope wells{loaded_note}"))
    print(verdict(big_cleanup <= CLEANUP_TARGET_S,
                  f"median cleanup {ms(big_cleanup)} <= 1 ms per well, no GPU framework loaded, "
                  f"nuclei_count wells{loaded_note}"))
    print(verdict(big_share <= SHARE_TARGET,
                  f"median cleanup share {big_share:.3%} <= 1% of the well's time{target_well}"))
    both_ok = not (peak_sequential["error"] or peak_whole["error"])
    print(verdict(both_ok and ratio > 2 and peak_sequential["cleanups"] == 4,
                  f"sequential combinations: both wells ok, 4 cleanups in the well, peak rise {ratio:.1f}x "
                  "lower than all timepoints at once (> 2x)"))

    if args.csv is not None:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["well_number", "rss_with_cleanup_bytes", "rss_without_cleanup_bytes",
                             "backend_without_cleanup_bytes", "cleanup_seconds", "well_seconds"])
            for i in range(n_wells):
                writer.writerow([i + 1, with_cleanup["rss"][i], without_cleanup["rss"][i],
                                 without_cleanup["backend"][i], with_cleanup["cleanup_s"][i],
                                 with_cleanup["well_s"][i]])
        print(f"per-well figures written to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
