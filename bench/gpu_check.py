"""GPU check: the CuPy pipeline on a LocalCUDACluster against NumPy on every CPU core, and
what the per-well cleanup does to the GPU pools.

    python bench/gpu_check.py            # 96 wells x 4 sites x 4 channels x 5 z x 1024 px
    python bench/gpu_check.py --quick    # 12 wells of 512 px, 8 wells per variant
    bash bench/gpu_check.sh              # on the project's GPU machine (see docs/GPU.md)
    python bench/gpu_check.py --plumbing-check   # every section on the CPU with NumPy steps:
                                                 # checks this script, its figures mean nothing

It prints, in one run that fits in 8 minutes on one H200 with 16 cores:

1. the outcome of the gpu-marked tests (``pytest -m gpu`` on ``tests/test_gpu_*.py``, in a
   subprocess, while the plate is being written);
2. wall time of the plate with ``load_pipeline("nuclei_count", device="gpu")`` on a
   ``LocalCUDACluster`` (one worker per GPU) and with the NumPy pipeline on a
   ``LocalCluster`` with one worker per core, and the speed-up; both clusters first run
   warm-up wells that are not timed (imports, CUDA context, kernel compilation);
3. the pools after each well (``ExecutionResult.memory["process"]["gpu"]``, execution order) and the
   device memory in use after each well (``cudaMemGetInfo`` on the worker): the slope and
   the largest deviation from the baseline left by the warm-up well;
4. the cleanup's time per well (``memory["cleanup_seconds"]``: median and max);
5. the same wells with all cleanup turned off on the worker
   (``gpu._set_cleanup_enabled(False)``, the measurement switch): the memory the cleanup
   gives back after every well;
6. with dask-cuda and RMM: an RMM pool as CuPy's allocator, re-initialised after each well
   (``rmm_pool_size``, ``rmm_for_cupy``, ``rmm_reinitialize_pool``), and the asynchronous
   allocator (``rmm_async``), each on the variant wells.

PASS/FAIL lines follow; the script exits 0 whatever the figures (a benchmark, not a test).
Without a CUDA device (or without CuPy) it prints ``no GPU: skipped`` and exits 0.

The plate is written fast: ``--distinct-wells`` wells (default 4) are synthesised in
parallel processes, and the plate's wells are hard links to their files, so every well is
a full 80-image well while only a few wells' files are read from disk and page cache.
"""

from __future__ import annotations

import argparse
import csv
import logging
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import signal
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from hcs_dask import load_pipeline, open_plate, run_plate, write_synthetic_plate
from hcs_dask.cluster import _installed, available_cores, connect, cuda_device_count
from hcs_dask.memory import gpu
from hcs_dask.plate import row_name

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20

# Bars (issue 5).
POOL_SLACK_MB = 4.0  # pool bytes after a well, above the baseline
DEVICE_SLACK_MB = 8.0  # device memory in use after a well (page granularity, driver noise)
SLOPE_BAR_MB = 0.05  # per well
CLEANUP_BAR_S = 10e-3  # the seed system claims 10-100 ms per well
COUNT_BAR = 0.02  # GPU vs NumPy nuclei counts, whole plate

RECORDER = "hcs-gpu-check-memory"


# --- worker side (shipped by value: this file is __main__ there) ------------------------


def device_memory_in_use() -> int | None:
    """Bytes in use on this worker's device (context, pools, arrays); None if CuPy never ran here."""
    cupy: Any = sys.modules.get("cupy")
    if cupy is None or not gpu._cupy_has_device(cupy):
        return None
    free, total = cupy.cuda.runtime.memGetInfo()
    return int(total - free)


