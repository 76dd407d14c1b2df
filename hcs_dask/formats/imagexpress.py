"""Molecular Devices ImageXpress (MetaXpress export) plates.

The layout, as found in the field:

- image files ``<prefix>_<well>_s<site>_w<channel><GUID>.tif``. The prefix may be
  absent or hold underscores and dashes; ``_s<n>`` is absent on single-site plates
  and ``_w<n>`` on single-channel plates; sites may be zero-padded (``s001``); a
  GUID may be glued onto the last number; ``_z<n>``/``_t<n>`` may follow the well;
- ``_thumb`` previews beside the images (skipped);
- ``TimePoint_<n>/`` folders, which may hold ``ZStep_<n>/`` folders, or ``ZStep_<n>/``
  alone. Images beside ``ZStep_`` folders are projections, not planes: skipped
  for a channel that has planes, indexed at ``z`` = 1 for a channel that exists
  only as a projection (``Plate.projection_channels``);
- channels of different depth in one plate: a z-stack beside a channel taken in
  ``ZStep_1`` only; each keeps its own planes (``Plate.channel_z``);
- date/run folders above the plate (``2023-02-21/1334/``), which are descended;
- an optional ``.HTD`` plate description (CSV-like ``"Key", value, ...`` lines),
  which often declares more than was acquired or shipped.

Scanning is built for plates of a few hundred thousand files: one ``os.scandir``
per folder, one compiled regular expression per file name, and no ``Path`` object
or ``stat`` call per file unless headers are read.
"""

from __future__ import annotations

import csv
import gc
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field

from hcs_dask.formats._common import listing as _listing
from hcs_dask.formats._errors import PlateError
from hcs_dask.formats._tiff import read_header
from hcs_dask.formats._tiff import read_headers as _read_headers
from hcs_dask.plate import AXES, ImageKey, Plate, Well, plate_geometry, row_index, row_name, split_well_name

__all__ = ["is_imagexpress", "read_imagexpress", "example", "LOOKED_FOR", "EXAMPLE_NAME"]

#: How deep below the given folder the plate folder is searched (date/run folders).
_MAX_DEPTH = 3
#: What the detector looks for, in words, for "no plate found" messages.
LOOKED_FOR = (
    "ImageXpress images named <plate>_<well>_s<site>_w<channel>.tif, or TimePoint_<n>/ or "
    f"ZStep_<n>/ folders, in the folder and up to {_MAX_DEPTH} levels of subfolders"
)
#: One image name as MetaXpress writes it, for "no plate found" messages.
EXAMPLE_NAME = "Plate1_B05_s1_w1A1B2C3D4-1111-2222-3333-444455556666.tif"
#: Folders visited at most while searching, so that pointing at ``/`` fails fast.
_MAX_FOLDERS_SEARCHED = 2000

# A GUID glued onto the last number is either a full GUID (32 hex digits, dashes
# optional) or a hex run that starts with a letter. A fixed length is what makes
# "w1" + "3F2A…" separable from "w13" + "F2A…": the lazy ``\d+?`` below tries the
# shortest number first, so a full-length GUID wins over a longer channel number.
_HEX = "[0-9A-Fa-f]"
_GUID = rf"(?:{_HEX}{{8}}-?{_HEX}{{4}}-?{_HEX}{{4}}-?{_HEX}{{4}}-?{_HEX}{{12}}|[A-Fa-f][0-9A-Fa-f-]*)"
# The prefix is greedy so that the well is the *last* well-like part before the
# tokens ("Run_A1_B03_s1" is well B03). Tokens are lower case and wells upper
# case, so "_s1" can never be read as a well. Site and channel in their usual
# order have their own groups, so the common name needs no further parsing; any
# other token (``_z``, ``_t``, an unusual order) lands in ``tokens``.
_IMAGE_NAME = re.compile(
    r"^(?:(?P<prefix>.*)_)?"
    r"(?P<well>[A-Z]{1,2}\d{1,3})"
    r"(?:_s(?P<site>\d+?))?"
    r"(?:_w(?P<channel>\d+?))?"
    r"(?P<tokens>(?:_[swzt]\d+?)*)"
    r"(?P<thumb>_thumb)?"
    rf"(?:{_GUID})?"
    r"\.(?i:tiff?)$"
)
_FOLDER_NAME = re.compile(r"^(TimePoint|ZStep)_(\d+)$", re.IGNORECASE)
_TIFF_SUFFIXES = (".tif", ".tiff")


