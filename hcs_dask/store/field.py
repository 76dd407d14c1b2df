"""One field's multiscale image: its group, level arrays and metadata, written by its well's task.

Arrays are plain zarr v3 arrays, and each field level is a single file on disk however many
chunks it has (:func:`level_chunks`): a small level is one chunk, a larger one is one shard of
256 × 256 chunks. A field written whole (every well without sequential axes) has each level's
file encoded by the array's own codecs, all levels in one call into zarr, and written as one
file: no read-before-write, no round trip per level.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.buffer import default_buffer_prototype
from zarr.core.sync import sync

from hcs_dask.store._files import metadata_files, write_file

__all__ = ["CHUNK_KEY_ENCODING", "CHUNK_YX", "FieldLayout", "FieldWriter", "ONE_CHUNK_BYTES", "WRITE_BATCH_BYTES",
           "downsample", "level_chunks", "pyramid_levels", "write_fields"]

#: Chunk edge in y and x; a field level larger than one chunk is one shard holding these chunks.
CHUNK_YX = 256

#: A level that fits one chunk along y and x and holds at most this many bytes in all (every
#: channel, plane and timepoint) is a single zarr chunk, not a shard (:func:`level_chunks`).
ONE_CHUNK_BYTES = 2 * 2**20

#: A level's one file (its chunk or its shard) is ``c.0.0.0.0`` beside its ``zarr.json``: zarr
#: v3's default chunk key encoding with ``"."``, which every zarr v3 reader takes from the array's
#: metadata. With ``"/"`` the key would be a folder per axis (``c/0/0/0/0``): four or five more
#: folders to make, and to flush, per field.
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}


def pyramid_levels(shape_yx: Sequence[int], *, chunk: int = CHUNK_YX, min_size: int = 32) -> int:
    """How many levels to write: full resolution, then 2× halvings until a level fits one chunk.

    The smallest level is what a plate viewer loads for every field of a plate overview;
    once it is a single chunk (``chunk`` px or less along both edges) a further level saves a
    viewer nothing. An image that fits one chunk gets one level. No level's shorter edge goes
    below ``min_size``.

    Examples
    --------
    >>> [pyramid_levels((n, n)) for n in (128, 256, 512, 1024, 2048, 2160)]
    [1, 1, 2, 3, 4, 5]
    """
    levels, y, x = 1, int(shape_yx[0]), int(shape_yx[1])
    while max(y, x) > chunk and min(y, x) // 2 >= min_size:
        y, x, levels = y // 2, x // 2, levels + 1
    return levels


def level_chunks(shape: Sequence[int], dtype: Any) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """A level array's chunk shape and shard shape; no shard (None) where the level is one chunk.

    A level that fits one chunk along y and x (:data:`CHUNK_YX` px or less) and holds at most
    :data:`ONE_CHUNK_BYTES` is one chunk of the whole level: a reader of one plane decodes the
    level's 2 MiB at most, and the writer encodes it with no sharding codec, whose index and
    inner pipeline cost more than the chunk's compression at this size (the four 2-channel
    128 px fields of a well: 2.6-4.3 ms as chunks against 10.5-13.1 ms as shards, zarr 3.1 on
    a 2-core machine). Any other level is one shard of the whole level holding
    chunks of one plane and ``CHUNK_YX`` × ``CHUNK_YX`` px, so that a viewer reads one tile of
    one plane; the shard's edge is a whole number of chunks (2160 px is not a multiple of 256),
    so it is rounded up past the array's edge. Either way the level is one file. A region
    written into a one-chunk level (a sequential combination) has zarr decode and encode the
    level again, 2 MiB at most; into a shard, zarr re-encodes only the region's chunks.

    Examples
    --------
    >>> level_chunks((2, 1, 128, 128), "float32")
    ((2, 1, 128, 128), None)
    >>> level_chunks((2, 3, 300, 200), "uint16")
    ((1, 1, 256, 200), (2, 3, 512, 200))
    >>> level_chunks((40, 5, 256, 256), "uint16")  # 26 MB: a viewer reads a plane, not the level
    ((1, 1, 256, 256), (40, 5, 256, 256))
    """
    *lead, y, x = (int(n) for n in shape)
    if y <= CHUNK_YX and x <= CHUNK_YX and np.dtype(dtype).itemsize * int(np.prod(shape)) <= ONE_CHUNK_BYTES:
        return (*lead, y, x), None
    chunk_y, chunk_x = min(CHUNK_YX, y), min(CHUNK_YX, x)
    return (*(1 for _ in lead), chunk_y, chunk_x), (*lead, -(-y // chunk_y) * chunk_y, -(-x // chunk_x) * chunk_x)


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
    """Creates one field's multiscale image and writes regions of it (all levels at once).

    Each ``omero`` channel carries the ``window`` its data imply: ``start``/``end`` the
    lowest and highest value written so far, ``min``/``max`` the range of the dtype
    (for floats, of the data). The group's metadata is rewritten after every write; no
    reader sees it before the well lists the field (:func:`hcs_dask.store.commit_well`).
    """

    def __init__(self, output: str | Path, path: str, layout: FieldLayout, *,
                 translation_um: tuple[float, float] | None = None,
                 channel_planes: tuple[tuple[int, ...], ...] | None = None) -> None:
        self.output = Path(output)
        self.path = path
        self.layout = layout
        #: The field's (y, x) stage position in µm: a ``translation`` on every level.
        self.translation_um = translation_um
        #: Per channel, the ``z`` indices that hold data, where channels differ in depth.
        self.channel_planes = channel_planes
        self._arrays: list[zarr.Array] | None = None
        self._group: dict[str, Any] | None = None
        self._ranges: dict[int, tuple[float, float]] = {}

    def create(self, *, write_group: bool = True) -> None:
        """Write the field's group and empty level arrays; metadata comes from :func:`_field_template`.

        ``write_group=False`` leaves the group's ``zarr.json`` to the first write, which writes it
        with its windows (one metadata write per field, not two).
        """
        files, metadata = _field_template(self.layout)
        folder = self.output / self.path
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        group = json.loads(files["zarr.json"])
        group["attributes"]["ome"]["multiscales"][0]["name"] = self.path
        # Per field, not per layout: patched into the shared template rather than cached with it.
        if self.translation_um is not None:
            _add_translation(group["attributes"]["ome"]["multiscales"][0], self.layout, self.translation_um)
        if self.channel_planes is not None:
            group["attributes"]["hcs_dask"] = {"channel_planes": [list(p) for p in self.channel_planes]}
        self._group = group
        for key, data in files.items():
            if key != "zarr.json":
                (folder / key).parent.mkdir(exist_ok=True)
                write_file(folder / key, data)
        if write_group:
            write_file(folder / "zarr.json", json.dumps(group).encode())
        store = zarr.storage.LocalStore(self.output)
        # The arrays are opened from the metadata in hand, not read back from disk.
        self._arrays = [
            zarr.Array(zarr.AsyncArray(metadata=level, store_path=zarr.storage.StorePath(store, f"{self.path}/{i}")))
            for i, level in enumerate(metadata)
        ]

    def write(self, index: tuple[int | slice, ...], data: np.ndarray) -> None:
        """Write ``data`` (covering full y and x) at ``index`` over the leading axes, every level."""
        write_fields([(self, index, data)])

    def _note_range(self, index: tuple[int | slice, ...], data: np.ndarray) -> None:
        """Widen each written channel's value range by ``data``."""
        axis = self.layout.axes.index("c")
        position = index[axis] if axis < len(index) else slice(None)
        channels = range(self.layout.shape[axis])[position] if isinstance(position, slice) else [position]
        if isinstance(position, int):  # the index took the channel axis away
            data = np.expand_dims(data, axis)
        others = tuple(i for i in range(data.ndim) if i != axis)
        lows, highs = data.min(axis=others), data.max(axis=others)
        for channel, low, high in zip(channels, lows.tolist(), highs.tolist()):
            seen = self._ranges.get(channel)
            self._ranges[channel] = (low, high) if seen is None else (min(seen[0], low), max(seen[1], high))

    def _write_windows(self) -> None:
        assert self._group is not None
        kind = np.dtype(self.layout.dtype)
        limits = np.iinfo(kind) if kind.kind in "iu" else None
        for channel, entry in enumerate(self._group["attributes"]["ome"]["omero"]["channels"]):
            if channel not in self._ranges:
                continue
            low, high = self._ranges[channel]
            entry["window"] = {"start": low, "end": high,
                               "min": int(limits.min) if limits is not None else low,
                               "max": int(limits.max) if limits is not None else high}
        write_file(self.output / self.path / "zarr.json", json.dumps(self._group).encode())