class MemoryRecorder(WorkerPlugin):
    """After every well task: pool bytes per framework and device memory in use.

    ``transition`` runs on the worker's event loop when the task has left the thread; on a
    single-threaded worker the next well has not started yet (it is sent only after this
    one is reported done, ``worker-saturation`` 1.0). Used where ``memory["process"]["gpu"]`` says
    nothing: with cleanup off, no cleaner runs and none reports.
    """

    name = RECORDER
    idempotent = True

    def setup(self, worker: Any) -> None:
        self.records: list[tuple[float, str, dict[str, int], int | None]] = []
        self.fake: dict[str, int] | None = None  # --plumbing-check: a pretend pool (see _fake_pool)

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if not (isinstance(key, tuple) and key and key[0] == "hcs-well"):
            return
        if finish == "executing" and self.fake is not None:
            self.fake["held"] += 64 * MB  # what a well leaves in its pool until the cleanup
        if start == "executing":
            device = device_memory_in_use() if self.fake is None else 500 * MB + self.fake["held"]
            self.records.append((time.time(), str(key[2]), gpu.pool_bytes(), device))


def _fake_pool(framework: str, unknown: bool, dask_worker: Any) -> None:
    """--plumbing-check only: a framework whose pool fills by 64 MB per well and empties on release,
    registered as a cleaner, so that every figure of the report is computed from something. With
    ``unknown`` its measure says None, as RMM's asynchronous allocator does."""
    import types

    module = types.ModuleType(f"hcs_plumbing_{framework}")
    sys.modules[module.__name__] = module
    state = {"held": 0}
    gpu.register_cleaner(framework, module=module.__name__, release=lambda: state.update(held=0),
                         measure=lambda: None if unknown else state["held"])
    dask_worker.plugins[RECORDER].fake = state


def _records(dask_worker: Any) -> list[Any]:
    return list(dask_worker.plugins[RECORDER].records)


def _clear_records(dask_worker: Any) -> None:
    dask_worker.plugins[RECORDER].records.clear()


# --- plates ----------------------------------------------------------------------------


def _write_template(root: str, seed: int, sites: int, channels: int, z: int, size: int) -> str:
    return str(write_synthetic_plate(root, wells=1, sites=sites, channels=channels, z=z, size=size, seed=seed,
                                     prefix="T"))


def write_templates(work: Path, count: int, *, sites: int, channels: int, z: int, size: int) -> list[Path]:
    """``count`` one-well plates with different seeds, each in its own process."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=count, mp_context=context) as pool:
        futures = [pool.submit(_write_template, str(work / f"template{i}"), 100 + i, sites, channels, z, size)
                   for i in range(count)]
        return [Path(f.result()) for f in futures]


def linked_plate(templates: list[Path], folder: Path, wells: int) -> Path:
    """A ``wells``-well plate (no .HTD) whose images are hard links to the templates' files."""
    columns = 12 if wells <= 96 else 24 if wells <= 384 else 48
    for index in range(wells):
        well = f"{row_name(index // columns)}{index % columns + 1:02d}"
        template = templates[index % len(templates)]
        for source in template.rglob("T_A01_*.tif"):
            target = folder / source.relative_to(template).parent / source.name.replace("T_A01_", f"Check_{well}_", 1)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # another file system: copy
                shutil.copyfile(source, target)
    return folder


# --- the gpu-marked tests ------------------------------------------------------------------


def start_gpu_tests(log: Path) -> subprocess.Popen:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_gpu_*.py"))
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files],
                            cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)


def finish_gpu_tests(process: subprocess.Popen, log: Path, deadline: float) -> dict[str, Any]:
    try:
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
        timed_out = False
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        timed_out = True
    lines = log.read_text(errors="replace").splitlines()
    summary = next((line.strip("= ") for line in reversed(lines)
                    if re.search(r"\d+ (passed|failed|skipped|error|deselected)", line)), "no summary line")
    problems = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary)}
    ok = (not timed_out and process.returncode == 0 and counts.get("passed", 0) > 0)
    return {"summary": summary, "problems": problems, "ok": ok, "timed_out": timed_out,
            "returncode": process.returncode, "tail": lines[-30:]}


# --- one run ---------------------------------------------------------------------------------


