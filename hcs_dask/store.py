"""OME-Zarr HCS output (NGFF 0.5 on zarr v3).

The split follows the concurrency rule of NGFF plates: the client writes the
plate, row and well groups once (:func:`create_plate_layout`), and each well
task writes only the field groups below its own well (:class:`FieldWriter`).
No file is ever written by two tasks, so 1536 wells cost 16× what 96 do.

Metadata dictionaries are produced by ``ome_zarr.writer``; arrays are plain
zarr v3 arrays with one shard per field level, so a field's level is a single
file on disk however many chunks it has.

Every ``zarr.json`` is made by zarr itself, on an in-memory store, and then
copied to disk as bytes (:func:`_metadata_files`). Creating the same nodes
through a ``LocalStore`` costs several milliseconds each in zarr's async
round-trips, which on a 1536-well plate or a 4-field well is most of the
time spent outside the pipeline (``bench/io.py``, ``bench/scaling.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import zarr
from ome_zarr.format import FormatV05
from ome_zarr.writer import write_multiscales_metadata, write_plate_metadata, write_well_metadata

from hcs_dask.plate import Plate

FORMAT = FormatV05()
#: Chunk edge in y and x; a field level is one shard holding these chunks.
CHUNK_YX = 256


class OutputError(ValueError):
    """An output path that cannot be used (exists without overwrite, not a directory, …)."""


def field_path(row: str, column: int, field_index: int) -> str:
    """``("B", 3, 0)`` → ``"B/3/0"``, the NGFF path of a field inside the plate."""
    return f"{row}/{column}/{field_index}"


def measurements_path(output: str | Path) -> Path:
    """Where the measurement table of a plate store goes: ``X.ome.zarr`` → ``X.measurements.csv``."""
    output = Path(output)
    stem = output.name.removesuffix(".zarr").removesuffix(".ome")
    return output.with_name(f"{stem}.measurements.csv")


def check_output(output: str | Path, *, overwrite: bool) -> Path:
    """Validate the output path before anything is written; returns it absolute."""
    output = Path(output).absolute()
    if output.exists() and not overwrite:
        raise OutputError(f"{output}: output already exists; pass --overwrite (overwrite=True) to replace it")
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a directory")
    if not output.parent.exists():
        raise OutputError(f"{output.parent}: parent folder of the output does not exist")
    return output


def _metadata_files(build: Callable[[zarr.Group], Any]) -> dict[str, bytes]:
    """The ``zarr.json`` files zarr writes for ``build(group)`` run on an empty in-memory group.

    Keys are store paths (``"zarr.json"``, ``"0/zarr.json"``, …); no chunk data is written.
    """
    files: dict[str, Any] = {}
    build(zarr.open_group(zarr.storage.MemoryStore(files), mode="w", zarr_format=3))
    return {key: buffer.to_bytes() for key, buffer in files.items()}


def _write_file(path: Path, data: bytes, *, atomic: bool = False, durable: bool = False) -> None:
    """Write ``data``; ``atomic``: through a temporary file and a rename, so a reader sees the
    old file or the new one; ``durable``: flushed to disk before that rename."""
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if atomic else path
    with open(target, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    if atomic:
        os.replace(target, path)


@lru_cache(maxsize=64)
def _well_metadata(fields: tuple[int, ...]) -> bytes:
    """A well's ``zarr.json`` listing these fields; wells mostly list the same ones, so it is cached."""
    images = [{"path": str(f)} for f in fields]
    return _metadata_files(lambda group: write_well_metadata(group, images, fmt=FORMAT))["zarr.json"]


def create_plate_layout(output: str | Path, plate: Plate, *, overwrite: bool = False) -> Path:
    """Write the plate, row and well groups once, on the client.

    The field groups below each well are the well task's to write. Every well
    starts with the same document (no images), so it is made once and copied.
    """
    output = check_output(output, overwrite=overwrite)
    if output.exists():
        shutil.rmtree(output)
    rows = sorted({w.row for w in plate.wells}, key=plate.row_names().index)
    columns = sorted({str(w.column) for w in plate.wells}, key=int)
    plate_files = _metadata_files(lambda group: write_plate_metadata(
        group,
        rows=rows,
        columns=columns,
        wells=[f"{w.row}/{w.column}" for w in plate.wells],
        fmt=FORMAT,
        field_count=len(plate.sites),
        name=plate.name,
    ))
    row_document = _metadata_files(lambda group: None)["zarr.json"]
    # A well lists no images until its task has written them all (see commit_well):
    # after a crash, a half-written well is present on disk but referenced by nothing.
    well_document = _well_metadata(())
    output.mkdir()
    _write_file(output / "zarr.json", plate_files["zarr.json"])
    for row in rows:
        (output / row).mkdir()
        _write_file(output / row / "zarr.json", row_document)
    for well in plate.wells:
        folder = output / well.row / str(well.column)
        folder.mkdir()
        _write_file(folder / "zarr.json", well_document)
    return output