# --------------------------------------------------------------------------- API
def is_imagexpress(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (a folder, a folder above it, or an ``.HTD`` file) is an ImageXpress plate.

    Cheap: it stops at the first image name that fits the layout.
    """
    return example(path) is not None


def example(path: str | os.PathLike[str]) -> str | None:
    """The first file or folder at ``path`` that shows an ImageXpress plate (relative to it), or ``None``."""
    absolute = os.path.abspath(os.fspath(path))
    if os.path.isfile(absolute):
        return os.path.basename(absolute) if absolute.lower().endswith(".htd") else None
    if not os.path.isdir(absolute):
        return None
    found = _plate_folders(absolute)
    if not found:
        return None
    shown = _holds_plate(found[0])
    return os.path.relpath(os.path.join(found[0], shown or ""), absolute)


def read_imagexpress(path: str | os.PathLike[str], *, read_headers: bool = True) -> Plate:
    """Index an ImageXpress plate.

    Parameters
    ----------
    path
        The plate folder, a folder above it (a single chain of date/run folders is
        descended, up to three levels), or the plate's ``.HTD`` file.
    read_headers
        Read TIFF headers for shape, dtype and pixel size, and check that the
        images agree. Only one file per distinct (channel, file size) is opened:
        uncompressed images of one shape and dtype have one size, so a plate of
        100,000 identical images costs one header per channel, while a file of
        another shape or dtype, or a truncated one, has another size and is read
        too. Compressed files vary in size; for them a sample of sizes (smallest,
        largest and evenly spaced between) is read, and a note says so.
        Sizes need one ``stat`` per file, which is paid only here.
        With ``False``, shape is ``(0, 0)`` and dtype ``""``.

    Returns
    -------
    Plate
        ``format="imagexpress"``, ``root`` the folder holding the images, wells
        sorted by row then column, files sorted by key.

    Raises
    ------
    PlateError
        If the path does not exist or holds no plate, if two files claim one
        image, or (with ``read_headers``) if images differ in shape or dtype or a
        header cannot be read. The message names the files.
    """
    given = os.path.abspath(os.fspath(path))
    if not os.path.exists(given):
        raise PlateError(f"{given} does not exist")
    htd_given: str | None = None
    if os.path.isfile(given):
        if not given.lower().endswith(".htd"):
            raise PlateError(f"{given} is a file; pass the plate folder or its .HTD file")
        htd_given = given
        given = os.path.dirname(given)

    root = _find_plate_root(given)
    scan = _Scan(root, want_sizes=read_headers)
    # The scan allocates a few objects per file and keeps them all, which makes
    # the cyclic garbage collector re-traverse an ever larger heap: up to half the
    # time of a 276k-file plate. Nothing here forms cycles, so pause it.
    collecting = gc.isenabled()
    gc.disable()
    try:
        try:
            scan.walk(root, "", None, None)
            scan.add_projections()
        except OSError as error:
            raise PlateError(f"cannot list {error.filename or root}: {error.strerror or error}") from error
        if not scan.wells:
            raise PlateError(_no_images_message(root, scan))
        wells = _build_wells(scan)
    finally:
        if collecting:
            gc.enable()

    notes = scan.notes()
    htd = _load_htd(root, scan, htd_given, notes)
    name = _plate_name(scan, given)

    present = _present_values(scan.places)
    shape: tuple[int, int] = (0, 0)
    dtype = ""
    pixel_size: tuple[float, float] | None = None
    z_step: float | None = None
    if read_headers:
        shape, dtype, pixel_size = _read_headers(root, scan.size_groups, notes)
        z_step = _z_step(root, wells, present["z"])

    rows, columns, geometry_note = _geometry(wells, htd)
    if geometry_note:
        notes.append(geometry_note)
    declared_missing: tuple[str, ...] = ()
    if htd is not None:
        declared_missing = _declared_missing(htd, wells, present, scan)
        if htd.wells is not None:
            # Files in wells the HTD does not select suggest an HTD of another plate.
            selected = set(htd.wells)
            unselected = [well.name for well in wells if well.name not in selected]
            if unselected:
                notes.append(
                    f"{len(unselected)} well(s) have files but {os.path.basename(htd.path)} does not select them: "
                    + _listing(unselected)
                )
    channel_names: tuple[tuple[int, str], ...] = ()
    if htd is not None:
        channel_names = tuple(
            (channel, htd.wave_names[channel]) for channel in present["channel"] if channel in htd.wave_names
        )

    return Plate(
        name=name,
        root=root,
        format="imagexpress",
        wells=wells,
        shape=shape,
        dtype=dtype,
        channel_names=channel_names,
        pixel_size_um=pixel_size,
        z_step_um=z_step,
        plate_rows=rows,
        plate_columns=columns,
        declared_missing=declared_missing,
        notes=tuple(notes),
        projection_channels=tuple(sorted(scan.projection_channels)),
    )


# ------------------------------------------------------------ finding the plate
def _holds_plate(folder: str) -> str | None:
    """The first image, ``TimePoint_`` or ``ZStep_`` folder directly in ``folder``, or ``None``."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                match = _IMAGE_NAME.match(entry.name)
                if match is not None and match.group("thumb") is None:
                    return entry.name
                if _FOLDER_NAME.match(entry.name) and entry.is_dir():
                    return entry.name + "/"
    except OSError:
        return None
    return None


def _plate_folders(folder: str) -> list[str]:
    """Plate folders at or below ``folder`` (breadth first, ``_MAX_DEPTH`` levels).

    The search does not enter a plate folder, so a plate's own ``TimePoint_``
    folders are never counted as further plates.
    """
    if _holds_plate(folder):
        return [folder]
    found: list[str] = []
    level = [folder]
    visited = 0
    for _ in range(_MAX_DEPTH):
        below: list[str] = []
        for parent in level:
            try:
                with os.scandir(parent) as entries:
                    children = sorted(
                        entry.path for entry in entries if entry.is_dir() and not entry.name.startswith(".")
                    )
            except OSError:
                continue
            for child in children:
                visited += 1
                if visited > _MAX_FOLDERS_SEARCHED:
                    return found
                if _holds_plate(child):
                    found.append(child)
                else:
                    below.append(child)
        if found:
            # The shallowest plates win: a plate folder is not searched further.
            return found
        level = below
    return found


def _find_plate_root(folder: str) -> str:
    found = _plate_folders(folder)
    if not found:
        raise PlateError(f"no ImageXpress plate in {folder}: looked for {LOOKED_FOR}")
    if len(found) > 1:
        shown = _listing([os.path.relpath(f, folder) for f in found])
        raise PlateError(f"{folder} holds {len(found)} plates ({shown}); open one of them")
    return found[0]


# -------------------------------------------------------------------- scanning
#: ``(site, channel, z, timepoint)``: an image's place within its well.
_Place = tuple[int, int, int, int]


@dataclass
class _Scan:
    """What a walk over the plate folder found. Mutable while walking, then read."""

    root: str
    want_sizes: bool
    #: well -> {place: relative path}. A dict, so that two files claiming one
    #: image are caught on insertion rather than by a second pass.
    wells: dict[str, dict[_Place, str]] = field(default_factory=dict)
    #: Every distinct place: a few thousand, from which the axis values follow.
    places: set[_Place] = field(default_factory=set)
    duplicates: list[tuple[str, _Place, str, str]] = field(default_factory=list)
    prefixes: set[str | None] = field(default_factory=set)
    thumbs: Counter[int] = field(default_factory=Counter)
    projections: list[str] = field(default_factory=list)
    #: Images beside ZStep_ folders, held until the walk knows which channels have planes.
    pending_projections: list[tuple[str, int | None, list[tuple[re.Match[str], os.DirEntry[str]]]]] = field(
        default_factory=list)
    projection_channels: set[int] = field(default_factory=set)
    beside_timepoints: list[str] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)
    ignored_folders: list[str] = field(default_factory=list)
    htds: list[str] = field(default_factory=list)
    #: (channel, file size) -> smallest relative path of that group, with want_sizes.
    size_groups: dict[tuple[int, int], str] = field(default_factory=dict)
    _well_names: dict[str, str] = field(default_factory=dict)

    def walk(self, folder: str, rel: str, timepoint: int | None, z: int | None) -> None:
        """Index ``folder`` (``rel`` is its path below the root, ending in ``/``)."""
        images: list[tuple[re.Match[str], os.DirEntry[str]]] = []
        timepoint_dirs: list[tuple[int, str]] = []
        zstep_dirs: list[tuple[int, str]] = []
        match_image = _IMAGE_NAME.match
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                match = match_image(name)
                if match is not None:
                    images.append((match, entry))
                    continue
                folder_match = _FOLDER_NAME.match(name)
                if folder_match is not None and entry.is_dir():
                    kind = folder_match.group(1).lower()
                    target = timepoint_dirs if kind == "timepoint" else zstep_dirs
                    target.append((int(folder_match.group(2)), name))
                    continue
                lower = name.lower()
                if lower.endswith(_TIFF_SUFFIXES):
                    self.unrecognised.append(rel + name)
                elif lower.endswith(".htd"):
                    self.htds.append(rel + name)

        if timepoint_dirs and timepoint is None and z is None:
            self.beside_timepoints.extend(rel + e.name for m, e in images if m.group("thumb") is None)
            self.ignored_folders.extend(rel + name for _, name in zstep_dirs)
            for number, name in sorted(timepoint_dirs):
                self.walk(os.path.join(folder, name), f"{rel}{name}/", number, None)
        elif zstep_dirs and z is None:
            # Beside ZStep_ folders sit projections (e.g. a maximum projection), not a
            # plane; whether a channel's projection is its only image is known after the walk.
            kept = []
            for match, entry in images:
                if match.group("thumb") is None:
                    kept.append((match, entry))
                else:
                    self.thumbs[_channel_of(match)] += 1
            self.pending_projections.append((rel, timepoint, kept))
            self.ignored_folders.extend(rel + name for _, name in timepoint_dirs)
            for number, name in sorted(zstep_dirs):
                self.walk(os.path.join(folder, name), f"{rel}{name}/", timepoint, number)
        else:
            self.ignored_folders.extend(rel + name for _, name in timepoint_dirs + zstep_dirs)
            self._add(images, rel, timepoint, z)

    def _add(
        self,
        images: list[tuple[re.Match[str], os.DirEntry[str]]],
        rel: str,
        folder_timepoint: int | None,
        folder_z: int | None,
    ) -> None:
        # The hot loop of a 100k-file plate: plain tuples, cached well names,
        # string splits instead of further regular expressions.
        wells = self.wells
        well_names = self._well_names
        prefixes = self.prefixes
        places = self.places
        thumbs = self.thumbs
        want_sizes = self.want_sizes
        size_groups = self.size_groups
        default_z = 1 if folder_z is None else folder_z
        default_t = 1 if folder_timepoint is None else folder_timepoint
        for match, entry in images:
            # Positional groups(): several times cheaper than named lookups here.
            prefix, well, site_text, channel_text, tokens, thumb = match.groups()
            site = 1 if site_text is None else int(site_text)
            channel = 1 if channel_text is None else int(channel_text)
            z = default_z
            timepoint = default_t
            if tokens:
                for token in tokens[1:].split("_"):
                    kind = token[0]
                    value = int(token[1:])
                    if kind == "s":
                        site = value
                    elif kind == "w":
                        channel = value
                    # A folder number wins over a name number: the folder is what
                    # MetaXpress itself uses to tell planes and timepoints apart.
                    elif kind == "z":
                        if folder_z is None:
                            z = value
                    elif folder_timepoint is None:
                        timepoint = value
            if thumb is not None:
                thumbs[channel] += 1
                continue
            normalised = well_names.get(well)
            if normalised is None:
                row, column = split_well_name(well)
                normalised = well_names[well] = f"{row}{column:02d}"
            path = rel + match.string
            files = wells.get(normalised)
            if files is None:
                files = wells[normalised] = {}
            place = (site, channel, z, timepoint)
            if place in files:
                self.duplicates.append((normalised, place, files[place], path))
            files[place] = path
            places.add(place)
            prefixes.add(prefix)
            if want_sizes:
                # The smallest path, not the first seen: scandir order is arbitrary
                # and the file whose header is read must not depend on it.
                group_key = (channel, entry.stat().st_size)
                smallest = size_groups.get(group_key)
                if smallest is None or path < smallest:
                    size_groups[group_key] = path

    def add_projections(self) -> None:
        """Index, at ``z`` = 1, the projections of channels that have no planes; skip the others.

        A MetaXpress export may hold a channel only as the projection beside the
        ``ZStep_`` folders: that image is the channel's acquisition.
        """
        with_planes = {place[1] for place in self.places}
        for rel, timepoint, images in self.pending_projections:
            only = [(m, e) for m, e in images if _channel_of(m) not in with_planes]
            self.projections.extend(rel + e.name for m, e in images if _channel_of(m) in with_planes)
            self.projection_channels.update(_channel_of(m) for m, _ in only)
            self._add(only, rel, timepoint, 1)
        self.pending_projections.clear()

    def notes(self) -> list[str]:
        """Human-readable notes on what the walk skipped."""
        notes = []
        if self.thumbs:
            notes.append(f"skipped {sum(self.thumbs.values())} _thumb preview file(s)")
        if self.projections:
            notes.append(
                f"skipped {len(self.projections)} image(s) beside ZStep_ folders: they are projections of "
                f"channels that have planes ({_listing(sorted(self.projections), 3)})"
            )
        if self.projection_channels:
            notes.append(
                f"channel(s) {_listing([str(c) for c in sorted(self.projection_channels)])} exist only as the "
                "projection beside the ZStep_ folders: indexed as one plane (z 1)"
            )
        if self.beside_timepoints:
            notes.append(
                f"skipped {len(self.beside_timepoints)} image(s) beside TimePoint_ folders "
                f"({_listing(sorted(self.beside_timepoints), 3)})"
            )
        if self.unrecognised:
            notes.append(
                f"ignored {len(self.unrecognised)} TIFF file(s) not named like ImageXpress images "
                f"({_listing(sorted(self.unrecognised), 3)})"
            )
        if self.ignored_folders:
            notes.append(
                "ignored folder(s) out of the TimePoint_/ZStep_ nesting: "
                + _listing(sorted(self.ignored_folders), 3)
            )
        return notes


