"""Plate readers: turn a folder of vendor images into a :class:`~hcs_dask.plate.Plate`.

:func:`open_plate` tries each known layout in turn. A layout is a pair of a cheap
*detector* (does this folder look like that vendor's export?) and a *reader* that
builds the index. Adding Opera or Yokogawa means appending one entry to
``_LAYOUTS``; nothing else changes.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

from hcs_dask.formats._errors import PlateError
from hcs_dask.formats.imagexpress import LOOKED_FOR as _IMAGEXPRESS_LOOKED_FOR
from hcs_dask.formats.imagexpress import is_imagexpress, read_imagexpress
from hcs_dask.formats.synthetic import write_synthetic_plate
from hcs_dask.plate import Plate

__all__ = ["open_plate", "PlateError", "write_synthetic_plate"]


class _Layout(NamedTuple):
    name: str
    detect: Callable[[str | os.PathLike[str]], bool]
    read: Callable[..., Plate]
    #: What the detector looks for, to tell the user when nothing matched.
    looked_for: str


_LAYOUTS: tuple[_Layout, ...] = (
    _Layout("imagexpress", is_imagexpress, read_imagexpress, _IMAGEXPRESS_LOOKED_FOR),
)


def open_plate(path: str | os.PathLike[str], *, read_headers: bool = True) -> Plate:
    """Index the plate at ``path``, whatever the vendor layout.

    Parameters
    ----------
    path
        The plate folder (or a folder above it: date/run folders are descended),
        or the vendor's plate description file (an ImageXpress ``.HTD``).
    read_headers
        Read a few TIFF headers to learn the image shape, dtype and pixel size,
        and to check that all images agree. ``False`` indexes file names only
        (shape ``(0, 0)``, dtype ``""``), which is the fastest way to list a plate.

    Returns
    -------
    Plate
        The index of the images; no pixels are read.

    Raises
    ------
    PlateError
        If ``path`` does not exist, holds no plate of a known layout, or holds
        images that disagree (shape, dtype, unreadable files).

    Examples
    --------
    >>> plate = open_plate("/data/screen1/2023-02-21/1334")  # doctest: +SKIP
    >>> plate.describe()["wells"]  # doctest: +SKIP
    96
    """
    absolute = os.path.abspath(os.fspath(path))
    if not os.path.exists(absolute):
        raise PlateError(f"{absolute} does not exist")
    for layout in _LAYOUTS:
        if layout.detect(absolute):
            return layout.read(absolute, read_headers=read_headers)
    looked_for = "; ".join(f"{layout.name}: {layout.looked_for}" for layout in _LAYOUTS)
    raise PlateError(f"no plate found in {absolute}; looked for {looked_for}")
