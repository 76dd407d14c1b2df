"""Reading a well's source images at run time, whatever format the plate came in.

A :class:`~hcs_dask.plate.Well` lists its images as ``(ImageKey, source)`` pairs.
For the TIFF formats a source is a path relative to the plate root; for an
OME-Zarr input it is ``"<array path>:<i0>,<i1>,…"``, the level-0 array of a field
and the indices of its leading (non-``y, x``) axes. :func:`read_sources` turns
sources into 2-D arrays one at a time; of an OME-Zarr field it holds at most one
chunk's planes at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import tifffile

__all__ = ["ImageReadError", "read_sources", "source_formats", "zarr_source"]


class ImageReadError(OSError):
    """A source image that cannot be read; the message starts with its path."""


def zarr_source(array_path: str, indices: Iterable[int]) -> str:
    """The source string of one plane of an OME-Zarr field: its array path, then the leading-axis indices.

    Examples
    --------
    >>> zarr_source("A/1/0/0", (1, 2))
    'A/1/0/0:1,2'
    """
    return f"{array_path}:{','.join(str(i) for i in indices)}"


def read_tiff(path: str) -> np.ndarray:
    """The image of a TIFF file: its one page, or (several pages) what ``tifffile.imread`` returns.

    A plate's TIFFs hold one plane each. For them this reads the first page straight away,
    skipping ``imread``'s series detection and its resolution of the path (a third or more of a
    128 px plane's read; ``bench/README.md``), from a file opened by Python.
    A file with no readable page (one cut short, say) raises ``ValueError``; ``imread`` returns
    an empty array for it.
    """
    with open(path, "rb") as handle, tifffile.TiffFile(handle) as tiff:
        pages = len(tiff.pages)
        if pages == 1:
            return tiff.pages.first.asarray()
        if pages == 0:
            raise ValueError("no readable TIFF page (is the file cut short?)")
        return tiff.asarray()


def _read_tiffs(root: str, sources: Iterable[str]) -> Iterator[np.ndarray]:
    for source in sources:
        path = os.path.join(root, source)
        try:
            image = read_tiff(path)
        except Exception as error:  # tifffile raises many types for a damaged file
            raise ImageReadError(f"{path}: cannot read image: {type(error).__name__}: {error}") from None
        yield image


def _read_zarr_planes(root: str, sources: Iterable[str]) -> Iterator[np.ndarray]:
    import zarr

    opened_path: str | None = None
    array = None
    slab_at: tuple[int, ...] | None = None
    slab = None
    for source in sources:
        array_path, _, index_text = source.rpartition(":")
        indices = tuple(int(i) for i in index_text.split(",")) if index_text else ()
        try:
            # A well's sources come field by field: each field's array is opened once.
            if array_path != opened_path:
                array = zarr.open_array(store=root, path=array_path, mode="r")
                opened_path, slab_at, slab = array_path, None, None
            assert array is not None
            chunks = array.chunks[: len(indices)]
            if all(c == 1 for c in chunks):
                image = np.asarray(array[indices])
            else:
                # A chunk holds several planes: decode it once for all of them, not once per plane.
                start = tuple(i // c * c for i, c in zip(indices, chunks))
                if start != slab_at:
                    slab = None  # freed before the next one is read
                    slab = np.asarray(array[tuple(slice(s, s + c) for s, c in zip(start, chunks))])
                    slab_at = start
                assert slab is not None
                # A copy, so that the plane does not keep the whole slab alive in the well's scope.
                image = slab[tuple(i - s for i, s in zip(indices, start))].copy()
        except Exception as error:  # zarr and its codecs raise many types for a damaged chunk
            raise ImageReadError(
                f"{root}/{array_path} at {indices}: cannot read image: {type(error).__name__}: {error}"
            ) from None
        if image.ndim != 2:
            raise ImageReadError(f"{root}/{array_path} at {indices}: expected a 2-D plane, got shape {image.shape}")
        yield image


_READERS: dict[str, Callable[[str, Iterable[str]], Iterator[np.ndarray]]] = {
    "imagexpress": _read_tiffs,
    "operaphenix": _read_tiffs,
    "cellvoyager": _read_tiffs,
    "omezarr": _read_zarr_planes,
}


def source_formats() -> tuple[str, ...]:
    """The plate formats :func:`read_sources` can read."""
    return tuple(_READERS)


def read_sources(plate_format: str, root: str, sources: Iterable[str]) -> Iterator[np.ndarray]:
    """Read the images at ``sources`` (a well's second tuple items) of a plate in ``plate_format``.

    Parameters
    ----------
    plate_format
        :attr:`Plate.format <hcs_dask.plate.Plate>` of the plate, e.g. ``"imagexpress"``.
    root
        :attr:`Plate.root <hcs_dask.plate.Plate>`.
    sources
        Sources as :attr:`Well.files <hcs_dask.plate.Well>` lists them.

    Yields
    ------
    numpy.ndarray
        One 2-D image per source, in order, read when the next one is asked for.

    Raises
    ------
    ValueError
        If ``plate_format`` is not a known format (raised at once, before any read).
    ImageReadError
        When a source cannot be read; the message starts with its path.

    Examples
    --------
    >>> plate = open_plate("/data/plate")  # doctest: +SKIP
    >>> well = plate.wells[0]  # doctest: +SKIP
    >>> images = list(read_sources(plate.format, plate.root, [s for _, s in well.files]))  # doctest: +SKIP
    """
    try:
        reader = _READERS[plate_format]
    except KeyError:
        raise ValueError(
            f"no source reader for plate format {plate_format!r}; known: {', '.join(_READERS)}"
        ) from None
    return reader(root, sources)