def _channel_of(match: re.Match[str]) -> int:
    """The channel number of a matched image name (1 where the name has no ``_w<n>``)."""
    channel_text, tokens = match.group("channel"), match.group("tokens")
    channel = 1 if channel_text is None else int(channel_text)
    for token in tokens[1:].split("_") if tokens else ():
        if token[0] == "w":
            channel = int(token[1:])
    return channel


def _no_images_message(root: str, scan: _Scan) -> str:
    found = []
    if scan.thumbs:
        found.append(f"{sum(scan.thumbs.values())} _thumb preview(s)")
    if scan.projections:
        found.append(f"{len(scan.projections)} projection(s) beside ZStep_ folders")
    if scan.unrecognised:
        found.append(f"{len(scan.unrecognised)} TIFF file(s) with other names")
    what = ", ".join(found) if found else "nothing"
    return f"no ImageXpress images in {root} (found {what}); looked for {LOOKED_FOR}"


def _build_wells(scan: _Scan) -> tuple[Well, ...]:
    if scan.duplicates:
        well, (site, channel, z, timepoint), first, second = min(scan.duplicates)
        raise PlateError(
            f"{len(scan.duplicates)} image(s) in {scan.root} have two files, e.g. well {well} site {site} "
            f"channel {channel} z {z} timepoint {timepoint}: {min(first, second)} and {max(first, second)}; "
            "the folder holds more than one plate or a second export"
        )

    def position(name: str) -> tuple[int, int]:
        row, column = split_well_name(name)
        return row_index(row), column

    wells = []
    for name in sorted(scan.wells, key=position):
        # Places are unique, so sorting compares plain int tuples only: an order
        # of magnitude faster than sorting ImageKey objects.
        files = tuple(
            (ImageKey(name, site, channel, z, timepoint), path)
            for (site, channel, z, timepoint), path in sorted(scan.wells[name].items())
        )
        wells.append(Well(name=name, files=files))
    return tuple(wells)


