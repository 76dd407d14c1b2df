"""Yokogawa CellVoyager CV7000 / CV8000 plates.

The layout, one folder per measurement:

- image files ``<plate>_<well>_T<tttt>F<fff>L<ll>A<aa>Z<zz>C<cc>.tif`` (timepoint,
  field, timeline, action, plane, channel);
- ``MeasurementData.mlf``: XML in the ``http://www.yokogawa.co.jp/BTS/BTSSchema/1.0``
  namespace with one ``bts:MeasurementRecord`` per record. ``bts:Type="IMG"``
  records name an image (element text) and its ``bts:Row``, ``bts:Column``,
  ``bts:TimePoint``, ``bts:FieldIndex``, ``bts:ZIndex``, ``bts:Ch``, ``bts:ActionIndex``
  and stage ``bts:X``/``bts:Y``/``bts:Z`` in µm; other types (``ERR``: autofocus
  failures) name no image and are skipped;
- ``MeasurementDetail.mrf``: the plate (``bts:RowCount``, ``bts:ColumnCount``,
  ``bts:FieldCount``, ``bts:ZCount``, ``bts:TimePointCount``) and one
  ``bts:MeasurementChannel`` per channel (``bts:Ch``, ``bts:HorizontalPixelDimension``
  and ``bts:VerticalPixelDimension`` in µm, ``bts:HorizontalPixels``/``bts:VerticalPixels``);
  its ``bts:MeasurementSettingFileName`` names the ``.mes`` protocol, whose
  ``bts:ChannelList/bts:Channel[@bts:Ch]/@bts:Target`` is the channel's name.

Without ``MeasurementData.mlf`` the file names are read, with a
:class:`~hcs_dask.formats.PlateWarning`.
"""

from __future__ import annotations

import os
import re
import warnings
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

from hcs_dask.formats._common import Place, build_wells, geometry, listing, local_name, parse_xml, well_name, z_step
from hcs_dask.formats._errors import PlateError, PlateWarning
from hcs_dask.formats._tiff import add_to_size_group, read_headers
from hcs_dask.plate import Plate, split_well_name

__all__ = ["is_cellvoyager", "read_cellvoyager", "example", "LOOKED_FOR", "EXAMPLE_NAME", "NAMESPACE"]

NAMESPACE = "http://www.yokogawa.co.jp/BTS/BTSSchema/1.0"
MEASUREMENT_DATA = "MeasurementData.mlf"
MEASUREMENT_DETAIL = "MeasurementDetail.mrf"
#: One image name as the CellVoyager writes it, for "no plate found" messages.
EXAMPLE_NAME = "Plate1_B05_T0001F001L01A01Z01C01.tif"
LOOKED_FOR = f"CellVoyager exports: {MEASUREMENT_DATA}, or images named like {EXAMPLE_NAME}"
_IMAGE_NAME = re.compile(
    r"^(?P<prefix>.*)_(?P<well>[A-Z]{1,2}\d{1,3})_T(\d+)F(\d+)L(\d+)A(\d+)Z(\d+)C(\d+)\.tiff?$"
)
_BTS = f"{{{NAMESPACE}}}"


