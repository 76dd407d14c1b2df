"""Revvity (PerkinElmer) Opera Phenix / Operetta CLS plates, as Harmony exports them.

The layout:

- image files ``r<RR>c<CC>f<FF>p<PP>-ch<C>sk<T>fk<K>fl<L>.tiff`` (row and column
  numbers, field, plane, channel, timepoint ``sk``), in an ``Images/`` folder;
- ``Index.idx.xml`` or ``Index.xml`` beside them: an ``EvaluationInputData``
  document in a ``…/PEHH/HarmonyV<n>`` namespace listing every ``Images/Image``
  (``URL``, ``Row``, ``Col``, ``FieldID``, ``PlaneID``, ``TimepointID``,
  ``ChannelID``, ``PositionX/Y/Z``) and the channels (``ChannelName``,
  ``ImageResolutionX/Y``): in each ``Image`` (Harmony 4) or in
  ``Maps/Map/Entry[@ChannelID]`` (Harmony 5 and later). Lengths carry a ``Unit``
  attribute, metres where it is absent.

The index is the source of truth when present; without one the file names are
read, with a :class:`~hcs_dask.formats.PlateWarning`.
"""

from __future__ import annotations

import os
import re
import warnings
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from typing import BinaryIO

from hcs_dask.formats._common import (
    Place, build_wells, geometry, length_in_um, listing, local_name, well_name, z_step,
)
from hcs_dask.formats._errors import PlateError, PlateWarning
from hcs_dask.formats._tiff import add_to_size_group, read_headers
from hcs_dask.plate import Plate

__all__ = ["is_operaphenix", "read_operaphenix", "example", "LOOKED_FOR", "EXAMPLE_NAME", "INDEX_NAMES"]

#: Index file names, in the order they are looked for.
INDEX_NAMES = ("Index.idx.xml", "Index.xml")
#: One image name as Harmony writes it, for "no plate found" messages.
EXAMPLE_NAME = "r02c05f01p01-ch1sk1fk1fl1.tiff"
LOOKED_FOR = (
    f"Harmony exports: {' or '.join(INDEX_NAMES)}, or images named like {EXAMPLE_NAME}, "
    "in the folder or its Images/ subfolder"
)
_IMAGE_NAME = re.compile(
    r"^r(\d+)c(\d+)f(\d+)p(\d+)-ch(\d+)sk(\d+)fk(\d+)fl(\d+)\.tiff?$", re.IGNORECASE
)
#: Image fields read from an index; channel fields may come from ``Maps`` instead.
_IMAGE_FIELDS = frozenset({
    "URL", "Row", "Col", "FieldID", "PlaneID", "TimepointID", "ChannelID", "ChannelName",
    "ImageResolutionX", "ImageResolutionY", "PositionX", "PositionY", "PositionZ", "State",
})
_CHANNEL_FIELDS = frozenset({"ChannelName", "ImageResolutionX", "ImageResolutionY"})


