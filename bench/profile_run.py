"""Where a 1-worker run's time goes: py-spy on the worker and on the client, plus the wells' timeline.

Runs the anchor plate (``--wells`` × 4 sites × 2 channels × 3 z, 128 px, by default) with
``run_plate`` on an embedded 1-worker cluster started and warmed up first, while ``py-spy record``
samples the worker process and this process (client, driver thread and the embedded scheduler).
Prints, per process and thread, the share of samples of the functions that matter (inclusive), and
from Dask's task stream the median well task and the median gap between one well task's return
and the next one's start. ``--raw DIR`` keeps py-spy's collapsed stacks for a flame graph.

    python bench/profile_run.py                     # 96 wells
    python bench/profile_run.py --wells 48 --raw /tmp/prof --option fsync=False

Needs py-spy (``pip install py-spy``) and the right to trace processes (root, or ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import (PlateSpec, anchor_pipeline, embedded_cluster, subset, synthetic_plate, table, well_timeline,
                     workdir_from)
from distributed import get_task_stream

from hcs_dask import open_plate, run_plate

#: Functions whose inclusive share is printed, by the name py-spy gives the frame.
WATCHED = {
    "worker": ["run_well", "run_combination", "read_image", "_run_step", "percentile_normalize", "max_projection",
               "_write", "FieldWriter.write", "FieldWriter.create", "commit_well", "reset_well", "write_well",
               "_Cleanup.run", "collect", "_pipeline", "memory_info", "release_gpu_pools",
               "transition", "execute", "_handle_stimulus_from_task", "batched_send", "handle_stream"],
    "client": ["_Driver._loop", "_Driver._handle", "_Driver._fill", "Client.submit", "_Driver._result_of",
               "_Driver._finish", "_Driver._refresh_workers", "Client.scheduler_info", "Scheduler.update_graph",
               "Scheduler.handle_task_finished", "Scheduler.transitions", "Client._handle_report",
               "Scheduler.add_client", "SimpleQueue.get", "sync"],
}


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


def parse(path: Path, watched: list[str]) -> dict[str, Counter]:
    """py-spy raw output → per thread: inclusive samples of each watched function, and '<all>'.

    A watched name matches a frame's function by itself or as a method (``_Driver._fill``).
    """
    threads: dict[str, Counter] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        # "thread (1234): MainThread" with -t; the OS cuts thread names to 15 characters
        name = (frames[0].partition(": ")[2] or frames[0]) if frames[0].startswith("thread (") else "?"
        counter = threads.setdefault(name, Counter())
        counter["<all>"] += int(count)
        functions = {frame.split(" (")[0] for frame in frames[1:]}
        for function in watched:
            if any(f == function or f.endswith("." + function) for f in functions):
                counter[function] += int(count)
    return threads


def report(label: str, threads: dict[str, Counter], rate: int, watched: list[str]) -> None:
    rows = []
    for thread, counter in sorted(threads.items(), key=lambda item: -item[1]["<all>"]):
        total = counter["<all>"]
        if not any(counter[f] for f in watched) and total < rate:  # idle helper threads
            continue
        rows.append([thread, "<all>", total / rate, 100.0])
        for function in watched:
            if counter[function]:
                rows.append(["", function, counter[function] / rate, 100.0 * counter[function] / total])
    table(["thread", "function (inclusive)", "s sampled", "% of thread"], rows, title=f"py-spy: {label}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wells", type=int, default=96)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--raw", help="keep py-spy's raw stacks in this folder")
    parser.add_argument("--option", action="append", default=[], help="a run_plate option, e.g. fsync=False")
    parser.add_argument("--workdir", help="keep the synthetic plate here")
    args = parser.parse_args(argv)
    spy = py_spy()
    if spy is None:
        print("py-spy is not installed (pip install py-spy): nothing profiled")
        return 0
    options = {}
    for option in args.option:
        name, _, value = option.partition("=")
        options[name] = {"True": True, "False": False}.get(value, value)
    raw = Path(args.raw) if args.raw else Path(tempfile.mkdtemp(prefix="hcs-profile-"))
    raw.mkdir(parents=True, exist_ok=True)
    with workdir_from(args.workdir) as work:
        root, _ = synthetic_plate(work, PlateSpec(args.wells, 4, 2, 3, args.size))
        plate = open_plate(root)
        pipeline = anchor_pipeline()
        output = work / "profile.ome.zarr"
        with embedded_cluster(1) as (client, _):
            run_plate(subset(plate, 1), pipeline, work / "warmup.ome.zarr", client=client, overwrite=True,
                      progress=False)
            [worker_pid] = client.run(os.getpid).values()
            spies = {name: subprocess.Popen([spy, "record", "-p", str(pid), "-f", "raw", "-r", str(args.rate), "-t", "--nonblocking",
                                             "--nolineno", "-o", str(raw / f"{name}.txt")],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for name, pid in (("worker", worker_pid), ("client", os.getpid()))}
            time.sleep(1.0)  # py-spy attaches
            start = time.perf_counter()
            with get_task_stream(client) as stream:
                result = run_plate(plate, pipeline, output, client=client, overwrite=True, progress=False,
                                   **options)
            wall = time.perf_counter() - start
            for process in spies.values():
                process.send_signal(signal.SIGINT)
            for process in spies.values():
                process.wait(timeout=60)
    assert result.ok, result.failures()[:1]
    task, gap = well_timeline(stream.data)
    table(["figure", "value"], [
        ["wells", len(result.wells)], ["run_plate s", wall], ["ms/well", wall / len(result.wells) * 1e3],
        ["median well task ms (task stream)", task * 1e3], ["median gap between tasks ms", gap * 1e3],
        ["median cleanup ms", statistics.median(w.memory.get("cleanup_seconds", 0) * 1e3 for w in result.wells)],
    ], title=f"1-worker run of {len(result.wells)} anchor wells ({options or 'default options'})")
    for name in ("worker", "client"):
        path = raw / f"{name}.txt"
        if path.exists():
            report(name, parse(path, WATCHED[name]), args.rate, WATCHED[name])
    print(f"raw stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
