"""Plate readers: turn a folder of vendor images into a :class:`~hcs_dask.plate.Plate`.

:func:`open_plate` asks every known layout whether the folder looks like it. A
layout is a cheap *example* finder (the first file that shows the vendor's
layout, or ``None``) and a *reader* that builds the index. Exactly one layout
must claim a folder: none is an unknown layout, two are two plates mixed in one
folder; both are a :class:`PlateError` naming what was found.

At run time the worker reads a well's images with :func:`read_sources`, which
knows each format's sources (TIFF paths, or planes of an OME-Zarr input).
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

from hcs_dask.formats import cellvoyager, imagexpress, omezarr, operaphenix
from hcs_dask.formats._errors import PlateError, PlateWarning
from hcs_dask.formats._sources import ImageReadError, read_sources, source_formats
from hcs_dask.formats.synthetic import write_synthetic_plate
from hcs_dask.plate import Plate

__all__ = [
    "FORMATS",
    "ImageReadError",
    "PlateError",
    "PlateWarning",
    "open_plate",
    "read_sources",
    "source_formats",
    "write_synthetic_plate",
]

#: How many TIFF names of an unknown folder are listed when no layout claims it.
_SHOWN_UNKNOWN = 3


class _Layout(NamedTuple):
    name: str
    example: Callable[[str], str | None]
    read: Callable[..., Plate]
    #: What the layout looks for, and one file name it expects, for "no plate found".
    looked_for: str
    example_name: str


_LAYOUTS: tuple[_Layout, ...] = (
    _Layout("imagexpress", imagexpress.example, imagexpress.read_imagexpress, imagexpress.LOOKED_FOR,
            imagexpress.EXAMPLE_NAME),
    _Layout("operaphenix", operaphenix.example, operaphenix.read_operaphenix, operaphenix.LOOKED_FOR,
            operaphenix.EXAMPLE_NAME),
    _Layout("cellvoyager", cellvoyager.example, cellvoyager.read_cellvoyager, cellvoyager.LOOKED_FOR,
            cellvoyager.EXAMPLE_NAME),
    _Layout("omezarr", omezarr.example, omezarr.read_omezarr, omezarr.LOOKED_FOR, omezarr.EXAMPLE_NAME),
)
#: The formats :func:`open_plate` detects, as :attr:`Plate.format` names them.
FORMATS: tuple[str, ...] = tuple(layout.name for layout in _LAYOUTS)


def open_plate(path: str | os.PathLike[str], *, read_headers: bool = True) -> Plate:
    """Index the plate at ``path``, whatever the vendor layout.

    Parameters
    ----------
    path
        The plate folder (ImageXpress: or a folder above it, whose date/run
        folders are descended; Opera Phenix: the measurement or its ``Images/``
        folder), an OME-Zarr plate (``….ome.zarr``), or the vendor's plate
        description file (an ImageXpress ``.HTD``, a Harmony ``Index.idx.xml`` /
        ``Index.xml``, a CellVoyager ``MeasurementData.mlf``).
    read_headers
        Read a few TIFF headers to learn the image shape, dtype and pixel size,
        and to check that all images agree. ``False`` indexes file names only
        (shape ``(0, 0)``, dtype ``""``), which is the fastest way to list a plate.
        An OME-Zarr input always reads its arrays' metadata (never their chunks).

    Returns
    -------
    Plate
        The index of the images; no pixels are read. :attr:`Plate.format` is one
        of :data:`FORMATS`.

    Raises
    ------
    PlateError
        If ``path`` does not exist, holds no plate of a known layout (the message
        shows one expected name per format), holds files of two layouts, or its
        metadata or images are malformed or disagree. The message names the file.

    Warns
    -----
    PlateWarning
        When a format's metadata file is absent and file names are read instead.

    Examples
    --------
    >>> plate = open_plate("/data/screen1/2023-02-21/1334")  # doctest: +SKIP
    >>> plate.describe()["wells"]  # doctest: +SKIP
    96
    """
    absolute = os.path.abspath(os.fspath(path))
    if not os.path.exists(absolute):
        raise PlateError(f"{absolute} does not exist")
    # A zarr group is read as one whatever it holds: searching its thousands of
    # folders for TIFF names would be slow and find none.
    zarr_file = omezarr.example(absolute)
    claims = [(_LAYOUTS[-1], zarr_file)] if zarr_file else [
        (layout, shown) for layout in _LAYOUTS[:-1] if (shown := layout.example(absolute)) is not None
    ]
    if len(claims) == 1:
        layout, _ = claims[0]
        return layout.read(absolute, read_headers=read_headers)
    if claims:
        found = "; ".join(f"{layout.name} (e.g. {shown})" for layout, shown in claims)
        raise PlateError(f"{absolute} mixes {len(claims)} plate formats: {found}; "
                         "put each plate in a folder of its own and open that")
    raise PlateError(_nothing_found(absolute))


def _nothing_found(absolute: str) -> str:
    expected = "; ".join(f"{layout.name}: {layout.example_name}" for layout in _LAYOUTS)
    if os.path.isfile(absolute):
        return (f"{absolute} is a file of no known plate format; pass the plate folder or its metadata "
                f"file. Expected names, per format: {expected}")
    tiffs = _some_tiffs(absolute)
    found = (f"its TIFF files match no known naming (e.g. {', '.join(tiffs)})" if tiffs
             else "it holds no TIFF file or plate metadata")
    looked_for = "; ".join(f"{layout.name}: {layout.looked_for}" for layout in _LAYOUTS)
    return f"no plate found in {absolute}: {found}; looked for {looked_for}. Expected names, per format: {expected}"


def _some_tiffs(folder: str) -> list[str]:
    """A few TIFF names in ``folder`` and one level below, sorted, to show in an error."""
    names: list[str] = []
    try:
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.lower().endswith((".tif", ".tiff")):
                    names.append(entry.name)
                elif entry.is_dir() and len(names) < _SHOWN_UNKNOWN:
                    with os.scandir(entry.path) as inner:
                        names.extend(sorted(f"{entry.name}/{e.name}" for e in inner
                                            if e.name.lower().endswith((".tif", ".tiff")))[:_SHOWN_UNKNOWN])
                if len(names) >= _SHOWN_UNKNOWN:
                    break
    except OSError:
        return names
    return names[:_SHOWN_UNKNOWN]
