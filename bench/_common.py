"""Shared helpers of the issue-6 benchmarks: cached synthetic plates, the bare serial loops
(the same reads, functions and zarr writes as hcs_dask, with no Dask), timing and tables.

Not a benchmark itself. The scripts beside it import it as ``_common`` (``python bench/x.py``
puts ``bench/`` first on ``sys.path``, and the embedded Dask workers, forked or spawned, are
given that path by multiprocessing).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.util
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tifffile
import zarr
from ome_zarr.format import FormatV05
from ome_zarr.writer import write_plate_metadata

from hcs_dask import Pipeline, Plate, Step, write_synthetic_plate
from hcs_dask.steps import count_nuclei, max_projection, percentile_normalize, smooth, subtract_background
from hcs_dask.store import CHUNK_KEY_ENCODING, FieldLayout, FieldWriter, downsample, level_chunks, pyramid_levels

MB = 1e6

# ----------------------------------------------------------------------------- workloads


def anchor_pipeline() -> Pipeline:
    """The OpenHCS anchor's pipeline: percentile normalisation over each z-stack, then max projection over z."""
    return Pipeline(
        [
            Step(percentile_normalize, stack="z", name="percentile_normalize"),
            Step(max_projection, stack="z", name="max_projection"),
        ],
        name="anchor",
    )


@dataclasses.dataclass(frozen=True)
class PlateSpec:
    """A synthetic plate, named by its parameters so that a ``--workdir`` cache can reuse it."""

    wells: int
    sites: int
    channels: int
    z: int
    size: int

    @property
    def name(self) -> str:
        return f"w{self.wells}_s{self.sites}_c{self.channels}_z{self.z}_px{self.size}"

    @property
    def images(self) -> int:
        return self.wells * self.sites * self.channels * self.z


def synthetic_plate(workdir: Path, spec: PlateSpec) -> tuple[Path, float]:
    """The plate folder for ``spec`` under ``workdir`` (written unless a complete copy is there),
    and the seconds spent writing it (0 when cached)."""
    folder = workdir / "plates" / spec.name
    done = folder.with_name(spec.name + ".complete")
    if done.exists():
        return folder, 0.0
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted earlier write
    start = time.perf_counter()
    write_synthetic_plate(folder, wells=spec.wells, sites=spec.sites, channels=spec.channels, z=spec.z,
                          size=spec.size, seed=0)
    done.touch()
    return folder, time.perf_counter() - start


@contextlib.contextmanager
def workdir_from(argument: str | None) -> Iterator[Path]:
    """``--workdir`` (kept, plates cached across runs) or a temporary folder (deleted)."""
    if argument:
        path = Path(argument).absolute()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="hcs-bench-") as temporary:
        yield Path(temporary)


def subset(plate: Plate, wells: int) -> Plate:
    """The first ``wells`` wells of ``plate`` (for warm-up runs)."""
    return dataclasses.replace(plate, wells=plate.wells[:wells])


# ----------------------------------------------------------------------------- bare zarr


FORMAT = FormatV05()
_COLOURS = ("0000FF", "00FF00", "FF0000", "FF00FF", "FFFF00", "00FFFF")


def field_attributes(path: str, *, axes: Sequence[str], levels: int, channel_names: Sequence[str],
                     pixel_size_um: tuple[float, float] | None, z_step_um: float | None) -> dict[str, Any]:
    """The NGFF 0.5 attributes hcs_dask writes on a field group, built by hand."""
    py, px = pixel_size_um or (1.0, 1.0)
    spatial_unit = {"z": z_step_um is not None, "y": pixel_size_um is not None, "x": pixel_size_um is not None}
    axes_meta = []
    for axis in axes:
        entry: dict[str, Any] = {"name": axis, "type": "channel" if axis == "c" else "time" if axis == "t"
                                 else "space"}
        if axis in spatial_unit and spatial_unit[axis]:
            entry["unit"] = "micrometer"
        axes_meta.append(entry)
    datasets = []
    for level in range(levels):
        scale = {"t": 1.0, "c": 1.0, "z": z_step_um or 1.0, "y": py * 2**level, "x": px * 2**level}
        datasets.append({"path": str(level),
                         "coordinateTransformations": [{"type": "scale", "scale": [float(scale[a]) for a in axes]}]})
    return {"ome": {
        "version": FORMAT.version,
        "multiscales": [{"datasets": datasets, "name": path, "axes": axes_meta}],
        "omero": {"channels": [{"label": name, "color": _COLOURS[i % len(_COLOURS)], "active": True}
                               for i, name in enumerate(channel_names)]},
    }}


