"""OME-Zarr HCS output (NGFF 0.5 on zarr v3).

The split follows the concurrency rule of NGFF plates: the client writes the
plate, row and well groups once (:func:`create_plate_layout`), and each well
task writes only the field groups below its own well (:class:`FieldWriter`).
No file is ever written by two tasks, so 1536 wells cost 16× what 96 do.

Metadata dictionaries are produced by ``ome_zarr.writer``; arrays are plain
zarr v3 arrays with one shard per field level, so a field's level is a single
file on disk however many chunks it has.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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


def create_plate_layout(output: str | Path, plate: Plate, *, overwrite: bool = False) -> Path:
    """Write the plate, row and well groups once, on the client.

    The field groups below each well are the well task's to write.
    """
    output = check_output(output, overwrite=overwrite)
    if output.exists():
        shutil.rmtree(output)
    root = zarr.open_group(zarr.storage.LocalStore(output), mode="w", zarr_format=3)
    rows = sorted({w.row for w in plate.wells}, key=plate.row_names().index)
    columns = sorted({str(w.column) for w in plate.wells}, key=int)
    write_plate_metadata(
        root,
        rows=rows,
        columns=columns,
        wells=[f"{w.row}/{w.column}" for w in plate.wells],
        fmt=FORMAT,
        field_count=len(plate.sites),
        name=plate.name,
    )
    images = [{"path": str(i)} for i in range(len(plate.sites))]
    for well in plate.wells:
        group = root.require_group(f"{well.row}/{well.column}")
        write_well_metadata(group, images, fmt=FORMAT)
    return output


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
        layout = self.layout
        store = zarr.storage.LocalStore(self.output)
        group = zarr.open_group(store, path=self.path, mode="w", zarr_format=3)
        arrays = []
        datasets = []
        lead = layout.shape[:-2]
        for level in range(layout.levels):
            y = layout.shape[-2] // 2**level
            x = layout.shape[-1] // 2**level
            shape = (*lead, y, x)
            chunks = (*(1 for _ in lead), min(CHUNK_YX, y), min(CHUNK_YX, x))
            arrays.append(
                group.create_array(
                    str(level),
                    shape=shape,
                    dtype=layout.dtype,
                    chunks=chunks,
                    shards=shape,
                    dimension_names=layout.axes,
                    fill_value=0,
                )
            )
            datasets.append({"path": str(level), "coordinateTransformations": [
                {"type": "scale", "scale": self._scale(level)}]})
        units = {a: "micrometer" for a in ("z", "y", "x") if a in layout.axes and self._has_unit(a)}
        write_multiscales_metadata(
            group,
            datasets,
            fmt=FORMAT,
            axes=list(layout.axes),
            axes_units=units or None,
            name=self.path,
            metadata={"omero": _omero(layout.channel_names)},
        )
        self._arrays = arrays

    def _has_unit(self, axis: str) -> bool:
        if axis == "z":
            return self.layout.z_step_um is not None
        return self.layout.pixel_size_um is not None

    def _scale(self, level: int) -> list[float]:
        layout = self.layout
        py, px = layout.pixel_size_um or (1.0, 1.0)
        scale = {"t": 1.0, "c": 1.0, "z": layout.z_step_um or 1.0, "y": py * 2**level, "x": px * 2**level}
        return [float(scale[a]) for a in layout.axes]

    def write(self, index: tuple[int | slice, ...], data: np.ndarray) -> None:
        """Write ``data`` (covering full y and x) at ``index`` over the leading axes, every level."""
        if self._arrays is None:
            self.create()
        assert self._arrays is not None
        for level, array in enumerate(self._arrays):
            if level:
                data = downsample(data)
            array[index] = data[..., : array.shape[-2], : array.shape[-1]]


def _omero(channel_names: Sequence[str]) -> dict[str, Any]:
    colors = ("0000FF", "00FF00", "FF0000", "FF00FF", "FFFF00", "00FFFF")
    return {
        "channels": [
            {"label": name, "color": colors[i % len(colors)], "active": True}
            for i, name in enumerate(channel_names)
        ]
    }
