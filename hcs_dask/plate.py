"""The plate index: which images exist, where, and what they are.

A :class:`Plate` is an index only. It never holds pixels, it is immutable and
picklable, and one :class:`Well` carries just its own file list, so that a well
task ships a few kilobytes to its worker however large the plate is.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Iterable, Iterator, NamedTuple

__all__ = ["AXES", "ImageKey", "Plate", "Well", "plate_geometry", "row_index", "row_name", "split_well_name"]

#: The axes of an image inside a well. ``well`` is the task axis and is not listed.
AXES: tuple[str, ...] = ("site", "channel", "z", "timepoint")

_WELL_NAME = re.compile(r"^([A-Z]{1,2})(\d{1,3})$")


def split_well_name(name: str) -> tuple[str, int]:
    """Split ``"B03"`` into ``("B", 3)`` and ``"AF48"`` into ``("AF", 48)``.

    Raises
    ------
    ValueError
        If ``name`` is not a row letter (or two) followed by a column number.
    """
    match = _WELL_NAME.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a well name like 'B03' or 'AF48'")
    return match.group(1), int(match.group(2))


def row_index(row: str) -> int:
    """Zero-based index of a plate row: ``A`` → 0, ``Z`` → 25, ``AA`` → 26."""
    if len(row) == 1:
        return ord(row) - ord("A")
    return 26 + (ord(row[0]) - ord("A")) * 26 + (ord(row[1]) - ord("A"))


def row_name(index: int) -> str:
    """Inverse of :func:`row_index`."""
    if index < 26:
        return chr(ord("A") + index)
    index -= 26
    return chr(ord("A") + index // 26) + chr(ord("A") + index % 26)


class ImageKey(NamedTuple):
    """Where one 2-D image sits in the plate. Values are the vendor's own numbers.

    A named tuple: a plate scan builds one per file (276k for a 1536-well plate), and a
    tuple is several times cheaper to build than a frozen dataclass.
    """

    well: str
    site: int
    channel: int
    z: int
    timepoint: int


@dataclass(frozen=True)
class Well:
    """One well's images: ``(ImageKey, source)`` pairs, sorted.

    A source is a path relative to the plate root for the TIFF formats, and a
    reference into the store (``"A/1/0/0:0,2"``: array path, then the indices of
    the leading axes) for OME-Zarr input; :func:`hcs_dask.formats.read_sources`
    reads either kind. ``positions`` holds ``(site, y_um, x_um)``, the stage
    position of each field as the vendor metadata records it, where it does.
    """

    name: str
    files: tuple[tuple[ImageKey, str], ...]
    positions: tuple[tuple[int, float, float], ...] = ()

    @property
    def row(self) -> str:
        return split_well_name(self.name)[0]

    @property
    def column(self) -> int:
        return split_well_name(self.name)[1]

    @cached_property
    def _by_key(self) -> dict[ImageKey, str]:
        return dict(self.files)

    def __repr__(self) -> str:
        return f"Well({self.name!r}, {len(self.files)} images)"

    def path_of(self, key: ImageKey) -> str:
        """Relative path of the image at ``key``; ``KeyError`` if the well lacks it."""
        return self._by_key[key]

    @property
    def keys(self) -> tuple[ImageKey, ...]:
        return tuple(key for key, _ in self.files)

    def values(self, axis: str) -> tuple[int, ...]:
        """Sorted distinct values of ``axis`` among this well's images."""
        return tuple(sorted({getattr(key, axis) for key, _ in self.files}))

    def position_of(self, site: int) -> tuple[float, float] | None:
        """``(y_um, x_um)`` stage position of field ``site``; ``None`` where unknown."""
        for number, y, x in self.positions:
            if number == site:
                return (y, x)
        return None

    def __getstate__(self) -> dict:
        # The lookup dict is derived: do not ship it to workers.
        return {"name": self.name, "files": self.files, "positions": self.positions}

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "name", state["name"])
        object.__setattr__(self, "files", state["files"])
        object.__setattr__(self, "positions", state.get("positions", ()))