def write_field_bare(store: Any, path: str, block: np.ndarray, attributes: dict[str, Any],
                     axes: Sequence[str]) -> None:
    """One field as FieldWriter lays it out: the same levels, one file per level (a chunk or a
    shard, ``level_chunks``), the same chunks, chunk keys, dtype and (default) codecs, written with
    plain zarr calls."""
    group = zarr.create_group(store, path=path, attributes=attributes)
    data = block
    for level in range(pyramid_levels(block.shape[-2:])):
        if level:
            data = downsample(data)
        chunks, shards = level_chunks(data.shape, data.dtype)
        array = group.create_array(str(level), shape=data.shape, dtype=data.dtype, chunks=chunks,
                                   shards=shards, dimension_names=tuple(axes), fill_value=0,
                                   chunk_key_encoding=CHUNK_KEY_ENCODING)
        array[...] = data


def write_plate_layout_bare(output: Path, plate: Plate) -> Any:
    """Plate, row and well groups, wells listing all their fields up front. Returns the store."""
    store = zarr.storage.LocalStore(output)
    root = zarr.open_group(store, mode="w", zarr_format=3)
    rows = sorted({w.row for w in plate.wells}, key=plate.row_names().index)
    columns = sorted({str(w.column) for w in plate.wells}, key=int)
    write_plate_metadata(root, rows=rows, columns=columns, wells=[f"{w.row}/{w.column}" for w in plate.wells],
                         fmt=FORMAT, field_count=len(plate.sites), name=plate.name)
    images = [{"path": str(i)} for i in range(len(plate.sites))]
    for well in plate.wells:
        zarr.create_group(store, path=f"{well.row}/{well.column}",
                          attributes={"ome": {"version": FORMAT.version, "well": {"images": images}}})
    return store


# ----------------------------------------------------------------------------- serial loops


def _site_images(plate: Plate, well: Any) -> dict[int, dict[int, list[tuple[int, str]]]]:
    """site → channel → [(z, path)] sorted by z (timepoint 1 only: these plates have one)."""
    by_site: dict[int, dict[int, list[tuple[int, str]]]] = {}
    for key, relative in well.files:
        by_site.setdefault(key.site, {}).setdefault(key.channel, []).append((key.z, relative))
    for channels in by_site.values():
        for planes in channels.values():
            planes.sort()
    return by_site


def _channel_names(plate: Plate, channels: Sequence[int]) -> tuple[str, ...]:
    names = dict(plate.channel_names)
    return tuple(names.get(c, f"w{c}") for c in channels)