# --------------------------------------------------------------------------- API
def is_operaphenix(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (a folder, its ``Images/`` subfolder, or an index file) is a Harmony export."""
    return example(path) is not None


def example(path: str | os.PathLike[str]) -> str | None:
    """The index or first Harmony image at ``path`` (relative to it), or ``None``."""
    absolute = os.path.abspath(os.fspath(path))
    if os.path.isfile(absolute):
        return os.path.basename(absolute) if os.path.basename(absolute) in INDEX_NAMES else None
    for candidate in (absolute, os.path.join(absolute, "Images")):
        shown = _shows_harmony(candidate)
        if shown is not None:
            return os.path.relpath(os.path.join(candidate, shown), absolute)
    return None


def read_operaphenix(path: str | os.PathLike[str], *, read_headers: bool = True) -> Plate:
    """Index an Opera Phenix / Operetta CLS plate (Harmony export).

    Parameters
    ----------
    path
        The measurement folder, its ``Images/`` folder, or the index file.
    read_headers
        Read one TIFF header per (channel, file size) for shape and dtype and check
        that they agree; ``False`` leaves shape ``(0, 0)`` and dtype ``""``.

    Returns
    -------
    Plate
        ``format="operaphenix"``: channel names, pixel size, z step and field
        positions from the index; timepoints numbered as the file names' ``sk``
        (``TimepointID`` + 1).

    Raises
    ------
    PlateError
        If the index is malformed or not a Harmony index, names files that do
        not exist, lacks a required field, or two images claim one place.

    Warns
    -----
    PlateWarning
        When there is no index and the file names are read instead.
    """
    given = os.path.abspath(os.fspath(path))
    if not os.path.exists(given):
        raise PlateError(f"{given} does not exist")
    if os.path.isfile(given):
        folder, index = os.path.dirname(given), given
    else:
        found = _images_folder(given)
        if found is None:
            raise PlateError(f"no Opera Phenix plate in {given}: looked for {LOOKED_FOR}")
        folder = found
        index = next((os.path.join(folder, n) for n in INDEX_NAMES if os.path.isfile(os.path.join(folder, n))), None)
    if index is None:
        return _from_file_names(folder, given, read_headers)
    return _from_index(folder, index, given, read_headers)


# ------------------------------------------------------------------ locating
def _shows_harmony(folder: str) -> str | None:
    """The index in ``folder``, else its first Harmony image name, else ``None``."""
    if not os.path.isdir(folder):
        return None
    for name in INDEX_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
            return name
    try:
        with os.scandir(folder) as entries:
            return next((entry.name for entry in entries if _IMAGE_NAME.match(entry.name)), None)
    except OSError:
        return None


def _images_folder(folder: str) -> str | None:
    """``folder`` or ``folder/Images``, whichever holds an index or a Harmony image name."""
    for candidate in (folder, os.path.join(folder, "Images")):
        if _shows_harmony(candidate) is not None:
            return candidate
    return None


# --------------------------------------------------------------------- index
@dataclass
class _Index:
    """What a Harmony index says."""

    path: str
    plate_name: str | None = None
    rows: int | None = None
    columns: int | None = None
    images: list[dict[str, tuple[str, str | None]]] = field(default_factory=list)
    #: ChannelID -> {field: (text, unit)} from Maps/Map/Entry.
    channels: dict[int, dict[str, tuple[str, str | None]]] = field(default_factory=dict)


def _parse_index(path: str) -> _Index:
    """Stream the index: a 384-well plate's index is tens of MB, so elements are cleared as read."""
    index = _Index(path)
    try:
        # Opened here, not by iterparse: a generator left by an exception keeps its own file open
        # until it is collected.
        with open(path, "rb") as handle:
            _read_index(handle, index)
    except ElementTree.ParseError as error:
        line, column = error.position
        raise PlateError(f"{path} is malformed XML (line {line}, column {column}): {error.msg}") from None
    except OSError as error:
        raise PlateError(f"cannot read {path}: {error.strerror or error}") from None
    return index


def _read_index(handle: BinaryIO, index: _Index) -> None:
    path = index.path
    stack: list[str] = []
    for event, element in ElementTree.iterparse(handle, events=("start", "end")):
        name = local_name(element.tag)
        if event == "start":
            if not stack and name != "EvaluationInputData":
                raise PlateError(f"{path} is not a Harmony index: its root element is <{name}>, "
                                 "not <EvaluationInputData>")
            stack.append(name)
            continue
        stack.pop()
        parent = stack[-1] if stack else None
        if name == "Image" and parent == "Images":
            index.images.append(_children(element, _IMAGE_FIELDS))
            element.clear()
        elif name == "Entry" and parent == "Map":
            channel = element.get("ChannelID")
            described = _children(element, _CHANNEL_FIELDS)
            if channel is not None and channel.strip().isdigit() and described:
                index.channels.setdefault(int(channel), {}).update(described)
            element.clear()
        elif parent == "Plate":
            text = (element.text or "").strip()
            if name == "Name" and text:
                index.plate_name = text
            elif name == "PlateID" and text and index.plate_name is None:
                index.plate_name = text
            elif name == "PlateRows" and text.isdigit():
                index.rows = int(text)
            elif name == "PlateColumns" and text.isdigit():
                index.columns = int(text)


def _children(element: ElementTree.Element, wanted: frozenset[str]) -> dict[str, tuple[str, str | None]]:
    values = {}
    for child in element:
        name = local_name(child.tag)
        if name in wanted:
            values[name] = ((child.text or "").strip(), child.get("Unit"))
    return values


def _integer(record: dict[str, tuple[str, str | None]], name: str, index: str, where: str) -> int:
    text = record.get(name, ("", None))[0]
    try:
        return int(text)
    except ValueError:
        raise PlateError(f"{index}: {where} has no integer <{name}> (found {text!r})") from None


def _length(record: dict[str, tuple[str, str | None]], name: str) -> float | None:
    text, unit = record.get(name, ("", None))
    try:
        value = float(text)
    except ValueError:
        return None
    return length_in_um(value, unit, "m")


def _from_index(folder: str, index_path: str, given: str, want_headers: bool) -> Plate:
    index = _parse_index(index_path)
    if not index.images:
        raise PlateError(f"{index_path} lists no images (no Images/Image element)")
    notes: list[str] = []
    wells: dict[str, dict[Place, str]] = {}
    positions: dict[tuple[str, int], tuple[float, float]] = {}
    z_positions: dict[tuple[str, int, int, int], dict[int, float]] = {}
    channels: dict[int, dict[str, tuple[str, str | None]]] = {}
    missing: list[str] = []
    duplicates: list[str] = []
    unrecorded = 0
    size_groups: dict[tuple[int, int], str] = {}
    for number, record in enumerate(index.images, start=1):
        url = record.get("URL", ("", None))[0]
        where = f"image {number} ({url or 'no URL'})"
        if not url:
            unrecorded += 1
            continue
        row = _integer(record, "Row", index_path, where)
        column = _integer(record, "Col", index_path, where)
        site = _integer(record, "FieldID", index_path, where)
        z = _integer(record, "PlaneID", index_path, where)
        channel = _integer(record, "ChannelID", index_path, where)
        timepoint = _integer(record, "TimepointID", index_path, where) + 1 if "TimepointID" in record else 1
        relative = url.replace("\\", "/")
        try:
            size = os.stat(os.path.join(folder, relative)).st_size
        except OSError:
            missing.append(relative)
            continue
        well = well_name(row, column)
        place = (site, channel, z, timepoint)
        files = wells.setdefault(well, {})
        if place in files:
            duplicates.append(f"well {well} field {site} channel {channel} plane {z} timepoint {timepoint}: "
                              f"{files[place]} and {relative}")
            continue
        files[place] = relative
        add_to_size_group(size_groups, channel, size, relative)
        described = channels.setdefault(channel, {})
        for name in _CHANNEL_FIELDS:
            if name in record and name not in described:
                described[name] = record[name]
        x_um, y_um, z_um = _length(record, "PositionX"), _length(record, "PositionY"), _length(record, "PositionZ")
        if x_um is not None and y_um is not None:
            positions.setdefault((well, site), (y_um, x_um))
        if z_um is not None:
            z_positions.setdefault((well, site, channel, timepoint), {})[z] = z_um
    if missing:
        raise PlateError(
            f"{index_path} names {len(missing)} image file(s) that do not exist in {folder}: {listing(sorted(missing), 5)}"
        )
    if duplicates:
        raise PlateError(f"{index_path} lists {len(duplicates)} image(s) twice: {listing(sorted(duplicates), 3)}")
    if unrecorded:
        notes.append(f"{os.path.basename(index_path)} lists {unrecorded} image(s) without a file (empty URL); skipped")
    if not wells:
        raise PlateError(f"{index_path} lists no image with a file")
    listed = {path for files in wells.values() for path in files.values()}
    unlisted = _unlisted_images(folder, listed)
    if unlisted:
        notes.append(f"{len(unlisted)} image file(s) in {folder} are not in {os.path.basename(index_path)}; "
                     f"ignored ({listing(unlisted, 3)})")

    for channel, described in index.channels.items():
        merged = channels.setdefault(channel, {})
        for name, value in described.items():
            merged.setdefault(name, value)
    names = tuple((c, channels[c]["ChannelName"][0]) for c in sorted(channels)
                  if channels[c].get("ChannelName", ("", None))[0])
    pixel_size = _pixel_size(channels, notes)
    plate_wells = build_wells(wells, positions)
    shape, dtype = (0, 0), ""
    if want_headers:
        shape, dtype, _ = read_headers(folder, size_groups, notes)
    rows, columns, note = geometry(plate_wells, index.rows, index.columns, index_path)
    if note:
        notes.append(note)
    return Plate(
        name=index.plate_name or _folder_name(given),
        root=folder,
        format="operaphenix",
        wells=plate_wells,
        shape=shape,
        dtype=dtype,
        channel_names=names,
        pixel_size_um=pixel_size,
        z_step_um=z_step(z_positions),
        plate_rows=rows,
        plate_columns=columns,
        notes=tuple(notes),
    )


def _pixel_size(channels: dict[int, dict[str, tuple[str, str | None]]], notes: list[str]) -> tuple[float, float] | None:
    sizes = {}
    for channel in sorted(channels):
        x = _length(channels[channel], "ImageResolutionX")
        y = _length(channels[channel], "ImageResolutionY")
        if x and y and x > 0 and y > 0:
            sizes[channel] = (y, x)
    if not sizes:
        return None
    first = sizes[min(sizes)]
    if len(set(sizes.values())) > 1:
        notes.append("channels differ in pixel size: " + "; ".join(
            f"channel {c}: {y:.4g} x {x:.4g} um" for c, (y, x) in sizes.items()) + f"; using {first}")
    return first


def _unlisted_images(folder: str, listed: set[str]) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if _IMAGE_NAME.match(e.name) and e.name not in listed)
    except OSError:
        return []