@contextmanager
def cluster_for(kind: str, args: argparse.Namespace) -> Iterator[tuple[Any, float]]:
    """(client, seconds to start) for "cpu", "gpu", "rmm-pool" or "rmm-async"."""
    start = time.perf_counter()
    if kind == "cpu":
        options: dict[str, Any] = {"n_workers": args.cpu_workers}
    elif args.plumbing_check:
        options = {"n_workers": 1, "resources": {"GPU": 1}}
    elif not _installed("dask_cuda"):
        # The gpu-marked tests' fallback too: one worker that offers the GPU resource.
        options = {"n_workers": 1, "resources": {"GPU": 1}}
    elif kind == "rmm-pool":
        options = {"cluster": "cuda", "rmm_pool_size": args.rmm_pool_size, "rmm_for_cupy": True,
                   "rmm_reinitialize_pool": True}
    elif kind == "rmm-async":
        options = {"cluster": "cuda", "rmm_async": True, "rmm_for_cupy": True}
    else:
        options = {"cluster": "cuda"}
    with connect(**options) as client:
        yield client, time.perf_counter() - start


def run_variant(kind: str, plate_root: Path, warmup_root: Path, work: Path, args: argparse.Namespace, *,
                cleanup: bool = True) -> dict[str, Any]:
    device = "cpu" if kind == "cpu" or args.plumbing_check else "gpu"
    pipeline = load_pipeline("nuclei_count", device=device)
    tag = f"{kind}-{'clean' if cleanup else 'noclean'}"
    with cluster_for(kind, args) as (client, startup):
        client.register_plugin(MemoryRecorder(), name=RECORDER)
        if args.plumbing_check and kind != "cpu":
            client.run(_fake_pool, "rmm" if kind.startswith("rmm") else "cupy", kind == "rmm-async")
        warm = run_plate(open_plate(warmup_root), pipeline, work / f"{tag}-warmup.ome.zarr", client=client,
                         progress=False)
        warm_records = sorted(r for records in client.run(_records).values() for r in records)
        client.run(_clear_records)
        if not cleanup:
            client.run(gpu._set_cleanup_enabled, False)
        try:
            start = time.perf_counter()
            result = run_plate(open_plate(plate_root), pipeline, work / f"{tag}.ome.zarr", client=client,
                               progress=False)
            seconds = time.perf_counter() - start
        finally:
            if not cleanup:
                client.run(gpu._set_cleanup_enabled, True)
        records = sorted(r for records in client.run(_records).values() for r in records)
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
    for path in work.glob(f"{tag}*"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
    wells = sorted(result.wells, key=lambda r: r.started or 0.0)
    return {
        "kind": kind, "cleanup": cleanup, "workers": workers, "startup": startup, "seconds": seconds,
        "counts": result.counts(), "warm_counts": warm.counts(),
        "failures": [f"{w.well}: {w.status} in {w.step!r}: {w.error_type}: {w.error}" for w in result.failures()][:5],
        "wells": wells, "records": records, "warm_records": warm_records,
        "measurements": result.measurements,
    }


# --- figures ----------------------------------------------------------------------------------


def slope_per_well(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    return float(np.polyfit(np.arange(len(values), dtype=float), np.asarray(values, dtype=float), 1)[0])


def _mb(value: int | None) -> float:
    """Bytes as MB; NaN where the framework could not say (a figure of None)."""
    return float("nan") if value is None else value / MB


def pools_after(run: dict[str, Any]) -> dict[str, list[float]]:
    """Per framework, MB its pool held after each well's cleanup (from the wells' own records)."""
    frameworks = sorted({name for w in run["wells"] for name in (w.memory or {}).get("gpu", {})})
    return {name: [_mb((w.memory or {}).get("gpu", {}).get(name, {}).get("after", 0)) for w in run["wells"]]
            for name in frameworks}


def pools_before(run: dict[str, Any]) -> dict[str, list[float]]:
    frameworks = sorted({name for w in run["wells"] for name in (w.memory or {}).get("gpu", {})})
    return {name: [_mb((w.memory or {}).get("gpu", {}).get(name, {}).get("before", 0)) for w in run["wells"]]
            for name in frameworks}


def known(values: list[float]) -> list[float]:
    return [v for v in values if v == v]  # NaN is the one value unequal to itself


def recorded(run: dict[str, Any], which: str) -> tuple[list[float], float | None]:
    """MB after each well from the recorder ("pool": all frameworks' pools; "device": in use), and the
    warm-up well's value (the baseline)."""
    def value(record: Any) -> float | None:
        _, _, pools, device = record
        if which == "pool":  # the frameworks that can tell (RMM's async allocator cannot)
            return sum(v for v in pools.values() if v is not None) / MB
        return None if device is None else device / MB

    after = [v for v in (value(r) for r in run["records"]) if v is not None]
    warm = [v for v in (value(r) for r in run["warm_records"]) if v is not None]
    return after, (warm[-1] if warm else None)


def deviation(values: list[float], baseline: float | None) -> float:
    if not values or baseline is None:
        return float("nan")
    return max(abs(v - baseline) for v in values)


def count_agreement(gpu_run: dict[str, Any], cpu_run: dict[str, Any]) -> tuple[int, int, float, int]:
    """(GPU total, CPU total, relative difference, sites whose counts differ)."""
    def by_site(run: dict[str, Any]) -> dict[tuple[str, int], float]:
        table = run["measurements"]
        if "nuclei_count" not in table.columns:
            return {}
        rows = table.dropna(subset=["nuclei_count"])
        return {(row.well, int(row.site)): float(row.nuclei_count) for row in rows.itertuples()}

    gpu_counts, cpu_counts = by_site(gpu_run), by_site(cpu_run)
    shared = gpu_counts.keys() & cpu_counts.keys()
    gpu_total = int(sum(gpu_counts[k] for k in shared))
    cpu_total = int(sum(cpu_counts[k] for k in shared))
    differ = sum(gpu_counts[k] != cpu_counts[k] for k in shared)
    relative = abs(gpu_total - cpu_total) / cpu_total if cpu_total else float("nan")
    return gpu_total, cpu_total, relative, differ


def verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}  {text}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def versions() -> str:
    names = ("hcs-dask", "dask", "distributed", "numpy", "cupy-cuda13x", "cupy-cuda12x", "cupy", "dask-cuda",
             "rmm-cu13", "rmm-cu12", "cuda-core", "cuda-bindings", "nvidia-ml-py", "torch")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def device_name() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
            return name.decode() if isinstance(name, bytes) else str(name)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML: the name is a nicety
        return "CUDA device"


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wells", type=int, default=None, help="wells of the timed plate (default 96; 12 with --quick)")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 1024; 512 with --quick)")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--z", type=int, default=5)
    parser.add_argument("--distinct-wells", type=int, default=None,
                        help="wells actually synthesised; the others link to their files (default 4; 2 with --quick)")
    parser.add_argument("--variant-wells", type=int, default=None,
                        help="wells of the no-cleanup and RMM variants (default 16; 8 with --quick)")
    parser.add_argument("--cpu-workers", type=int, default=available_cores(),
                        help="workers of the NumPy run (default: one per core, %(default)s here)")
    parser.add_argument("--rmm-pool-size", default="256MiB", help="initial RMM pool of the RMM variant")
    parser.add_argument("--quick", action="store_true", help="a smaller plate: a few minutes less")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds for the whole check; optional variants are skipped past it (default 480)")
    parser.add_argument("--plumbing-check", action="store_true",
                        help="no GPU needed: the GPU sections run NumPy steps on a CPU worker offering "
                             "resources={'GPU': 1}, to check this script; its figures mean nothing")
    parser.add_argument("--csv", type=Path, default=None, help="also write per-well figures of the timed runs")
    parser.add_argument("--workdir", type=Path, default=None, help="where plates go (default: a temp folder)")
    args = parser.parse_args(argv)

    began = time.monotonic()
    deadline = began + args.budget
    quick = args.quick
    wells = args.wells or (12 if quick else 96)
    size = args.size or (512 if quick else 1024)
    distinct = min(wells, args.distinct_wells or (2 if quick else 4))
    variant_wells = min(wells, args.variant_wells or (8 if quick else 16))
    plumbing = ", PLUMBING CHECK: figures mean nothing" if args.plumbing_check else ""
    print(f"GPU check ({'quick' if quick else 'full'}{plumbing})")
    print(f"  {versions()}")
    devices, source = cuda_device_count()
    if not args.plumbing_check:
        if devices == 0:
            print(f"no GPU: skipped ({source})")
            return 0
        if not _installed("cupy"):
            print(f"no GPU: skipped (CuPy is not installed; {devices} device(s) found by {source})")
            return 0
        print(f"  {devices} CUDA device(s) ({source}): {device_name()}; "
              f"{'dask-cuda' if _installed('dask_cuda') else 'no dask-cuda: a LocalCluster worker with GPU=1'}, "
              f"{'RMM' if _installed('rmm') else 'no RMM'}")
    logging.getLogger("distributed").setLevel(logging.ERROR)
    # `timeout` (bench/gpu_check.sh) sends SIGTERM: report what finished rather than nothing.
    signal.signal(signal.SIGTERM, _out_of_time)

    with tempfile.TemporaryDirectory(prefix="hcs-gpu-check-", dir=args.workdir) as tmp:
        work = Path(tmp)
        tests = None
        if not (args.skip_tests or args.plumbing_check):
            tests_log = work / "pytest-gpu.log"
            tests_process = start_gpu_tests(tests_log)
        t = time.perf_counter()
        templates = write_templates(work, distinct, sites=args.sites, channels=args.channels, z=args.z, size=size)
        plate_root = linked_plate(templates, work / "plate", wells)
        variant_root = linked_plate(templates, work / "variant_plate", variant_wells)
        warmup_gpu = linked_plate(templates, work / "warmup_gpu", 1)
        warmup_cpu = linked_plate(templates, work / "warmup_cpu", min(args.cpu_workers, 96))
        images = wells * args.sites * args.channels * args.z
        print(f"  plate: {wells} wells x {args.sites} sites x {args.channels} channels x {args.z} z x {size} px "
              f"= {images} images ({images * size * size * 2 / 1e9:.1f} GB of uint16), {distinct} distinct wells "
              f"synthesised in {time.perf_counter() - t:.0f} s")
        if not (args.skip_tests or args.plumbing_check):
            tests = finish_gpu_tests(tests_process, tests_log, min(deadline, time.monotonic() + 300))
            print(f"  gpu-marked tests: {tests['summary']}")

        runs: dict[str, dict[str, Any]] = {}
        skipped: list[str] = []
        problems: list[str] = []
        variants = [("gpu-noclean", "gpu", False)]
        if args.plumbing_check or (_installed("dask_cuda") and _installed("rmm")):
            variants += [("rmm-pool", "rmm-pool", True), ("rmm-async", "rmm-async", True)]
        plan = [("gpu", "gpu", plate_root, warmup_gpu, True, False),
                ("cpu", "cpu", plate_root, warmup_cpu, True, False)]
        plan += [(name, kind, variant_root, warmup_gpu, cleanup, True) for name, kind, cleanup in variants]
        try:
            for name, kind, root, warmup, cleanup, optional in plan:
                if optional:
                    gpu_wells = runs["gpu"]["wells"] if "gpu" in runs else []
                    per_well = statistics.median(w.seconds for w in gpu_wells) if gpu_wells else 5.0
                    if time.monotonic() + 30 + variant_wells * per_well * 1.5 > deadline:
                        skipped.append(name)
                        continue
                try:
                    runs[name] = run_variant(kind, root, warmup, work, args, cleanup=cleanup)
                except OutOfTime:
                    raise
                except Exception as error:  # report the others all the same
                    problems.append(f"{name} run: {type(error).__name__}: {error}")
                    traceback.print_exc(limit=4)
                print(f"  {name} run {'done' if name in runs else 'FAILED'} at {time.monotonic() - began:.0f} s")
        except OutOfTime:
            problems.append("stopped by SIGTERM (the time limit of bench/gpu_check.sh): the report covers "
                            "the runs that finished")
            out_of_time = True
        else:
            out_of_time = False

    report(runs, tests, args, skipped, problems, wells=wells, variant_wells=variant_wells, size=size)
    print(f"total {time.monotonic() - began:.0f} s")
    if out_of_time:
        sys.stdout.flush()
        os._exit(0)  # cluster threads interrupted midway may never finish
    return 0