def serial_loop(plate: Plate, output: Path, compute_site: Callable[[list[list[np.ndarray]]],
                                                                  tuple[np.ndarray, dict[str, Any] | None]],
                *, writer: str = "zarr") -> None:
    """The bare work: read every image (tifffile), compute a site, write its field (zarr), no Dask.

    ``compute_site`` takes ``[channel][z]`` images and returns the ``(c, y, x)`` result and
    the site's measurements (or None). ``writer="zarr"`` writes each field with plain zarr
    calls (:func:`write_field_bare`); ``writer="hcs_dask"`` with hcs_dask's own
    ``FieldWriter``, so that hcs_dask run against it shows the cost of the framework alone
    (Dask, the guard, the manifest, the durable commit), not that of the write technique.
    """
    if output.exists():
        shutil.rmtree(output)
    store = write_plate_layout_bare(output, plate)
    root = Path(plate.root)
    axes = ("c", "z", "y", "x")
    rows = []
    for well in plate.wells:
        sites = _site_images(plate, well)
        for field_index, site in enumerate(sorted(sites)):
            channels = sorted(sites[site])
            images = [[tifffile.imread(root / relative) for _, relative in sites[site][c]] for c in channels]
            result, measures = compute_site(images)
            block = result[:, None]  # (c, z=1, y, x): the projection keeps a z axis of one plane
            path = f"{well.row}/{well.column}/{field_index}"
            if writer == "hcs_dask":
                layout = FieldLayout(axes=axes, shape=block.shape, dtype=str(block.dtype),
                                     channel_names=_channel_names(plate, channels), pixel_size_um=plate.pixel_size_um,
                                     z_step_um=None, levels=pyramid_levels(block.shape[-2:]))
                FieldWriter(output, path, layout).write((slice(None), slice(None)), block)
            else:
                attributes = field_attributes(path, axes=axes, levels=pyramid_levels(block.shape[-2:]),
                                              channel_names=_channel_names(plate, channels),
                                              pixel_size_um=plate.pixel_size_um, z_step_um=None)
                write_field_bare(store, path, block, attributes, axes)
            if measures:
                rows.append({"well": well.name, "site": site, "timepoint": 1, **measures})
    if rows:
        stem = output.name.removesuffix(".zarr").removesuffix(".ome")
        with open(output.with_name(f"{stem}.measurements.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def anchor_site(images: list[list[np.ndarray]]) -> tuple[np.ndarray, None]:
    """Percentile normalisation over the z-stack, max projection over z, per channel."""
    return np.stack([max_projection(percentile_normalize(np.stack(planes))) for planes in images]), None


def nuclei_site(images: list[list[np.ndarray]]) -> tuple[np.ndarray, dict[str, Any]]:
    """nuclei_count by hand: background per image, max projection over z, smooth, count."""
    projected = [smooth(max_projection(np.stack([subtract_background(image) for image in planes])), sigma=1.0)
                 for planes in images]
    return count_nuclei(np.stack(projected), nuclear_channel=1)


# ----------------------------------------------------------------------------- checks


def compare_outputs(hcs: Path, bare: Path, field: str) -> list[str]:
    """Differences between the two stores at one field: pixels and array metadata per level."""
    problems = []
    group_h = zarr.open_group(zarr.storage.LocalStore(hcs, read_only=True), path=field, mode="r")
    group_b = zarr.open_group(zarr.storage.LocalStore(bare, read_only=True), path=field, mode="r")
    if dict(group_h.attrs) != dict(group_b.attrs):
        problems.append(f"{field}: group attributes differ")
    levels_h = sorted(k for k, _ in group_h.arrays())
    levels_b = sorted(k for k, _ in group_b.arrays())
    if levels_h != levels_b:
        problems.append(f"{field}: levels {levels_h} vs {levels_b}")
    for level in set(levels_h) & set(levels_b):
        a, b = group_h[level], group_b[level]
        meta_a = json.loads((hcs / field / level / "zarr.json").read_text())
        meta_b = json.loads((bare / field / level / "zarr.json").read_text())
        if meta_a != meta_b:
            problems.append(f"{field}/{level}: array metadata differ")
        if not np.array_equal(a[...], b[...]):
            problems.append(f"{field}/{level}: pixels differ")
    return problems


# ----------------------------------------------------------------------------- clusters


@contextlib.contextmanager
def embedded_cluster(n_workers: int) -> Iterator[tuple[Any, float]]:
    """hcs_dask's own embedded cluster (``hcs_dask.cluster.connect``, as ``run_plate`` starts
    it), started here so that its start-up is timed apart from the runs. Yields (client, s)."""
    from hcs_dask.cluster import connect

    start = time.perf_counter()
    with connect(n_workers=n_workers) as client:
        client.wait_for_workers(n_workers)
        yield client, time.perf_counter() - start


# ----------------------------------------------------------------------------- figures


def well_timeline(stream: list) -> tuple[float, float]:
    """From Dask's task stream: the median well task (``run_well``, start to return) and the median
    gap on a worker between one well task's return and the next one's start, in seconds."""
    tasks, gaps = [], []
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for task in stream:
        if "hcs-well" not in str(task.get("key")):
            continue
        for span in task.get("startstops", ()):
            if span.get("action") == "compute":
                by_worker.setdefault(task["worker"], []).append((span["start"], span["stop"]))
                tasks.append(span["stop"] - span["start"])
    for spans in by_worker.values():
        spans.sort()
        gaps += [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    return statistics.median(tasks), statistics.median(gaps) if gaps else float("nan")



def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux: ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


def best(values: Sequence[float]) -> float:
    return min(values)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """Print a plain-text table (right-aligned figures)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(cells[0], widths)))
    print(line)
    print("-" * len(line))
    for row in cells[1:]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def verdict(ok: bool, text: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}: {text}")
    return ok


def note(text: str) -> None:
    print(f"note: {text}")


def compile_package_bytecode() -> None:
    """Write hcs_dask's bytecode before whole commands are timed, as ``pip install`` of a wheel does.

    An editable install writes it at the first import, unless the environment forbids writing
    bytecode (``PYTHONDONTWRITEBYTECODE``); then every command compiles the package from source
    again (49 modules, 0.25 s of CPU on a 2-core machine), which neither a user's install nor the
    other programs timed beside it (their packages installed by pip) pay. Says so when it wrote any.
    """
    import compileall
    import hcs_dask

    package = Path(hcs_dask.__file__).parent
    missing = [path for path in package.rglob("*.py")
               if not Path(importlib.util.cache_from_source(str(path))).exists()]
    if missing:
        compileall.compile_dir(str(package), quiet=1)
        note(f"wrote the bytecode of {len(missing)} hcs_dask modules first, as pip install does "
             f"({'PYTHONDONTWRITEBYTECODE is set here, so' if sys.flags.dont_write_bytecode else 'else'} "
             f"each command would compile them from source)")


def _process_cpu() -> float:
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def cpu_seconds(client: Any | None = None) -> float:
    """CPU seconds used so far by this process (client and, for an embedded cluster, the
    scheduler), plus those of the client's worker processes. Differences of two calls are
    robust to other load on the machine, unlike wall time."""
    total = _process_cpu()
    if client is not None:
        total += sum(client.run(_process_cpu).values())
    return total


class LoadMonitor:
    """Measures, in a background thread, how much CPU *other* processes use during a benchmark.

    Every second: the machine's busy CPU time (``psutil.cpu_times``) minus that of this process
    and its descendants (the embedded cluster's workers). Wall-time figures measured while
    other work competes for the cores are unreliable; this says whether that happened.
    """

    def __init__(self, interval: float = 1.0) -> None:
        import threading

        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-load-monitor", daemon=True)
        self._own: dict[int, float] = {}
        self.foreign = 0.0
        self.steal = 0.0
        self.elapsed = 0.0
        self.cores = available_cpus()

    def __enter__(self) -> LoadMonitor:
        self._last = self._sample()
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._account()
        self.elapsed = time.perf_counter() - self._started

    def _own_cpu(self) -> float:
        import psutil

        me = psutil.Process()
        for process in [me, *me.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            self._own[process.pid] = times.user + times.system
        return sum(self._own.values())  # exited processes keep their last reading

    def _sample(self) -> tuple[float, float, float]:
        import psutil

        machine = psutil.cpu_times()
        busy = machine.user + machine.system + getattr(machine, "nice", 0.0) + getattr(machine, "irq", 0.0) + \
            getattr(machine, "softirq", 0.0)
        return busy, self._own_cpu(), getattr(machine, "steal", 0.0)

    def _account(self) -> None:
        sample = self._sample()
        busy, own, steal = (now - before for now, before in zip(sample, self._last))
        self.foreign += max(0.0, busy - own)
        self.steal += steal
        self._last = sample

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._account()

    @property
    def foreign_cores(self) -> float:
        """Cores other processes kept busy, on average over the run."""
        return self.foreign / self.elapsed if self.elapsed else 0.0

    @property
    def busy(self) -> bool:
        return self.foreign_cores > 0.25 or self.steal / max(self.elapsed, 1e-9) > 0.1

    def report(self) -> None:
        text = (f"other processes kept {self.foreign_cores:.2f} of {self.cores} core(s) busy on average during "
                f"the run ({self.elapsed:.0f} s); hypervisor steal {self.steal / max(self.elapsed, 1e-9):.2f} cores")
        if self.busy:
            text += (" — BUSY: wall-time figures (and the PASS/FAIL lines on them) are unreliable; "
                     "the CPU-time columns less so. Rerun on an idle machine.")
        print(text)

    def warn_if_busy(self) -> None:
        """The closing ``note:`` line under the verdicts, when the machine was busy."""
        if self.busy:
            note("the machine was busy with other work during this run: rerun on an idle machine before "
                 "believing the wall-time verdicts")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def free_disk_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e9


def count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))
