"""OME-Zarr HCS plates as input: NGFF 0.5 on zarr v3, NGFF 0.4 on zarr v2.

The layout is ``plate.ome.zarr/<row>/<column>/<field>/<level>``. The plate group's
attributes (under ``ome`` in 0.5, at the top in 0.4) hold ``plate`` (``rows``,
``columns``, ``wells[{path, rowIndex, columnIndex}]``, optional ``field_count`` and
``name``); each well group holds ``well.images[{path}]``; each field is a
multiscale image (``multiscales[0]``: ``axes`` with units, ``datasets`` with
``coordinateTransformations``) with ``omero`` channel labels.

Only metadata is read here: the level-0 array of each field gives the shape and
dtype, and every plane becomes one source ``"<array path>:<indices>"`` that
:func:`hcs_dask.formats.read_sources` reads lazily, one plane at a time.
Sites, channels, planes and timepoints are numbered from 1 (index + 1), as the
vendor formats number them.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from hcs_dask.formats._common import Place, build_wells, geometry, length_in_um, listing
from hcs_dask.formats._errors import PlateError
from hcs_dask.formats._sources import zarr_source
from hcs_dask.plate import Plate

__all__ = ["is_omezarr", "read_omezarr", "example", "LOOKED_FOR", "EXAMPLE_NAME"]

#: What an OME-Zarr plate looks like, for "no plate found" messages.
EXAMPLE_NAME = "plate.ome.zarr/zarr.json with attributes.ome.plate"
LOOKED_FOR = "OME-Zarr HCS plates: a folder with zarr.json (NGFF 0.5) or .zattrs/.zgroup (NGFF 0.4)"
_METADATA_FILES = ("zarr.json", ".zattrs", ".zgroup")
#: Axes a field may have besides y and x, as ImageKey axes.
_LEADING_AXES = {"c": "channel", "z": "z", "t": "timepoint"}


# --------------------------------------------------------------------------- API
def is_omezarr(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a zarr group (any zarr group: :func:`read_omezarr` says if it is no plate)."""
    return example(path) is not None


def example(path: str | os.PathLike[str]) -> str | None:
    """The zarr metadata file at ``path`` (``zarr.json``, ``.zattrs`` or ``.zgroup``), or ``None``."""
    absolute = os.path.abspath(os.fspath(path))
    if not os.path.isdir(absolute):
        return None
    return next((f for f in _METADATA_FILES if os.path.isfile(os.path.join(absolute, f))), None)