def _plate_name(scan: _Scan, given: str) -> str:
    # The HTD's UniquePlateIdentifier and Description are often empty or stale;
    # the prefix shared by every file is what MetaXpress calls the plate.
    if len(scan.prefixes) == 1:
        (prefix,) = scan.prefixes
        if prefix:
            return prefix
    # The given folder, not the root: the root is often a run folder ("1334").
    return os.path.basename(given.rstrip(os.sep)) or given


def _present_values(places: set[_Place]) -> dict[str, tuple[int, ...]]:
    return {axis: tuple(sorted({place[i] for place in places})) for i, axis in enumerate(AXES)}


# -------------------------------------------------------------------- headers
def _z_step(root: str, wells: tuple[Well, ...], zs: tuple[int, ...]) -> float | None:
    """Distance between the first two planes of one image stack, from their ``z-position``.

    Two more headers, read only when the plate has planes; ``None`` where the
    files carry no z-position or the two planes sit at one height.
    """
    if len(zs) < 2:
        return None
    files = wells[0].files
    lower = next(((key, path) for key, path in files if key.z == zs[0]), None)
    if lower is None:
        return None
    key = lower[0]
    upper = next((path for k, path in files if (k.site, k.channel, k.timepoint, k.z) ==
                  (key.site, key.channel, key.timepoint, zs[1])), None)
    if upper is None:
        return None
    first = read_header(root, lower[1], None).z_position
    second = read_header(root, upper, None).z_position
    if first is None or second is None or first == second:
        return None
    return abs(second - first) / (zs[1] - zs[0])