class OutOfTime(Exception):
    """SIGTERM arrived: the device call is about to end."""


def _out_of_time(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise OutOfTime


def report(runs: dict[str, dict[str, Any]], tests: dict[str, Any] | None, args: argparse.Namespace,
           skipped: list[str], problems: list[str], *, wells: int, variant_wells: int, size: int) -> None:
    for problem in problems:
        print(f"PROBLEM  {problem}")
    if tests is not None:
        print(verdict(tests["ok"], f"gpu-marked tests: {tests['summary']}"
                                   f"{' (timed out)' if tests['timed_out'] else ''}"))
        for line in tests["problems"][:10]:
            print(f"      {line}")
        if not tests["ok"] and not tests["problems"]:
            for line in tests["tail"][-10:]:
                print(f"      {line}")
    gpu_run = runs.get("gpu")
    if gpu_run is None or not gpu_run["wells"]:
        print("FAIL  the GPU run did not finish: no figures")
        return
    cpu_run = runs.get("cpu") or {"seconds": float("nan"), "workers": 0, "wells": [], "counts": {},
                                  "failures": ["the CPU run did not finish"], "startup": float("nan"),
                                  "measurements": gpu_run["measurements"].iloc[0:0], "cleanup": True}
    speedup = cpu_run["seconds"] / gpu_run["seconds"] if gpu_run["seconds"] else float("nan")

    print()
    print("1. wall time of the plate (warm clusters: warm-up wells not timed)")
    print(f"   {'run':<34} {'workers':>7} {'start':>7} {'plate':>9} {'per well':>10}   wells")
    for label, run in ((f"GPU, CuPy pipeline ({'NumPy: plumbing' if args.plumbing_check else 'LocalCUDACluster'})",
                        gpu_run), ("CPU, NumPy pipeline, LocalCluster", cpu_run)):
        median_well = statistics.median(w.seconds for w in run["wells"]) if run["wells"] else float("nan")
        print(f"   {label:<34} {run['workers']:>7} {run['startup']:>5.1f} s {run['seconds']:>7.1f} s "
              f"{median_well:>8.2f} s   {run['counts']}")
        for failure in run["failures"]:
            print(f"     {failure}")
    print(f"   speed-up of the GPU run over {cpu_run['workers']} CPU workers: {speedup:.2f}x "
          "(per well: median seconds of one well on its worker)")

    gpu_total, cpu_total, relative, differ = count_agreement(gpu_run, cpu_run)
    print(f"   nuclei counted: GPU {gpu_total}, CPU {cpu_total} ({relative:.2%} apart; {differ} sites differ)")

    print()
    print("2. memory after each well of the GPU run (execution order)")
    after = pools_after(gpu_run)
    before = pools_before(gpu_run)
    device_after, device_base = recorded(gpu_run, "device")
    pool_after, pool_base = recorded(gpu_run, "pool")
    baseline = pool_base if pool_base is not None else 0.0
    print(f"   baseline after the warm-up well: pools {baseline:.1f} MB, device in use "
          f"{'n/a' if device_base is None else f'{device_base:.1f} MB'}")
    names = sorted(n for n in after if known(after[n]))
    unknown = sorted(n for n in after if not known(after[n]))
    if unknown:
        print(f"   no figure from {', '.join(unknown)} (the framework cannot say what it holds)")
    header = "".join(f" {name + ' before':>14} {name + ' after':>12}" for name in names)
    print(f"   {'well #':>7} {'well':>5}{header} {'device in use':>14}")
    every = max(1, wells // 12)
    rows = sorted(set(range(0, len(gpu_run["wells"]), every)) | {len(gpu_run["wells"]) - 1})
    for i in rows:
        well = gpu_run["wells"][i]
        cells = "".join(f" {before[n][i]:>11.1f} MB {after[n][i]:>9.1f} MB" for n in names)
        device = f"{device_after[i]:>11.1f} MB" if i < len(device_after) else f"{'n/a':>14}"
        print(f"   {i + 1:>7} {well.well:>5}{cells} {device}")
    pool_values = [sum(after[n][i] for n in names) for i in range(len(gpu_run["wells"]))] if names else []
    pool_slope = slope_per_well(pool_values)
    pool_dev = deviation(pool_values, baseline)
    device_slope = slope_per_well(device_after)
    device_dev = deviation(device_after, device_base)
    print(f"   pools after cleanup: slope {pool_slope:+.4f} MB/well, largest deviation from baseline {pool_dev:.2f} MB")
    print(f"   device in use:       slope {device_slope:+.4f} MB/well, largest deviation from baseline "
          f"{device_dev:.2f} MB")

    print()
    print("3. cleanup time per well (memory['cleanup_seconds'])")
    print(f"   {'run':<40} {'median':>10} {'max':>10} {'share of well':>14}")
    cleanup_rows = {}
    for name, label in (("gpu", "GPU, CuPy pool"), ("rmm-pool", "GPU, RMM pool re-initialised"),
                        ("rmm-async", "GPU, RMM async allocator"), ("cpu", "CPU, NumPy")):
        if name not in runs:
            continue
        cleanups = [w.memory.get("cleanup_seconds", 0.0) for w in runs[name]["wells"] if w.memory]
        shares = [w.memory.get("cleanup_seconds", 0.0) / w.seconds for w in runs[name]["wells"] if w.memory and w.seconds]
        if cleanups:
            cleanup_rows[name] = (statistics.median(cleanups), max(cleanups))
            print(f"   {label:<40} {ms(cleanup_rows[name][0]):>10} {ms(cleanup_rows[name][1]):>10} "
                  f"{statistics.median(shares):>14.2%}")

    noclean = runs.get("gpu-noclean")
    if noclean is not None:
        print()
        print(f"4. the first {variant_wells} wells with cleanup (timed run) and without (measurement switch off)")
        clean_pool = pool_after[:variant_wells]
        clean_device = device_after[:variant_wells]
        off_pool, _ = recorded(noclean, "pool")
        off_device, _ = recorded(noclean, "device")
        print(f"   {'well #':>7} {'pools, cleanup':>15} {'pools, none':>12} {'device, cleanup':>16} {'device, none':>13}")
        for i in range(min(len(off_pool), variant_wells)):
            cells = [clean_pool[i] if i < len(clean_pool) else float("nan"), off_pool[i],
                     clean_device[i] if i < len(clean_device) else float("nan"),
                     off_device[i] if i < len(off_device) else float("nan")]
            print(f"   {i + 1:>7} {cells[0]:>12.1f} MB {cells[1]:>9.1f} MB {cells[2]:>13.1f} MB {cells[3]:>10.1f} MB")
        print(f"   without cleanup: slope {slope_per_well(off_pool):+.3f} MB/well (pools), "
              f"{slope_per_well(off_device):+.3f} MB/well (device); {noclean['counts']}")

    for name, title in (("rmm-pool", f"5. RMM pool of {args.rmm_pool_size} as CuPy's allocator, re-initialised "
                                     "after each well"),
                        ("rmm-async", "6. RMM asynchronous allocator as CuPy's allocator (release at sync)")):
        run = runs.get(name)
        if run is None:
            continue
        print()
        print(title)
        run_after, run_before = pools_after(run), pools_before(run)
        run_device, run_device_base = recorded(run, "device")
        for framework in sorted(run_after):
            before_mb, after_mb = known(run_before[framework]), known(run_after[framework])
            if not before_mb or not after_mb:
                print(f"   {framework}: pool bytes unknown ({framework} gives no figure for this allocator)")
                continue
            print(f"   {framework}: before cleanup median {statistics.median(before_mb):.1f} MB, "
                  f"max {max(before_mb):.1f} MB; after cleanup max {max(after_mb):.1f} MB")
        print(f"   device in use after each well: max deviation from the warm-up's "
              f"{deviation(run_device, run_device_base):.2f} MB; {run['counts']}")
        for failure in run["failures"]:
            print(f"     {failure}")
    if skipped:
        print()
        print(f"skipped to stay within --budget {args.budget:.0f} s: {', '.join(skipped)}")

    # -- verdicts ------------------------------------------------------------------------------
    print()
    plumbing = " (PLUMBING CHECK: NumPy steps, no GPU)" if args.plumbing_check else ""
    if tests is not None:
        print(verdict(tests["ok"], f"gpu-marked tests: {tests['summary']}"))
    all_ok = bool(gpu_run["counts"].get("ok")) and set(gpu_run["counts"]) == {"ok"} and set(cpu_run["counts"]) == {"ok"}
    print(verdict(all_ok, f"every well ok: GPU {gpu_run['counts']}, CPU {cpu_run['counts']}"))
    print(verdict(relative <= COUNT_BAR, f"GPU and CPU nuclei counts {relative:.2%} apart <= {COUNT_BAR:.0%}{plumbing}"))
    print(verdict(pool_dev <= POOL_SLACK_MB,
                  f"pools back to baseline after every well: largest deviation {pool_dev:.2f} MB <= "
                  f"{POOL_SLACK_MB:g} MB over {len(pool_values)} wells{plumbing}"))
    print(verdict(abs(pool_slope) <= SLOPE_BAR_MB,
                  f"pool slope {pool_slope:+.4f} MB/well, |slope| <= {SLOPE_BAR_MB} MB/well{plumbing}"))
    print(verdict(device_dev <= DEVICE_SLACK_MB,
                  f"device memory in use back to baseline after every well: largest deviation {device_dev:.2f} MB "
                  f"<= {DEVICE_SLACK_MB:g} MB{plumbing}"))
    if "gpu" in cleanup_rows:
        median_cleanup, max_cleanup = cleanup_rows["gpu"]
        print(verdict(median_cleanup < CLEANUP_BAR_S,
                      f"median cleanup per GPU well {ms(median_cleanup)} < 10 ms (max {ms(max_cleanup)}; the seed "
                      f"system claims 10-100 ms){plumbing}"))
    if noclean is not None:
        off_pool, _ = recorded(noclean, "pool")
        held = statistics.median(off_pool) if off_pool else float("nan")
        clean_held = statistics.median(pool_after[:variant_wells]) if pool_after else float("nan")
        print(verdict(held > max(4 * clean_held, clean_held + 16),
                      f"without cleanup the pools hold {held:.1f} MB after each well (median), with it "
                      f"{clean_held:.1f} MB: the memory the cleanup gives back{plumbing}"))
    if "rmm-pool" in runs:
        run = runs["rmm-pool"]
        rmm_after = known(pools_after(run).get("rmm", []))
        initial = _size_mb(args.rmm_pool_size)
        worst = max(rmm_after) if rmm_after else float("nan")
        grew = max(known(pools_before(run).get("rmm", [])) or [float("nan")])
        print(verdict(bool(rmm_after) and worst <= initial + POOL_SLACK_MB and set(run["counts"]) == {"ok"},
                      f"RMM pool re-initialised to its {initial:.0f} MB after every well: largest {worst:.1f} MB "
                      f"(it grew to {grew:.1f} MB during a well){plumbing}"))
    if "rmm-async" in runs:
        run = runs["rmm-async"]
        run_device, run_device_base = recorded(run, "device")
        dev = deviation(run_device, run_device_base)
        print(verdict(dev <= DEVICE_SLACK_MB and set(run["counts"]) == {"ok"},
                      f"RMM async allocator: device in use back to baseline after every well: largest deviation "
                      f"{dev:.2f} MB <= {DEVICE_SLACK_MB:g} MB{plumbing}"))
    print(f"INFO  speed-up {speedup:.2f}x: GPU {gpu_run['seconds']:.1f} s on {gpu_run['workers']} GPU worker(s) vs "
          f"CPU {cpu_run['seconds']:.1f} s on {cpu_run['workers']} workers, {wells} wells of {size} px")

    if args.csv is not None:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["run", "order", "well", "status", "seconds", "cleanup_seconds", "gpu_memory"])
            for name, run in runs.items():
                for i, w in enumerate(run["wells"]):
                    writer.writerow([name, i + 1, w.well, w.status, w.seconds,
                                     (w.memory or {}).get("cleanup_seconds"), (w.memory or {}).get("gpu")])
        print(f"per-well figures written to {args.csv}")


def _size_mb(size: str) -> float:
    from dask.utils import parse_bytes

    return parse_bytes(size) / MB


if __name__ == "__main__":
    sys.exit(main())