# --------------------------------------------------------------------------- API
def is_cellvoyager(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (a folder or its ``MeasurementData.mlf``) is a CellVoyager measurement."""
    return example(path) is not None


def example(path: str | os.PathLike[str]) -> str | None:
    """``MeasurementData.mlf`` or the first CellVoyager image name at ``path``, or ``None``."""
    absolute = os.path.abspath(os.fspath(path))
    if os.path.isfile(absolute):
        return MEASUREMENT_DATA if os.path.basename(absolute) == MEASUREMENT_DATA else None
    if not os.path.isdir(absolute):
        return None
    if os.path.isfile(os.path.join(absolute, MEASUREMENT_DATA)):
        return MEASUREMENT_DATA
    try:
        with os.scandir(absolute) as entries:
            return next((entry.name for entry in entries if _IMAGE_NAME.match(entry.name)), None)
    except OSError:
        return None


def read_cellvoyager(path: str | os.PathLike[str], *, read_headers: bool = True) -> Plate:
    """Index a CellVoyager CV7000/CV8000 measurement folder.

    Parameters
    ----------
    path
        The measurement folder, or its ``MeasurementData.mlf``.
    read_headers
        Read one TIFF header per (channel, file size) for shape and dtype and check
        that they agree; ``False`` leaves shape ``(0, 0)`` and dtype ``""``.

    Returns
    -------
    Plate
        ``format="cellvoyager"``: wells, fields, planes, channels and timepoints as
        the ``.mlf`` numbers them; channel names from the ``.mes`` (``A<aa>_C<cc>``
        where there is none), pixel size from the ``.mrf``, z step and field
        positions from the ``.mlf`` (``y`` = -``bts:Y``: the stage's y axis points
        up, the image's down).

    Raises
    ------
    PlateError
        If a metadata file is malformed XML or not in the BTS namespace, the
        ``.mlf`` names files that do not exist or lacks a required attribute, or
        two records claim one image.

    Warns
    -----
    PlateWarning
        When there is no ``MeasurementData.mlf`` and the file names are read instead.
    """
    given = os.path.abspath(os.fspath(path))
    if not os.path.exists(given):
        raise PlateError(f"{given} does not exist")
    folder = os.path.dirname(given) if os.path.isfile(given) else given
    mlf = os.path.join(folder, MEASUREMENT_DATA)
    if not os.path.isfile(mlf):
        return _from_file_names(folder, read_headers)
    return _from_measurement_data(folder, mlf, read_headers)


# ------------------------------------------------------------------- records
@dataclass
class _Detail:
    """What ``MeasurementDetail.mrf`` (and the ``.mes`` it names) declare."""

    path: str | None = None
    rows: int | None = None
    columns: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    pixel_sizes: dict[int, tuple[float, float]] = field(default_factory=dict)
    frame_sizes: dict[int, tuple[int, int]] = field(default_factory=dict)
    targets: dict[int, str] = field(default_factory=dict)


def _bts_root(path: str, element: str) -> ElementTree.Element:
    """The root of a BTS metadata file, which must be ``<bts:element>`` in the BTS namespace."""
    root = parse_xml(path)
    if root.tag != f"{_BTS}{element}":
        raise PlateError(
            f"{path}: expected a <bts:{element}> root element in the {NAMESPACE} namespace, found <{root.tag}>"
        )
    return root


def _int(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def _float(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def _parse_detail(folder: str, notes: list[str]) -> _Detail:
    path = os.path.join(folder, MEASUREMENT_DETAIL)
    if not os.path.isfile(path):
        notes.append(f"no {MEASUREMENT_DETAIL} in {folder}: pixel size and plate geometry unknown")
        return _Detail()
    root = _bts_root(path, "MeasurementDetail")
    detail = _Detail(path=path, rows=_int(root.get(f"{_BTS}RowCount")), columns=_int(root.get(f"{_BTS}ColumnCount")))
    for name in ("FieldCount", "ZCount", "TimePointCount"):
        value = _int(root.get(f"{_BTS}{name}"))
        if value:
            detail.counts[name] = value
    for channel in root.iter(f"{_BTS}MeasurementChannel"):
        number = _int(channel.get(f"{_BTS}Ch"))
        if number is None:
            raise PlateError(f"{path}: a <bts:MeasurementChannel> has no integer bts:Ch")
        x = _float(channel.get(f"{_BTS}HorizontalPixelDimension"))
        y = _float(channel.get(f"{_BTS}VerticalPixelDimension"))
        if x and y and x > 0 and y > 0:
            detail.pixel_sizes[number] = (y, x)
        width = _int(channel.get(f"{_BTS}HorizontalPixels"))
        height = _int(channel.get(f"{_BTS}VerticalPixels"))
        if width and height:
            detail.frame_sizes[number] = (height, width)
    setting = root.get(f"{_BTS}MeasurementSettingFileName")
    if setting:
        mes = os.path.join(folder, setting)
        if os.path.isfile(mes):
            for channel in _bts_root(mes, "MeasurementSetting").iter(f"{_BTS}Channel"):
                number = _int(channel.get(f"{_BTS}Ch"))
                target = (channel.get(f"{_BTS}Target") or "").strip()
                if number is not None and target:
                    detail.targets.setdefault(number, target)
        else:
            notes.append(f"{MEASUREMENT_DETAIL} names the protocol {setting}, which is not in {folder}: "
                         "channels are named A<action>_C<channel>")
    return detail


def _from_measurement_data(folder: str, mlf: str, want_headers: bool) -> Plate:
    notes: list[str] = []
    root = _bts_root(mlf, "MeasurementData")
    detail = _parse_detail(folder, notes)
    wells: dict[str, dict[Place, str]] = {}
    positions: dict[tuple[str, int], tuple[float, float]] = {}
    stacks: dict[tuple[str, int, int, int], dict[int, float]] = {}
    actions: dict[int, int] = {}
    skipped: dict[str, int] = {}
    missing: list[str] = []
    duplicates: list[str] = []
    prefixes: set[str] = set()
    size_groups: dict[tuple[int, int], str] = {}
    for number, record in enumerate(root, start=1):
        if local_name(record.tag) != "MeasurementRecord":
            continue
        kind = record.get(f"{_BTS}Type", "")
        if kind != "IMG":
            skipped[kind or "untyped"] = skipped.get(kind or "untyped", 0) + 1
            continue
        name = (record.text or "").strip()
        where = f"record {number} ({name or 'no file name'})"
        values = {}
        for attribute in ("Row", "Column", "TimePoint", "FieldIndex", "ZIndex", "Ch"):
            value = _int(record.get(f"{_BTS}{attribute}"))
            if value is None:
                raise PlateError(f"{mlf}: {where} has no integer bts:{attribute}")
            values[attribute] = value
        if not name:
            raise PlateError(f"{mlf}: {where} is an IMG record without a file name")
        try:
            size = os.stat(os.path.join(folder, name)).st_size
        except OSError:
            missing.append(name)
            continue
        well = well_name(values["Row"], values["Column"])
        site, channel, z, timepoint = values["FieldIndex"], values["Ch"], values["ZIndex"], values["TimePoint"]
        place = (site, channel, z, timepoint)
        files = wells.setdefault(well, {})
        if place in files:
            duplicates.append(f"well {well} field {site} channel {channel} z {z} timepoint {timepoint}: "
                              f"{files[place]} and {name}")
            continue
        files[place] = name
        add_to_size_group(size_groups, channel, size, name)
        matched = _IMAGE_NAME.match(name)
        if matched:
            prefixes.add(matched.group("prefix"))
        action = _int(record.get(f"{_BTS}ActionIndex"))
        actions.setdefault(channel, action if action is not None else 1)
        x, y, z_um = (_float(record.get(f"{_BTS}{a}")) for a in ("X", "Y", "Z"))
        if x is not None and y is not None:
            positions.setdefault((well, site), (-y, x))
        if z_um is not None:
            stacks.setdefault((well, site, channel, timepoint), {})[z] = z_um
    if missing:
        raise PlateError(f"{mlf} names {len(missing)} image file(s) that do not exist in {folder}: "
                         f"{listing(sorted(missing), 5)}")
    if duplicates:
        raise PlateError(f"{mlf} lists {len(duplicates)} image(s) twice (in two actions?): "
                         f"{listing(sorted(duplicates), 3)}")
    if not wells:
        raise PlateError(f"{mlf} holds no IMG record")
    if skipped:
        notes.append(f"skipped {sum(skipped.values())} record(s) of {MEASUREMENT_DATA} that name no image ("
                     + ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items())) + ")")

    plate_wells = build_wells(wells, positions)
    channels = sorted({place[1] for files in wells.values() for place in files})
    names = tuple((c, detail.targets.get(c) or f"A{actions.get(c, 1):02d}_C{c:02d}") for c in channels)
    shape, dtype = _shape(folder, size_groups, notes, want_headers)
    pixel_size = None
    sizes = {c: detail.pixel_sizes[c] for c in channels if c in detail.pixel_sizes}
    if sizes:
        pixel_size = sizes[channels[0]] if channels[0] in sizes else next(iter(sizes.values()))
        if len(set(sizes.values())) > 1:
            notes.append("channels differ in pixel size in " + MEASUREMENT_DETAIL + ": " + "; ".join(
                f"channel {c}: {s[0]:.4g} x {s[1]:.4g} um" for c, s in sizes.items()) + f"; using {pixel_size}")
    frames = {detail.frame_sizes[c] for c in channels if c in detail.frame_sizes}
    if shape != (0, 0) and frames and frames != {shape}:
        notes.append(f"{MEASUREMENT_DETAIL} declares frames of {sorted(frames)} pixels but the images are {shape}")
    rows, columns, note = geometry(plate_wells, detail.rows, detail.columns, detail.path or mlf)
    if note:
        notes.append(note)
    prefix = next(iter(prefixes)) if len(prefixes) == 1 else None
    return Plate(
        name=prefix or os.path.basename(folder.rstrip(os.sep)) or folder,
        root=folder,
        format="cellvoyager",
        wells=plate_wells,
        shape=shape,
        dtype=dtype,
        channel_names=names,
        pixel_size_um=pixel_size,
        z_step_um=z_step(stacks),
        plate_rows=rows,
        plate_columns=columns,
        declared_missing=_declared_missing(detail, wells),
        notes=tuple(notes),
    )


def _shape(folder: str, size_groups: dict[tuple[int, int], str], notes: list[str],
           want_headers: bool) -> tuple[tuple[int, int], str]:
    if not want_headers:
        return (0, 0), ""
    shape, dtype, _ = read_headers(folder, size_groups, notes)
    return shape, dtype


def _declared_missing(detail: _Detail, wells: dict[str, dict[Place, str]]) -> tuple[str, ...]:
    if detail.path is None:
        return ()
    present = {
        "FieldCount": {p[0] for files in wells.values() for p in files},
        "ZCount": {p[2] for files in wells.values() for p in files},
        "TimePointCount": {p[3] for files in wells.values() for p in files},
    }
    labels = {"FieldCount": "field", "ZCount": "z plane", "TimePointCount": "timepoint"}
    lines = []
    for key, declared in detail.counts.items():
        absent = [str(n) for n in range(1, declared + 1) if n not in present[key]]
        if absent:
            lines.append(f"{MEASUREMENT_DETAIL} declares {declared} {labels[key]}(s) (bts:{key}); no image has "
                         f"{labels[key]} {listing(absent)}")
    return tuple(lines)


# -------------------------------------------------------------- file names
def _from_file_names(folder: str, want_headers: bool) -> Plate:
    message = (f"{folder}: no {MEASUREMENT_DATA}; indexing the CellVoyager file names instead, "
               "without channel names, pixel size or field positions")
    warnings.warn(message, PlateWarning, stacklevel=3)
    notes = [message]
    wells: dict[str, dict[Place, str]] = {}
    duplicates: list[str] = []
    prefixes: set[str] = set()
    size_groups: dict[tuple[int, int], str] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            match = _IMAGE_NAME.match(entry.name)
            if match is None:
                continue
            timepoint, site, _, _, z, channel = (int(g) for g in match.groups()[2:])
            row, column = split_well_name(match.group("well"))
            well = f"{row}{column:02d}"
            place = (site, channel, z, timepoint)
            files = wells.setdefault(well, {})
            if place in files:
                duplicates.append(f"{min(files[place], entry.name)} and {max(files[place], entry.name)}")
                continue
            files[place] = entry.name
            prefixes.add(match.group("prefix"))
            if want_headers:
                add_to_size_group(size_groups, channel, entry.stat().st_size, entry.name)
    if duplicates:
        raise PlateError(f"{folder}: {len(duplicates)} image(s) have two files (they differ only in L/A): "
                         f"{listing(sorted(duplicates), 3)}")
    plate_wells = build_wells(wells, {})
    shape, dtype = _shape(folder, size_groups, notes, want_headers)
    rows, columns, _ = geometry(plate_wells, None, None, folder)
    prefix = next(iter(prefixes)) if len(prefixes) == 1 else None
    return Plate(name=prefix or os.path.basename(folder.rstrip(os.sep)) or folder, root=folder,
                 format="cellvoyager", wells=plate_wells, shape=shape, dtype=dtype,
                 plate_rows=rows, plate_columns=columns, notes=tuple(notes))