def _folder_name(given: str) -> str:
    name = os.path.basename(given.rstrip(os.sep))
    if name == "Images":
        name = os.path.basename(os.path.dirname(given.rstrip(os.sep)))
    return name or given


# -------------------------------------------------------------- file names
def _from_file_names(folder: str, given: str, want_headers: bool) -> Plate:
    message = (f"{folder}: no {' or '.join(INDEX_NAMES)}; indexing the Harmony file names instead, "
               "without channel names, pixel size or field positions")
    warnings.warn(message, PlateWarning, stacklevel=3)
    notes = [message]
    wells: dict[str, dict[Place, str]] = {}
    duplicates: list[str] = []
    size_groups: dict[tuple[int, int], str] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            match = _IMAGE_NAME.match(entry.name)
            if match is None:
                continue
            row, column, site, z, channel, timepoint = (int(g) for g in match.groups()[:6])
            well = well_name(row, column)
            place = (site, channel, z, timepoint)
            files = wells.setdefault(well, {})
            if place in files:
                duplicates.append(f"{min(files[place], entry.name)} and {max(files[place], entry.name)}")
                continue
            files[place] = entry.name
            if want_headers:
                add_to_size_group(size_groups, channel, entry.stat().st_size, entry.name)
    if duplicates:
        raise PlateError(f"{folder}: {len(duplicates)} image(s) have two files (they differ only in fk/fl): "
                         f"{listing(sorted(duplicates), 3)}")
    plate_wells = build_wells(wells, {})
    shape, dtype = (0, 0), ""
    if want_headers:
        shape, dtype, _ = read_headers(folder, size_groups, notes)
    rows, columns, _ = geometry(plate_wells, None, None, folder)
    return Plate(name=_folder_name(given), root=folder, format="operaphenix", wells=plate_wells,
                 shape=shape, dtype=dtype, plate_rows=rows, plate_columns=columns, notes=tuple(notes))
