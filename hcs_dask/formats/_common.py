"""Helpers shared by the plate readers: listings, XML files, well names, units."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree

from hcs_dask.formats._errors import PlateError
from hcs_dask.plate import ImageKey, Well, plate_geometry, row_index, row_name, split_well_name

__all__ = ["listing", "parse_xml", "local_name", "well_name", "geometry", "length_in_um", "build_wells", "z_step",
           "MAX_LISTED", "Place"]

#: ``(site, channel, z, timepoint)``: an image's place within its well.
Place = tuple[int, int, int, int]
#: Items listed in one note before "and N more".
MAX_LISTED = 10

#: Length units (as vendors and NGFF spell them) in micrometres.
_LENGTH_IN_UM = {
    "m": 1e6, "meter": 1e6, "metre": 1e6,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
}


def listing(items: list[str], limit: int = MAX_LISTED) -> str:
    """``"a, b, c and 7 more"``: at most ``limit`` items, then a count."""
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f" and {len(items) - limit} more"
    return shown


def parse_xml(path: str) -> ElementTree.Element:
    """The root element of the XML file at ``path``.

    Raises
    ------
    PlateError
        If the file cannot be read or is not well-formed XML; the message names
        the file, and the line and column where the parser stopped.
    """
    try:
        return ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        line, column = error.position
        raise PlateError(f"{path} is malformed XML (line {line}, column {column}): {error.msg}") from None
    except OSError as error:
        raise PlateError(f"cannot read {path}: {error.strerror or error}") from None


def local_name(tag: str) -> str:
    """``"{namespace}Image"`` → ``"Image"``."""
    return tag.rpartition("}")[2]


def well_name(row: int, column: int) -> str:
    """``(2, 5)`` (1-based row and column numbers) → ``"B05"``; rows past Z are ``AA``, ``AB``, …."""
    return f"{row_name(row - 1)}{column:02d}"


def geometry(wells: tuple[Well, ...], rows: int | None, columns: int | None, source: str) -> tuple[int, int, str | None]:
    """The plate's rows and columns: the declared ones if every well fits, else the smallest standard plate.

    Returns ``(rows, columns, note)``; the note says why the declared geometry was not used.
    """
    max_row = max(row_index(well.row) for well in wells)
    max_column = max(well.column for well in wells)
    if rows and columns:
        if max_row < rows and max_column <= columns:
            return rows, columns, None
        fitted = plate_geometry(max(max_row, rows - 1), max(max_column, columns))
        return fitted[0], fitted[1], (
            f"wells lie outside the {rows}x{columns} plate that {os.path.basename(source)} declares; "
            f"using {fitted[0]}x{fitted[1]}"
        )
    fitted = plate_geometry(max_row, max_column)
    return fitted[0], fitted[1], None


def length_in_um(value: float, unit: str | None, default_unit: str) -> float | None:
    """``value`` in ``unit`` (``default_unit`` when ``None`` or empty) as micrometres; ``None`` for unknown units."""
    factor = _LENGTH_IN_UM.get((unit or default_unit).strip())
    return None if factor is None else value * factor


def build_wells(wells: dict[str, dict[Place, str]],
                positions: dict[tuple[str, int], tuple[float, float]]) -> tuple[Well, ...]:
    """Wells sorted by row then column, files sorted by place, with the known field positions.

    ``wells`` maps a well name to ``{place: source}``; ``positions`` maps
    ``(well, site)`` to the field's ``(y_um, x_um)``.
    """
    def order(name: str) -> tuple[int, int]:
        row, column = split_well_name(name)
        return row_index(row), column

    built = []
    for name in sorted(wells, key=order):
        files = tuple((ImageKey(name, *place), path) for place, path in sorted(wells[name].items()))
        sites = sorted({place[0] for place in wells[name]})
        placed = tuple((s, *positions[(name, s)]) for s in sites if (name, s) in positions)
        built.append(Well(name=name, files=files, positions=placed))
    return tuple(built)


def z_step(stacks: dict[tuple[str, int, int, int], dict[int, float]]) -> float | None:
    """Plane spacing in µm of the first stack with two planes: z difference per plane-number step.

    ``stacks`` maps ``(well, site, channel, timepoint)`` to ``{plane number: z_um}``.
    ``None`` where no stack has two planes or they sit at one height.
    """
    for stack in stacks.values():
        if len(stack) >= 2:
            (p1, z1), (p2, z2) = sorted(stack.items())[:2]
            step = abs(z2 - z1) / (p2 - p1)
            return step if step > 0 else None
    return None