def read_omezarr(path: str | os.PathLike[str], *, read_headers: bool = True) -> Plate:
    """Index an OME-Zarr HCS plate; reads metadata only.

    Parameters
    ----------
    path
        The plate group (``….ome.zarr``).
    read_headers
        Accepted for symmetry with the other readers; the arrays' metadata is
        always read (it is what says which planes exist), their chunks never.

    Returns
    -------
    Plate
        ``format="omezarr"``: channel names from ``omero`` labels, pixel size and
        z step from the level-0 ``scale`` (in µm), field positions from its
        ``translation`` where it is not zero.

    Raises
    ------
    PlateError
        If the group is not an HCS plate (no ``plate`` attributes), a well or
        field named by the metadata is missing or malformed, a field has axes
        other than ``t``, ``c``, ``z``, ``y``, ``x``, or fields differ in
        image shape or dtype.
    """
    import zarr

    absolute = os.path.abspath(os.fspath(path))
    if not os.path.exists(absolute):
        raise PlateError(f"{absolute} does not exist")
    try:
        root = zarr.open_group(absolute, mode="r")
    except Exception as error:  # zarr raises several types for a group it cannot open
        raise PlateError(f"{absolute}: cannot open as a zarr group: {type(error).__name__}: {error}") from None
    attributes = _ome(root.attrs.asdict())
    if "plate" not in attributes:
        raise PlateError(f"{absolute} is not an OME-Zarr HCS plate: its attributes hold no 'plate' (rows, columns, "
                         f"wells); it is {_kind(attributes)}")
    plate_meta = attributes["plate"]
    notes: list[str] = []
    wells: dict[str, dict[Place, str]] = {}
    positions: dict[tuple[str, int], tuple[float, float]] = {}
    first: _Field | None = None
    shapes: dict[tuple[tuple[int, int], str], list[str]] = {}
    empty: list[str] = []
    for well_path, name in _plate_wells(absolute, plate_meta):
        well_meta = _ome(_group_attributes(root, well_path, absolute)).get("well")
        if not isinstance(well_meta, dict) or not isinstance(well_meta.get("images"), list):
            raise PlateError(f"{absolute}/{well_path}: the plate lists this well but its attributes hold no "
                             "'well' with 'images'")
        if not well_meta["images"]:
            empty.append(name)
            continue
        files = wells.setdefault(name, {})
        for site, image in enumerate(well_meta["images"], start=1):
            if not isinstance(image, dict) or "path" not in image:
                raise PlateError(f"{absolute}/{well_path}: image {site} of 'well.images' has no 'path'")
            field_path = f"{well_path}/{image['path']}"
            described = _read_field(root, absolute, field_path)
            first = first or described
            shapes.setdefault((described.shape, described.dtype), []).append(field_path)
            for indices, place in described.planes(site):
                files[place] = zarr_source(described.array_path, indices)
            if described.position is not None:
                positions[(name, site)] = described.position
    if not wells or first is None:
        raise PlateError(f"{absolute}: no well of the plate lists an image")
    if len(shapes) > 1:
        raise PlateError(f"{absolute}: fields differ in image shape or dtype: " + "; ".join(
            f"{shape} {dtype} e.g. {listing(paths, 3)}" for (shape, dtype), paths in sorted(shapes.items())))
    acquisitions = plate_meta.get("acquisitions")
    if isinstance(acquisitions, list) and len(acquisitions) > 1:
        notes.append(f"the plate declares {len(acquisitions)} acquisitions; their fields are indexed as sites of "
                     "one acquisition, in each well's 'images' order")
    if empty:
        notes.append(f"{len(empty)} well(s) list no image (e.g. a run's failed wells); left out: {listing(empty)}")
    plate_wells = build_wells(wells, positions)
    declared: tuple[str, ...] = ()
    field_count = plate_meta.get("field_count")
    sites = {place[0] for files in wells.values() for place in files}
    if isinstance(field_count, int) and field_count > len(sites):
        declared = (f"the plate declares field_count {field_count}; wells have at most {len(sites)} field(s)",)
    rows, columns, _ = geometry(plate_wells, None, None, absolute)
    name = plate_meta.get("name") or os.path.basename(absolute.rstrip(os.sep)).removesuffix(".zarr").removesuffix(".ome")
    return Plate(
        name=str(name),
        root=absolute,
        format="omezarr",
        wells=plate_wells,
        shape=first.shape,
        dtype=first.dtype,
        channel_names=first.channel_names,
        pixel_size_um=first.pixel_size,
        z_step_um=first.z_step,
        plate_rows=rows,
        plate_columns=columns,
        declared_missing=declared,
        notes=tuple(notes),
    )


# ------------------------------------------------------------------ metadata
def _ome(attributes: dict[str, Any]) -> dict[str, Any]:
    """The OME attributes of a group: under ``ome`` (NGFF 0.5) or at the top (0.4)."""
    ome = attributes.get("ome")
    return ome if isinstance(ome, dict) else attributes


def _kind(attributes: dict[str, Any]) -> str:
    if "multiscales" in attributes:
        return "an image (it has 'multiscales')"
    if "well" in attributes:
        return "a well (it has 'well'): open the plate above it"
    return "a zarr group without NGFF metadata"


def _group_attributes(root: Any, path: str, absolute: str) -> dict[str, Any]:
    try:
        return dict(root[path].attrs.asdict())
    except KeyError:
        raise PlateError(f"{absolute}/{path}: named by the metadata above it but not in the store") from None


def _plate_wells(absolute: str, plate_meta: Any) -> list[tuple[str, str]]:
    """``(well path, well name)`` of every well the plate lists, e.g. ``("B/3", "B03")``."""
    if not isinstance(plate_meta, dict) or not isinstance(plate_meta.get("wells"), list):
        raise PlateError(f"{absolute}: 'plate' has no 'wells' list")
    listed = []
    for entry in plate_meta["wells"]:
        path = entry.get("path") if isinstance(entry, dict) else None
        parts = path.split("/") if isinstance(path, str) else []
        if len(parts) != 2 or not parts[0].isalpha() or not parts[0].isupper() or not parts[1].isdigit():
            raise PlateError(f"{absolute}: well path {path!r} is not '<row letters>/<column number>' (e.g. 'B/3')")
        listed.append((path, f"{parts[0]}{int(parts[1]):02d}"))
    return listed