@dataclass(frozen=True)
class Plate:
    """A plate of images, as an index.

    Parameters
    ----------
    name
        The plate's name (from the vendor metadata or the folder name).
    root
        Absolute path of the plate folder; :attr:`Well.files` are relative to it.
    format
        The reader that produced it, e.g. ``"imagexpress"``.
    wells
        The wells that have images, sorted by row then column.
    shape, dtype
        ``(y, x)`` and numpy dtype name shared by every image.
    channel_names
        ``((channel, name), ...)`` where the format provides names.
    pixel_size_um
        ``(y, x)`` pixel size in micrometres, where the format provides it.
    z_step_um
        Distance between z planes in micrometres, where known.
    plate_rows, plate_columns
        The plate geometry (8×12 for 96 wells), from the vendor metadata or inferred.
    declared_missing
        Human-readable notes on wells, sites or channels that the vendor metadata
        declares but for which no file exists.
    notes
        Human-readable notes on what the reader skipped or assumed.
    projection_channels
        Channels that exist only as a projection (one image per site and
        timepoint, indexed at ``z`` = 1), not as planes.

    Channels may differ in depth (a z-stack beside a single-plane channel): each
    channel's planes are :meth:`channel_z`, and :meth:`gaps` expects of every well
    each channel's own planes, not the plate's full z range.
    """

    name: str
    root: str
    format: str
    wells: tuple[Well, ...]
    shape: tuple[int, int]
    dtype: str
    channel_names: tuple[tuple[int, str], ...] = ()
    pixel_size_um: tuple[float, float] | None = None
    z_step_um: float | None = None
    plate_rows: int = 8
    plate_columns: int = 12
    declared_missing: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    projection_channels: tuple[int, ...] = ()

    # ----------------------------------------------------------------- lookups
    @cached_property
    def _wells_by_name(self) -> dict[str, Well]:
        return {well.name: well for well in self.wells}

    def well(self, name: str) -> Well:
        try:
            return self._wells_by_name[name]
        except KeyError:
            raise KeyError(f"plate {self.name!r} has no well {name!r}") from None

    def __iter__(self) -> Iterator[Well]:
        return iter(self.wells)

    def __len__(self) -> int:
        return len(self.wells)

    @cached_property
    def _places(self) -> frozenset[tuple[int, int, int, int]]:
        # Every distinct (site, channel, z, timepoint): a few thousand, from which all axis facts follow.
        return frozenset(key[1:] for well in self.wells for key, _ in well.files)

    @cached_property
    def _axis_values(self) -> dict[str, tuple[int, ...]]:
        places = self._places
        return {axis: tuple(sorted({place[i] for place in places})) for i, axis in enumerate(AXES)}

    def values(self, axis: str) -> tuple[int, ...]:
        """Sorted distinct values of an axis (``site``, ``channel``, ``z``, ``timepoint``)."""
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; axes are {', '.join(AXES)}")
        return self._axis_values[axis]

    @property
    def sites(self) -> tuple[int, ...]:
        return self.values("site")

    @property
    def channels(self) -> tuple[int, ...]:
        return self.values("channel")

    @property
    def zs(self) -> tuple[int, ...]:
        return self.values("z")

    @property
    def timepoints(self) -> tuple[int, ...]:
        return self.values("timepoint")

    @cached_property
    def _channel_z(self) -> dict[int, tuple[int, ...]]:
        planes: dict[int, set[int]] = {}
        for _, channel, z, _ in self._places:
            planes.setdefault(channel, set()).add(z)
        return {channel: tuple(sorted(zs)) for channel, zs in sorted(planes.items())}

    def channel_z(self, channel: int) -> tuple[int, ...]:
        """The z planes that ``channel`` has anywhere in the plate (its own depth)."""
        return self._channel_z.get(channel, ())

    @property
    def uniform_depth(self) -> bool:
        """Whether every channel has the same z planes."""
        return len(set(self._channel_z.values())) <= 1

    @property
    def n_images(self) -> int:
        return sum(len(well.files) for well in self.wells)

    def channel_name(self, channel: int) -> str:
        return dict(self.channel_names).get(channel, f"w{channel}")

    def row_names(self) -> list[str]:
        return [row_name(i) for i in range(self.plate_rows)]

    def select(self, wells: Iterable[str]) -> Plate:
        """A plate of only these wells (in the plate's order), e.g. to run a chosen subset.

        Its fingerprint is that of the subset, so a ``resume`` continues a run of the
        same selection.

        Raises
        ------
        KeyError
            Naming the wells this plate does not have.
        ValueError
            If no well is given.
        """
        chosen = set(wells)
        if not chosen:
            raise ValueError(f"plate {self.name!r}: select() needs at least one well")
        unknown = sorted(chosen - set(self._wells_by_name))
        if unknown:
            raise KeyError(f"plate {self.name!r} has no well(s) {', '.join(unknown)}; it has "
                           f"{len(self.wells)} wells ({self.wells[0].name} … {self.wells[-1].name})")
        return replace(self, wells=tuple(w for w in self.wells if w.name in chosen))

    # ----------------------------------------------------------------- display
    def __repr__(self) -> str:
        return (f"Plate({self.name!r}, {self.format}, {len(self.wells)} wells × {len(self.sites)} sites × "
                f"{len(self.channels)} channels × {len(self.zs)} z × {len(self.timepoints)} timepoints, "
                f"{self.shape[0]}×{self.shape[1]} {self.dtype or '?'}, root={self.root!r})")

    def _repr_html_(self) -> str:
        from hcs_dask._html import escape, plate_grid

        classes = {w.name: "imaged" if len(w.files) == self._images_per_well else "incomplete" for w in self.wells}
        depths = {} if self.uniform_depth else {c: f" ({len(self.channel_z(c))} z)" for c in self.channels}
        channels = ", ".join(f"{c}: {self.channel_name(c)}{depths.get(c, '')}" for c in self.channels)
        pixel = "unknown" if self.pixel_size_um is None else \
            f"{self.pixel_size_um[0]:g} × {self.pixel_size_um[1]:g} µm"
        if self.z_step_um is not None:
            pixel += f", z step {self.z_step_um:g} µm"
        missing = self.plate_rows * self.plate_columns - len(self.wells)
        incomplete = sum(1 for c in classes.values() if c == "incomplete")
        rows = [
            ("format", self.format),
            ("root", self.root),
            ("wells", f"{len(self.wells)} of {self.plate_rows * self.plate_columns} "
                      f"({self.plate_rows}×{self.plate_columns}); {missing} not imaged, {incomplete} incomplete"),
            ("dimensions", f"{len(self.sites)} sites × {len(self.channels)} channels × {len(self.zs)} z × "
                           f"{len(self.timepoints)} timepoints = {self.n_images} images"),
            ("image", f"{self.shape[0]} × {self.shape[1]} px, {self.dtype or 'unknown dtype'}"),
            ("channels", channels),
            ("pixel size", pixel),
        ]
        body = "".join(f'<tr><th style="text-align:left">{escape(k)}</th><td style="text-align:left">'
                       f"{escape(v)}</td></tr>" for k, v in rows)
        grid = plate_grid(self.plate_rows, self.plate_columns, classes,
                          {"imaged": "#5c6bc0", "incomplete": "#fdd835"},
                          labels={"imaged": "imaged", "incomplete": "incomplete (hcs-dask inspect lists the gaps)"})
        return f"<b>Plate {escape(self.name)}</b><table>{body}</table>{grid}"

    # ----------------------------------------------------------- consistency
    @cached_property
    def _images_per_well(self) -> int:
        """How many images a complete well has."""
        return len(self.sites) * len(self.timepoints) * sum(len(zs) for zs in self._channel_z.values())

    def gaps(self) -> list[str]:
        """Every image that a well lacks although its siblings have it.

        The expected set is the product of the plate's sites and timepoints with
        each channel's own planes (:meth:`channel_z`), so a single-plane channel
        beside a z-stack is an acquisition, not missing planes. Returns one
        sentence per well, naming what is missing; empty when the plate is complete.
        """
        depth = self._channel_z
        expected = self._images_per_well
        problems = []
        for well in self.wells:
            if len(well.files) == expected:
                continue
            present = {(k.site, k.channel, k.z, k.timepoint) for k, _ in well.files}
            missing = [
                (s, c, z, t)
                for s in self.sites
                for c in self.channels
                for z in depth[c]
                for t in self.timepoints
                if (s, c, z, t) not in present
            ]
            shown = ", ".join(f"site {s} channel {c} z {z} timepoint {t}" for s, c, z, t in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            problems.append(f"well {well.name} lacks {len(missing)} image(s): {shown}{more}")
        return problems

    def fingerprint(self) -> str:
        """A hash of the index (names, dimensions, shape, dtype), not of pixels.

        Repairing a corrupt file keeps the fingerprint; adding a well changes it.
        The hashed text is ``json.dumps(description, sort_keys=True)`` of
        ``{"dtype", "name", "shape", "wells": [[well, [[[site, channel, z, timepoint], path], …]], …]}``;
        the well list is spelled here directly (a 276,480-file plate in about a
        third of the time ``json.dumps`` takes over nested lists), to the same bytes.
        """
        string = json.encoder.encode_basestring_ascii
        wells = ", ".join(
            "[" + string(w.name) + ", [" + ", ".join(
                f"[[{k.site}, {k.channel}, {k.z}, {k.timepoint}], {string(p)}]" for k, p in w.files
            ) + "]]"
            for w in self.wells
        )
        head = json.dumps({"dtype": self.dtype, "name": self.name, "shape": list(self.shape)}, sort_keys=True)
        blob = (head[:-1] + ', "wells": [' + wells + "]}").encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> dict:
        """The plate's dimensions as plain data (for ``hcs-dask inspect`` and summaries)."""
        return {
            "name": self.name,
            "root": self.root,
            "format": self.format,
            "wells": len(self.wells),
            "sites": len(self.sites),
            "channels": [
                {"channel": c, "name": self.channel_name(c), "z": len(self.channel_z(c)),
                 "projection": c in self.projection_channels}
                for c in self.channels
            ],
            "z": len(self.zs),
            "uniform_depth": self.uniform_depth,
            "timepoints": len(self.timepoints),
            "images": self.n_images,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "pixel_size_um": list(self.pixel_size_um) if self.pixel_size_um else None,
            "z_step_um": self.z_step_um,
            "field_positions": sum(len(well.positions) for well in self.wells),
            "plate_geometry": [self.plate_rows, self.plate_columns],
            "gaps": self.gaps(),
            "declared_missing": list(self.declared_missing),
            "notes": list(self.notes),
        }


def plate_geometry(max_row: int, max_column: int) -> tuple[int, int]:
    """The smallest standard plate (6 … 1536 wells) holding a zero-based row and 1-based column."""
    for rows, columns in ((2, 3), (3, 4), (4, 6), (6, 8), (8, 12), (16, 24), (32, 48)):
        if max_row < rows and max_column <= columns:
            return rows, columns
    return max(max_row + 1, 32), max(max_column, 48)

