"""TIFF headers: shape, dtype and calibration of a plate's images, from a few files."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from typing import NamedTuple

import tifffile

from hcs_dask.formats._common import listing
from hcs_dask.formats._errors import PlateError

__all__ = ["DamagedImage", "Header", "read_header", "read_headers", "add_to_size_group"]

#: Above this many distinct file sizes in one channel the files are compressed
#: (sizes carry no information on shape), and headers are sampled instead.
_MAX_SIZE_GROUPS = 32


def add_to_size_group(groups: dict[tuple[int, int], str], channel: int, size: int, path: str) -> None:
    """Keep in ``groups`` the smallest path of each ``(channel, size)``, so the file read never depends on listing order."""
    key = (channel, size)
    smallest = groups.get(key)
    if smallest is None or path < smallest:
        groups[key] = path


class DamagedImage(PlateError):
    """One file that cannot be read. Not the plate's fault: its well fails when it runs."""


class Header(NamedTuple):
    """What a TIFF header says about its image."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    pixel_size: tuple[float, float] | None
    z_position: float | None


def _representatives(size_groups: dict[tuple[int, int], str], notes: list[str]) -> list[str]:
    """One file per (channel, file size); a spread sample where sizes vary per file."""
    by_channel: dict[int, list[tuple[int, str]]] = {}
    for (channel, size), path in size_groups.items():
        by_channel.setdefault(channel, []).append((size, path))
    chosen: list[str] = []
    for channel in sorted(by_channel):
        groups = sorted(by_channel[channel])
        if len(groups) > _MAX_SIZE_GROUPS:
            # The smallest and largest files are the likeliest odd ones out
            # (truncated, another shape), so the sample always holds both.
            step = (len(groups) - 1) / (_MAX_SIZE_GROUPS - 1)
            picked = sorted({round(i * step) for i in range(_MAX_SIZE_GROUPS)})
            notes.append(
                f"channel {channel}: {len(groups)} distinct file sizes (compressed TIFFs?); "
                f"read the headers of {len(picked)} files of spread sizes, not of every size"
            )
            groups = [groups[i] for i in picked]
        chosen.extend(path for _, path in groups)
    return chosen


def read_header(root: str, path: str, size: int | None) -> Header:
    """One TIFF's header: shape, dtype, MetaSeries pixel size and z position; checks one 2-D plane."""
    full = os.path.join(root, path)
    try:
        with tifffile.TiffFile(full) as tif:
            page = tif.pages.first
            n_pages = len(tif.pages)
            shape = tuple(int(n) for n in page.shape)
            dtype = page.dtype
            description = page.description
            compressed = page.compression != 1
            end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts)), default=0)
    except Exception as error:  # tifffile raises many types for broken files
        raise DamagedImage(f"cannot read the TIFF header of {full}: {error}") from error
    if dtype is None:
        raise PlateError(f"{full} has a pixel type numpy cannot represent")
    if n_pages != 1:
        raise PlateError(f"{full} holds {n_pages} pages; the reader expects one plane per file")
    if len(shape) != 2:
        raise PlateError(f"{full} is not a 2-D grayscale image (shape {shape})")
    if size is not None and not compressed and end > size:
        raise DamagedImage(f"{full} is truncated: its pixels end at byte {end} but the file has {size}")
    props = _metaseries_props(description)
    return Header(path, shape, str(dtype), _pixel_size(props), _as_float(props.get("z-position")))


def _as_float(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def read_headers(
    root: str, size_groups: dict[tuple[int, int], str], notes: list[str]
) -> tuple[tuple[int, int], str, tuple[float, float] | None]:
    """Shape, dtype and pixel size shared by a plate's images, from a few headers.

    ``size_groups`` maps ``(channel, file size)`` to one relative path of that
    group: uncompressed images of one shape and dtype have one size, so one header
    per group checks them all. Damaged files are noted (their wells fail at run
    time); images that differ in shape or dtype are a :class:`PlateError` naming them.
    """
    sizes = {path: size for (_, size), path in size_groups.items()}
    headers = []
    for path in _representatives(size_groups, notes):
        try:
            headers.append(read_header(root, path, sizes.get(path)))
        except DamagedImage as damage:
            # One broken file must not stop the plate: its well fails with this path
            # when it runs, and every other well is processed.
            notes.append(f"damaged image, its well will fail: {damage}")
    if not headers:
        raise PlateError(f"plate {root}: no image header could be read; " + "; ".join(notes[-3:]))
    by_shape: dict[tuple[int, ...], list[str]] = {}
    by_dtype: dict[str, list[str]] = {}
    for header in headers:
        by_shape.setdefault(header.shape, []).append(header.path)
        by_dtype.setdefault(header.dtype, []).append(header.path)
    problems = []
    if len(by_shape) > 1:
        problems.append(
            "images differ in shape: "
            + "; ".join(f"{shape} e.g. {listing(paths, 3)}" for shape, paths in sorted(by_shape.items()))
        )
    if len(by_dtype) > 1:
        problems.append(
            "images differ in dtype: "
            + "; ".join(f"{dtype} e.g. {listing(paths, 3)}" for dtype, paths in sorted(by_dtype.items()))
        )
    if problems:
        raise PlateError(f"plate {root}: " + ". ".join(problems))
    first = headers[0]
    pixel_sizes = {h.pixel_size for h in headers}
    if len(pixel_sizes) > 1:
        notes.append(
            "pixel sizes differ between files: "
            + "; ".join(
                f"{size} um in {h.path}" for size, h in {h.pixel_size: h for h in headers}.items()
            )
            + f"; using {first.pixel_size}"
        )
    shape = (first.shape[0], first.shape[1])
    return shape, first.dtype, first.pixel_size


_LENGTH_UNITS_IN_UM = {"um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "microns": 1.0, "nm": 1e-3, "mm": 1e3}


def _metaseries_props(description: str) -> dict[str, str]:
    """The ``<prop id=… value=…>`` pairs of a MetaMorph/MetaSeries XML ImageDescription.

    ``TiffFile.metaseries_metadata`` parses the same XML into
    ``{"PlaneInfo": {"spatial-calibration-x": 0.65, ...}}``, but only when the
    Software tag is exactly ``MetaSeries``; MetaMorph-written files and re-saved
    exports carry the XML under other Software tags, so the XML is read here.
    """
    text = description.strip()
    if not text.startswith("<MetaData>"):
        return {}
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError:
        return {}
    return {p.get("id", ""): p.get("value", "") for p in root.iter("prop")}


def _pixel_size(props: dict[str, str]) -> tuple[float, float] | None:
    """``(y, x)`` pixel size in µm from the MetaSeries spatial calibration."""
    if props.get("spatial-calibration-state", "on").lower() in ("off", "false", "0"):
        return None
    units = props.get("spatial-calibration-units", "um").strip()
    factor = _LENGTH_UNITS_IN_UM.get(units)
    if factor is None:
        return None  # "pixel" or unknown units: no physical size
    try:
        x = float(props["spatial-calibration-x"]) * factor
        y = float(props.get("spatial-calibration-y", props["spatial-calibration-x"])) * factor
    except (KeyError, ValueError):
        return None
    if not (x > 0 and y > 0):
        return None
    return (y, x)