class _Field:
    """One field image's level-0 array, as the index needs it."""

    def __init__(self, array_path: str, axes: list[str], shape: tuple[int, ...], dtype: str,
                 scale: dict[str, float], translation: dict[str, float], channel_names: tuple[tuple[int, str], ...]):
        self.array_path = array_path
        self.axes = axes
        self.leading = axes[:-2]
        self.leading_shape = shape[:-2]
        self.shape = (shape[-2], shape[-1])
        self.dtype = dtype
        self.channel_names = channel_names
        y, x = scale.get("y"), scale.get("x")
        self.pixel_size = (y, x) if y and x else None
        self.z_step = scale.get("z") if "z" in axes and shape[axes.index("z")] > 1 else None
        ty, tx = translation.get("y", 0.0), translation.get("x", 0.0)
        self.position = (ty, tx) if (ty or tx) else None

    def planes(self, site: int) -> list[tuple[tuple[int, ...], Place]]:
        """``(indices of the leading axes, (site, channel, z, timepoint))`` for every plane."""
        found = []
        for indices in itertools.product(*(range(n) for n in self.leading_shape)):
            numbers = {_LEADING_AXES[a]: i + 1 for a, i in zip(self.leading, indices)}
            found.append((indices, (site, numbers.get("channel", 1), numbers.get("z", 1), numbers.get("timepoint", 1))))
        return found


def _read_field(root: Any, absolute: str, field_path: str) -> _Field:
    attributes = _ome(_group_attributes(root, field_path, absolute))
    where = f"{absolute}/{field_path}"
    multiscales = attributes.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise PlateError(f"{where}: a field of the plate without 'multiscales'")
    multiscale = multiscales[0]
    axes_meta = multiscale.get("axes") or []
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in axes_meta]
    units = {a["name"]: a.get("unit") for a in axes_meta if isinstance(a, dict)}
    if len(axes) < 2 or axes[-2:] != ["y", "x"] or any(a not in _LEADING_AXES for a in axes[:-2]) \
            or len(set(axes)) != len(axes):
        raise PlateError(f"{where}: axes {axes} are not supported; hcs_dask reads fields with axes t, c, z, y, x "
                         "(any subset ending in y, x)")
    datasets = multiscale.get("datasets") or []
    if not datasets or not isinstance(datasets[0], dict) or "path" not in datasets[0]:
        raise PlateError(f"{where}: 'multiscales' lists no datasets")
    level_path = f"{field_path}/{datasets[0]['path']}"
    try:
        array = root[level_path]
    except KeyError:
        raise PlateError(f"{absolute}/{level_path}: named by 'multiscales' but not in the store") from None
    if not hasattr(array, "shape") or len(array.shape) != len(axes):
        raise PlateError(f"{absolute}/{level_path}: not an array of {len(axes)} dimensions ({axes})")
    scale, translation = _transformations(axes, multiscale.get("coordinateTransformations"),
                                          datasets[0].get("coordinateTransformations"))
    # NGFF allows any length unit; hcs_dask works in micrometres (no unit: micrometres).
    scale_um = {a: v for a, v in ((a, length_in_um(s, units.get(a), "micrometer")) for a, s in scale.items())
                if v is not None}
    translation_um = {a: v for a, v in ((a, length_in_um(s, units.get(a), "micrometer"))
                                        for a, s in translation.items()) if v is not None}
    omero = attributes.get("omero") if isinstance(attributes.get("omero"), dict) else {}
    labels = [c.get("label") for c in omero.get("channels", []) if isinstance(c, dict)]
    channel_count = array.shape[axes.index("c")] if "c" in axes else 1
    names = tuple((i + 1, str(label)) for i, label in enumerate(labels[:channel_count]) if label)
    return _Field(level_path, axes, tuple(int(n) for n in array.shape), str(array.dtype), scale_um, translation_um,
                  names)


def _transformations(axes: list[str], *levels: Any) -> tuple[dict[str, float], dict[str, float]]:
    """Scale and translation per axis, composed from the multiscale's and the dataset's transformations."""
    scale = dict.fromkeys(axes, 1.0)
    translation = dict.fromkeys(axes, 0.0)
    # The dataset's transformations apply first, then the multiscale's (NGFF).
    for transforms in reversed(levels):
        for transform in transforms or []:
            kind = transform.get("type") if isinstance(transform, dict) else None
            values = transform.get(kind) if kind else None
            if not isinstance(values, list) or len(values) != len(axes):
                continue
            for axis, value in zip(axes, values):
                if kind == "scale":
                    scale[axis] *= float(value)
                    translation[axis] *= float(value)
                elif kind == "translation":
                    translation[axis] += float(value)
    return scale, translation