#: Bytes of field data that :func:`write_fields` callers gather before a call (a well's small
#: fields go in one call; a large field alone is a call of its own).
WRITE_BATCH_BYTES = 64 * 2**20


def write_fields(writes: Sequence[tuple[FieldWriter, tuple[int | slice, ...], np.ndarray]]) -> None:
    """Write ``(writer, index, data)`` regions, every level of each (:meth:`FieldWriter.write`, several at once).

    Fields written whole have each level's shard encoded by the array's own codecs, all of
    them in one call into zarr, and written as one file each; a region of a field (one
    sequential combination) goes through zarr, which merges it into the existing shard.
    """
    whole: list[tuple[FieldWriter, zarr.Array, np.ndarray]] = []
    for writer, index, data in writes:
        if writer._arrays is None:
            writer.create(write_group=False)
        assert writer._arrays is not None
        writer._note_range(index, data)
        levels = []
        for level, array in enumerate(writer._arrays):
            if level:
                data = downsample(data)
            levels.append(data[..., : array.shape[-2], : array.shape[-1]])
        if all(i == slice(None) for i in index) and tuple(data.shape[:-2]) == tuple(writer.layout.shape[:-2]):
            whole += [(writer, array, level_data) for array, level_data in zip(writer._arrays, levels)]
        else:
            for array, level_data in zip(writer._arrays, levels):
                array[index] = level_data
    if whole:
        _write_whole(whole)
    for writer, _, _ in writes:  # the group's metadata last, with its windows: it names what is written
        writer._write_windows()


