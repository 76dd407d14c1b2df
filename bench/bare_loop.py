"""The bare work of a plate in one process: the baseline every throughput figure is divided by.

The anchor workload with no framework: ``tifffile.imread`` of every image, percentile
normalisation over each z-stack (numpy, the same arithmetic as ``hcs_dask.steps.percentile_normalize``),
max over z, and one plain zarr array per well (``zarr.create_array``, then one assignment)
holding the pixel bytes hcs_dask writes at full resolution: float32, shape
``(sites, channels, 1, y, x)``, one chunk per site, zarr's default codec. No Dask, no
guard, no manifest, no fsync, no pyramid levels, no NGFF metadata.

    python bench/bare_loop.py                      # 96 wells × 4 sites × 2 channels × 3 z, 128 px; 5 runs
    python bench/bare_loop.py --plate FOLDER       # an existing ImageXpress-style plate (e.g. OpenHCS's generator)
    python bench/bare_loop.py --plate FOLDER --output OUT.zarr --once   # one run, whole process; prints seconds
    python bench/bare_loop.py --plate FOLDER --output OUT-0.zarr --once --part 0/2   # wells 0, 2, 4, ... only

``--once`` imports only numpy, tifffile and zarr, so that a caller timing the whole process
(``bench/throughput.py``, ``bench/openhcs.py``) times the bare work and Python's start, nothing of
hcs_dask. ``--part K/N`` does the wells whose place in the plate's order is K modulo N, so that N
such processes started at once do the plate's bare work in parallel, with no framework: what N
workers could reach on the machine (``bench/throughput.py`` times them as ``bare_N``).
Prints the runs, best, median and spread, and the time per well spent reading, computing and
writing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tifffile
import zarr

__all__ = ["Phases", "anchor_site", "bare_loop", "normalise", "scan_plate"]

# ImageXpress names: <prefix>_<well>_s<site>_w<channel><GUID?>.tif, z in ZStep_<n>/ folders.
_NAME = re.compile(r"(?:^|_)(?P<well>[A-Z]{1,2}\d{1,3})_s(?P<site>\d+)_w(?P<channel>\d)[^_]*\.tiff?$", re.IGNORECASE)
_ZSTEP = re.compile(r"^ZStep_(\d+)$", re.IGNORECASE)

#: well -> site -> channel -> image paths in z order.
Index = dict[str, dict[int, dict[int, list[str]]]]


def scan_plate(folder: str | os.PathLike[str]) -> Index:
    """Index an ImageXpress-style folder: images flat or in ``[TimePoint_<n>/]ZStep_<n>/`` folders
    (z from the folder's number; thumbnails skipped)."""
    found: dict[str, dict[int, dict[int, list[tuple[int, str]]]]] = {}
    pending = [(1, str(folder))]
    while pending:
        z, path = pending.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir():
                    zstep = _ZSTEP.match(entry.name)
                    pending.append((int(zstep[1]) if zstep else z, entry.path))
                    continue
                match = _NAME.search(entry.name)
                if match is None or "_thumb" in entry.name.lower():
                    continue
                by_site = found.setdefault(match["well"].upper(), {})
                by_site.setdefault(int(match["site"]), {}).setdefault(int(match["channel"]), []).append(
                    (z, entry.path))
    index: Index = {}
    for well in sorted(found, key=lambda name: (len(name.rstrip("0123456789")), name)):
        index[well] = {site: {channel: [p for _, p in sorted(planes)] for channel, planes in sorted(channels.items())}
                       for site, channels in sorted(found[well].items())}
    if not index:
        raise SystemExit(f"{folder}: no ImageXpress-style images (<well>_s<site>_w<channel>.tif) found")
    return index


def normalise(image: np.ndarray, low: float = 1, high: float = 99.8) -> np.ndarray:
    """``percentile_normalize``'s arithmetic in plain numpy: percentiles to 0 and 1, clipped, float32."""
    image = image.astype(np.float32, copy=False)
    lo, hi = (float(v) for v in np.percentile(image, np.asarray([low, high], dtype=np.float64)))
    if not hi > lo:
        return np.zeros_like(image)
    return np.clip((image - np.float32(lo)) * np.float32(1.0 / (hi - lo)), 0, 1).astype(np.float32, copy=False)


def anchor_site(images: list[list[np.ndarray]]) -> tuple[list[np.ndarray], None]:
    """The anchor's bare work for one site: per channel, normalise the z-stack, then max over z."""
    return [np.max(normalise(np.stack(planes)), axis=0) for planes in images], None


class Phases:
    """Seconds spent reading, computing and writing, summed over a run."""

    def __init__(self) -> None:
        self.read = self.compute = self.write = 0.0


def bare_loop(index: Index, output: str | os.PathLike[str], phases: Phases | None = None,
              site: Callable[[list[list[np.ndarray]]], tuple[Sequence[np.ndarray], dict | None]] = anchor_site
              ) -> list[dict]:
    """Run the bare work over every well of ``index`` into a fresh zarr store at ``output``.

    ``site`` takes one site's ``[channel][z]`` images and returns its output planes, one per
    channel, and its measurements (or None); :func:`anchor_site` by default. Returns the
    measurement rows (``well``, ``site``, then the measurements), in well order.
    """
    output = Path(output)
    if output.exists():
        shutil.rmtree(output)
    store = zarr.storage.LocalStore(output)
    zarr.create_group(store, zarr_format=3)
    phases = phases or Phases()
    clock = time.perf_counter
    rows = []
    for well, sites in index.items():
        block = None
        for s, (site_number, channels) in enumerate(sites.items()):
            t0 = clock()
            images = [[tifffile.imread(path) for path in planes] for planes in channels.values()]
            t1 = clock()
            planes, measures = site(images)
            if block is None:
                block = np.empty((len(sites), len(planes), 1, *planes[0].shape), planes[0].dtype)
            for c, plane in enumerate(planes):
                block[s, c, 0] = plane
            if measures:
                rows.append({"well": well, "site": site_number, **measures})
            phases.read += t1 - t0
            phases.compute += clock() - t1
        assert block is not None
        t0 = clock()
        array = zarr.create_array(store, name=well, shape=block.shape, dtype=block.dtype,
                                  chunks=(1, *block.shape[1:]), fill_value=0)
        array[...] = block
        phases.write += clock() - t0
    return rows


def part_of(index: Index, part: str) -> Index:
    """The wells of ``index`` whose place in its order is ``K`` modulo ``N``, for ``part`` = ``"K/N"``.

    >>> part_of({"A01": {}, "A02": {}, "A03": {}}, "1/2")
    {'A02': {}}
    """
    k, _, n = part.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise ValueError(f"--part {part}: give K/N with 0 <= K < N")
    return dict(list(index.items())[int(k)::int(n)])


def _once(plate: str, output: str, part: str | None) -> None:
    start = time.perf_counter()
    index = scan_plate(plate)
    bare_loop(part_of(index, part) if part else index, output)
    print(f"{time.perf_counter() - start:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plate", help="an existing plate folder (default: a synthetic anchor plate)")
    parser.add_argument("--output", help="the zarr store to write (default: a temporary folder)")
    parser.add_argument("--once", action="store_true", help="one run, print its seconds only (needs --plate, --output)")
    parser.add_argument("--part", metavar="K/N", help="with --once: only the wells at K, K+N, K+2N, ... of the plate")
    parser.add_argument("--wells", type=int, default=96)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--z", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", help="keep synthetic plates here and reuse them")
    args = parser.parse_args(argv)
    if args.once:
        if not (args.plate and args.output):
            parser.error("--once needs --plate and --output")
        try:
            _once(args.plate, args.output, args.part)
        except ValueError as error:
            parser.error(str(error))
        return 0
    if args.part:
        parser.error("--part goes with --once")

    import statistics

    from _common import LoadMonitor, PlateSpec, synthetic_plate, table, workdir_from

    with LoadMonitor() as load, workdir_from(args.workdir) as work:
        if args.plate:
            folder = Path(args.plate)
        else:
            folder, written = synthetic_plate(work, PlateSpec(args.wells, args.sites, args.channels, args.z, args.size))
            if written:
                print(f"wrote the synthetic plate in {written:.1f} s")
        output = Path(args.output) if args.output else work / "bare.zarr"
        start = time.perf_counter()
        index = scan_plate(folder)
        scan = time.perf_counter() - start
        wells = len(index)
        images = sum(len(p) for sites in index.values() for channels in sites.values() for p in channels.values())
        bare_loop(dict(list(index.items())[:1]), output)  # warm-up: first imports, page cache
        runs, cpus, per_phase = [], [], []
        for _ in range(args.repeats):
            phases = Phases()
            start, cpu = time.perf_counter(), time.process_time()
            bare_loop(index, output, phases)
            runs.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
            per_phase.append(phases)
    best = min(runs)
    table(["figure", "value"], [
        ["wells", wells], ["images", images], ["scan s", scan],
        ["runs (s)", ", ".join(f"{r:.3f}" for r in runs)],
        ["best s", best], ["median s", statistics.median(runs)], ["spread (max/min)", max(runs) / best],
        ["best ms/well", best / wells * 1e3], ["least CPU ms/well", min(cpus) / wells * 1e3],
    ], title=f"bare loop: {folder}")
    fastest = per_phase[runs.index(best)]
    table(["phase", "ms/well (best run)"], [
        ["read (tifffile)", fastest.read / wells * 1e3],
        ["compute (normalise + max)", fastest.compute / wells * 1e3],
        ["write (zarr, one array per well)", fastest.write / wells * 1e3],
    ])
    load.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