# ------------------------------------------------------------------------- HTD
@dataclass(frozen=True)
class _Htd:
    """What an ``.HTD`` plate description declares."""

    path: str
    rows: int | None
    columns: int | None
    wells: tuple[str, ...] | None
    sites: int
    wavelengths: int
    wave_names: dict[int, str]
    z_steps: int
    timepoints: int


def _parse_htd_lines(text: str) -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        if row and row[0].strip():
            entries[row[0].strip()] = [value.strip() for value in row[1:]]
    return entries


def _is_true(values: list[str] | None) -> bool | None:
    if not values:
        return None
    return values[0].upper() == "TRUE"


def _as_int(values: list[str] | None) -> int | None:
    if not values:
        return None
    try:
        return int(float(values[0]))
    except ValueError:
        return None


def _selection(entries: dict[str, list[str]], key: str) -> list[list[bool]]:
    """``<key>1``, ``<key>2``, … rows of TRUE/FALSE, in row order."""
    rows = []
    number = 1
    while f"{key}{number}" in entries:
        rows.append([value.upper() == "TRUE" for value in entries[f"{key}{number}"]])
        number += 1
    return rows


def _parse_htd(path: str) -> _Htd:
    """Read an ImageXpress ``.HTD`` file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            entries = _parse_htd_lines(handle.read())
    except OSError as error:
        raise PlateError(f"cannot read {path}: {error}") from error

    columns = _as_int(entries.get("XWells"))
    rows = _as_int(entries.get("YWells"))
    well_rows = _selection(entries, "WellsSelection")
    wells: tuple[str, ...] | None = None
    if well_rows:
        wells = tuple(
            f"{row_name(r)}{c + 1:02d}" for r, selected in enumerate(well_rows) for c, on in enumerate(selected) if on
        )

    sites = 1
    if _is_true(entries.get("Sites")):
        site_rows = _selection(entries, "SiteSelection")
        if site_rows:
            # Selected sites are numbered row-major over the TRUE cells of the mask.
            sites = sum(sum(row) for row in site_rows)
        else:
            sites = (_as_int(entries.get("XSites")) or 1) * (_as_int(entries.get("YSites")) or 1)

    wavelengths = _as_int(entries.get("NWavelengths")) or 1
    if _is_true(entries.get("Waves")) is False:
        wavelengths = 1
    wave_names = {}
    for number in range(1, wavelengths + 1):
        values = entries.get(f"WaveName{number}")
        if values and values[0]:
            wave_names[number] = values[0]

    z_steps = _as_int(entries.get("ZSteps")) or 1
    if _is_true(entries.get("ZSeries")) is False:
        z_steps = 1
    timepoints = _as_int(entries.get("TimePoints")) or 1
    return _Htd(path, rows, columns, wells, sites, wavelengths, wave_names, z_steps, timepoints)


def _load_htd(root: str, scan: _Scan, htd_given: str | None, notes: list[str]) -> _Htd | None:
    if htd_given is not None:
        return _parse_htd(htd_given)
    top = sorted(p for p in scan.htds if "/" not in p)
    # MetaXpress copies the HTD into TimePoint_/ZStep_ folders; one is enough.
    candidates = top or sorted(scan.htds)
    if not candidates:
        return None
    chosen = candidates[0]
    if len(top) > 1:
        prefixes = {p for p in scan.prefixes if p}
        named = [p for p in top if os.path.splitext(p)[0] in prefixes]
        chosen = named[0] if named else top[0]
        notes.append(f"found {len(top)} .HTD files ({_listing(top, 3)}); read {chosen}")
    return _parse_htd(os.path.join(root, chosen))


# ------------------------------------------------------------------ geometry
def _geometry(wells: tuple[Well, ...], htd: _Htd | None) -> tuple[int, int, str | None]:
    max_row = max(row_index(well.row) for well in wells)
    max_column = max(well.column for well in wells)
    inferred = plate_geometry(max_row, max_column)
    if htd is None or not htd.rows or not htd.columns:
        return inferred[0], inferred[1], None
    if max_row < htd.rows and max_column <= htd.columns:
        return htd.rows, htd.columns, None
    rows, columns = plate_geometry(max(max_row, htd.rows - 1), max(max_column, htd.columns))
    return rows, columns, (
        f"wells lie outside the {htd.rows}x{htd.columns} plate that {os.path.basename(htd.path)} "
        f"declares; using {rows}x{columns}"
    )


def _declared_missing(
    htd: _Htd, wells: tuple[Well, ...], present: dict[str, tuple[int, ...]], scan: _Scan
) -> tuple[str, ...]:
    source = os.path.basename(htd.path)
    lines = []
    if htd.wells is not None:
        have = {well.name for well in wells}
        missing = [w for w in htd.wells if w not in have]
        if missing:
            lines.append(f"{source} declares {len(missing)} well(s) with no file: {_listing(missing)}")

    def missing_numbers(axis: str, declared: int, label: str, describe: dict[int, str] | None = None) -> None:
        missing = [n for n in range(1, declared + 1) if n not in present[axis]]
        if not missing:
            return
        shown = [f"{n} ({describe[n]})" if describe and n in describe else str(n) for n in missing]
        line = f"{source} declares {declared} {label}(s); no file has {label} {_listing(shown)}"
        if axis == "channel":
            thumbs_only = [n for n in missing if scan.thumbs.get(n)]
            if thumbs_only:
                line += f" ({label} {_listing([str(n) for n in thumbs_only])} exist only as _thumb previews)"
        lines.append(line)

    missing_numbers("site", htd.sites, "site")
    missing_numbers("channel", htd.wavelengths, "wavelength", htd.wave_names)
    missing_numbers("z", htd.z_steps, "z step")
    missing_numbers("timepoint", htd.timepoints, "timepoint")
    return tuple(lines)