def _write_whole(whole: Sequence[tuple[FieldWriter, zarr.Array, np.ndarray]]) -> None:
    files = sync(_encode_whole([(array, data) for _, array, data in whole]))
    for (writer, array, _), encoded in zip(whole, files):
        if encoded is None:  # every value is the fill value: zarr writes no file either
            continue
        # The level's folder exists (its zarr.json) and the key has no "/" (CHUNK_KEY_ENCODING).
        write_file(writer.output / array.path / array.metadata.encode_chunk_key((0,) * array.ndim), encoded)


async def _encode_whole(levels: Sequence[tuple[zarr.Array, np.ndarray]]) -> list[bytes | None]:
    """Each level array's single chunk or shard, holding all of its data, encoded by the array's
    own codec pipeline; None for one with nothing but the fill value (zarr writes no such chunk)."""
    prototype = default_buffer_prototype()

    async def encode(array: zarr.Array, data: np.ndarray) -> bytes | None:
        spec = array.metadata.get_chunk_spec((0,) * array.ndim, array.async_array.config, prototype)
        if tuple(spec.shape) != data.shape:  # the shard reaches past the array's edge: fill value there
            padded = np.full(spec.shape, array.fill_value, dtype=data.dtype)
            padded[tuple(slice(0, n) for n in data.shape)] = data
            data = padded
        buffer = prototype.nd_buffer.from_numpy_array(np.ascontiguousarray(data))
        # A shard of fill values encodes to None; a plain chunk is checked as zarr's own write does.
        if not spec.config.write_empty_chunks and buffer.all_equal(spec.fill_value):
            return None
        [encoded] = await array.async_array.codec_pipeline.encode([(buffer, spec)])
        return None if encoded is None else encoded.to_bytes()

    return await asyncio.gather(*(encode(array, data) for array, data in levels))


@lru_cache(maxsize=64)
def _field_template(layout: FieldLayout) -> tuple[dict[str, bytes], tuple[Any, ...]]:
    """A field's ``zarr.json`` files (the multiscales name left empty) and its level arrays' metadata.

    The wells of a plate share a handful of layouts, so each is built once per process.
    """
    arrays = []

    def build(group: zarr.Group) -> None:
        lead = layout.shape[:-2]
        for level in range(layout.levels):
            shape = (*lead, layout.shape[-2] // 2**level, layout.shape[-1] // 2**level)
            chunks, shards = level_chunks(shape, layout.dtype)
            arrays.append(group.create_array(
                str(level),
                shape=shape,
                dtype=layout.dtype,
                chunks=chunks,
                shards=shards,
                dimension_names=layout.axes,
                fill_value=0,
                chunk_key_encoding=CHUNK_KEY_ENCODING,
            ))
        units = {a: "micrometer" for a in ("z", "y", "x") if a in layout.axes and _has_unit(layout, a)}
        group.attrs["ome"] = image_attributes(layout.axes, [_scale(layout, level) for level in range(layout.levels)],
                                              units=units, name="", omero=_omero(layout.channel_names))

    from hcs_dask.store._ngff import image_attributes  # ome-zarr-models (pydantic) where it is used

    files = metadata_files(build)
    return files, tuple(array.metadata for array in arrays)


def _add_translation(multiscale: dict[str, Any], layout: FieldLayout, position_um: tuple[float, float]) -> None:
    """Append a ``translation`` to every level: the field's position, plus half a level-0 pixel per halving."""
    py, px = layout.pixel_size_um or (1.0, 1.0)
    for level, dataset in enumerate(multiscale["datasets"]):
        shift = (2**level - 1) / 2
        offset = {"y": position_um[0] + shift * py, "x": position_um[1] + shift * px}
        dataset["coordinateTransformations"].append(
            {"type": "translation", "translation": [float(offset.get(a, 0.0)) for a in layout.axes]})


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