def _listed_images(output: str | Path, row: str, column: int) -> list:
    document = json.loads((Path(output) / row / str(column) / "zarr.json").read_bytes())
    return document.get("attributes", {}).get("ome", {}).get("well", {}).get("images", [])


def reset_well(output: str | Path, row: str, column: int) -> None:
    """Before a well (re)runs: unlist its images and remove fields left by an earlier attempt."""
    folder = Path(output) / row / str(column)
    if _listed_images(output, row, column):
        _write_file(folder / "zarr.json", _well_metadata(()), atomic=True)
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)


#: fsync waits on the disk, not the CPU: a few threads flush a well's files together.
_FLUSHERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="hcs-dask-fsync")


def commit_well(output: str | Path, row: str, column: int, fields: Sequence[int], *, durable: bool = True) -> None:
    """List a well's fields in its metadata: the point from which the well's data count.

    With ``durable``, every file of the well is flushed to disk first, so that a
    listed field is complete even after a power cut, not only after a process kill.
    The listing itself is an atomic rename, so a reader sees the old list or the new one.
    """
    folder = Path(output) / row / str(column)
    if durable:
        paths = [os.path.join(directory, name) for directory, _, files in os.walk(folder) for name in files]
        list(_FLUSHERS.map(_fsync, paths))
    _write_file(folder / "zarr.json", _well_metadata(tuple(fields)), atomic=True, durable=durable)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Manifest:
    """The run's record inside the store: ``hcs_dask/run.json`` and one file per well.

    ``run.json`` (written once, by the client) holds the plate's and the pipeline's
    fingerprints, so that a resume with a different plate or pipeline is refused.
    ``wells/<well>.json`` is written by that well's task (``running``, then its outcome)
    or by the client when the task could not (worker death, timeout). No two wells
    ever write the same file, and every write is an atomic rename. With ``durable``
    (the default) outcome records are flushed to disk before the rename.
    """

    FOLDER = "hcs_dask"

    def __init__(self, output: str | Path, *, durable: bool = True) -> None:
        self.output = Path(output)
        self.folder = self.output / self.FOLDER
        self.durable = durable

    def write_run(self, info: dict) -> None:
        (self.folder / "wells").mkdir(parents=True, exist_ok=True)
        _write_json(self.folder / "run.json", {**info, "created": time.time()})

    def read_run(self) -> dict | None:
        try:
            return json.loads((self.folder / "run.json").read_text())
        except FileNotFoundError:
            return None

    def write_well(self, record: dict) -> None:
        # A "running" record lost to a power cut reads as "not started": both mean the
        # well runs again on resume, so only outcomes are worth an fsync.
        _write_json(self.folder / "wells" / f"{record['well']}.json", record,
                    durable=self.durable and record.get("status") != "running")

    def read_well(self, well: str) -> dict | None:
        try:
            return json.loads((self.folder / "wells" / f"{well}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def read_wells(self) -> dict[str, dict]:
        records = {}
        folder = self.folder / "wells"
        if folder.is_dir():
            for path in folder.glob("*.json"):
                try:
                    records[path.stem] = json.loads(path.read_text())
                except json.JSONDecodeError:
                    continue  # a torn write cannot happen (atomic rename); be lenient anyway
        return records


def _write_json(path: Path, data: dict, *, durable: bool = True) -> None:
    _write_file(path, json.dumps(data, default=str).encode(), atomic=True, durable=durable)


def pyramid_levels(shape_yx: Sequence[int], *, max_levels: int = 3, min_size: int = 64) -> int:
    """How many 2× levels to write: at most ``max_levels``, none smaller than ``min_size``."""
    levels = 1
    while levels < max_levels and min(shape_yx) // 2**levels >= min_size:
        levels += 1
    return levels


def downsample(array: np.ndarray) -> np.ndarray:
    """Halve the last two axes by 2×2 block mean, keeping the dtype."""
    y, x = array.shape[-2] // 2 * 2, array.shape[-1] // 2 * 2
    trimmed = array[..., :y, :x]
    blocks = trimmed.reshape(*trimmed.shape[:-2], y // 2, 2, x // 2, 2)
    if np.issubdtype(array.dtype, np.integer):
        return np.round(blocks.mean(axis=(-3, -1))).astype(array.dtype)
    return blocks.mean(axis=(-3, -1), dtype=np.float64).astype(array.dtype)


@dataclass(frozen=True)
class FieldLayout:
    """Everything needed to create one field image, decided before pixels exist."""

    axes: tuple[str, ...]            # e.g. ("c", "z", "y", "x") or ("t", "c", "z", "y", "x")
    shape: tuple[int, ...]
    dtype: str
    channel_names: tuple[str, ...]
    pixel_size_um: tuple[float, float] | None
    z_step_um: float | None
    levels: int


class FieldWriter:
    """Creates one field's multiscale image and writes regions of it (all levels at once)."""

    def __init__(self, output: str | Path, path: str, layout: FieldLayout) -> None:
        self.output = Path(output)
        self.path = path
        self.layout = layout
        self._arrays: list[zarr.Array] | None = None

    def create(self) -> None:
        """Write the field's group and empty level arrays; metadata comes from :func:`_field_template`."""
        files, metadata = _field_template(self.layout)
        folder = self.output / self.path
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        group = json.loads(files["zarr.json"])
        group["attributes"]["ome"]["multiscales"][0]["name"] = self.path
        for key, data in files.items():
            if key != "zarr.json":
                (folder / key).parent.mkdir(exist_ok=True)
                _write_file(folder / key, data)
        _write_file(folder / "zarr.json", json.dumps(group, indent=2).encode())
        store = zarr.storage.LocalStore(self.output)
        # The arrays are opened from the metadata in hand, not read back from disk.
        self._arrays = [
            zarr.Array(zarr.AsyncArray(metadata=level, store_path=zarr.storage.StorePath(store, f"{self.path}/{i}")))
            for i, level in enumerate(metadata)
        ]


    def write(self, index: tuple[int | slice, ...], data: np.ndarray) -> None:
        """Write ``data`` (covering full y and x) at ``index`` over the leading axes, every level."""
        if self._arrays is None:
            self.create()
        assert self._arrays is not None
        for level, array in enumerate(self._arrays):
            if level:
                data = downsample(data)
            array[index] = data[..., : array.shape[-2], : array.shape[-1]]


@lru_cache(maxsize=64)
def _field_template(layout: FieldLayout) -> tuple[dict[str, bytes], tuple[Any, ...]]:
    """A field's ``zarr.json`` files (the multiscales name left empty) and its level arrays' metadata.

    The wells of a plate share a handful of layouts, so each is built once per process.
    """
    arrays = []

    def build(group: zarr.Group) -> None:
        datasets = []
        lead = layout.shape[:-2]
        for level in range(layout.levels):
            y = layout.shape[-2] // 2**level
            x = layout.shape[-1] // 2**level
            chunk_y, chunk_x = min(CHUNK_YX, y), min(CHUNK_YX, x)
            # One shard holds the whole level; its edge must be a whole number of chunks
            # (2160 px is not a multiple of 256), so it is rounded up past the array's edge.
            arrays.append(group.create_array(
                str(level),
                shape=(*lead, y, x),
                dtype=layout.dtype,
                chunks=(*(1 for _ in lead), chunk_y, chunk_x),
                shards=(*lead, -(-y // chunk_y) * chunk_y, -(-x // chunk_x) * chunk_x),
                dimension_names=layout.axes,
                fill_value=0,
            ))
            datasets.append({"path": str(level), "coordinateTransformations": [
                {"type": "scale", "scale": _scale(layout, level)}]})
        units = {a: "micrometer" for a in ("z", "y", "x") if a in layout.axes and _has_unit(layout, a)}
        write_multiscales_metadata(
            group,
            datasets,
            fmt=FORMAT,
            axes=list(layout.axes),
            axes_units=units or None,
            name="",
            metadata={"omero": _omero(layout.channel_names)},
        )

    files = _metadata_files(build)
    return files, tuple(array.metadata for array in arrays)


def _has_unit(layout: FieldLayout, axis: str) -> bool:
    if axis == "z":
        return layout.z_step_um is not None
    return layout.pixel_size_um is not None


def _scale(layout: FieldLayout, level: int) -> list[float]:
    py, px = layout.pixel_size_um or (1.0, 1.0)
    scale = {"t": 1.0, "c": 1.0, "z": layout.z_step_um or 1.0, "y": py * 2**level, "x": px * 2**level}
    return [float(scale[a]) for a in layout.axes]


def _omero(channel_names: Sequence[str]) -> dict[str, Any]:
    colors = ("0000FF", "00FF00", "FF0000", "FF00FF", "FFFF00", "00FFFF")
    return {
        "channels": [
            {"label": name, "color": colors[i % len(colors)], "active": True}
            for i, name in enumerate(channel_names)
        ]
    }
