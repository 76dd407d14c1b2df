"""NGFF 0.5 metadata (``attributes["ome"]``) for the plate, well and field groups, built as ome-zarr-models models.

The models validate what they are given (axes, transforms, well paths, row and column names)
and dump the dicts that go into each group's ``zarr.json``. This module imports ome-zarr-models
(with pydantic and pydantic-zarr), so the store's writers import it where they build a document:
the client for the plate, a worker's fork server for wells and fields (``WORKER_MODULES``).
That import takes 0.3–0.5 s on a 2-core machine, where ``ome_zarr.writer`` took 1.0–1.4 s (ome-zarr
imports Dask's arrays and scikit-image first). ``tests/test_store.py`` holds every document equal
to what ome-zarr writes.
"""

from __future__ import annotations

from typing import Any, Sequence

from ome_zarr_models.common.coordinate_transformations import VectorScale
from ome_zarr_models.v05.well_types import WellImage, WellMeta
from ome_zarr_models.v05.axes import Axis
from ome_zarr_models.v05.hcs import HCSAttrs
from ome_zarr_models.v05.multiscales import Dataset, Multiscale
from ome_zarr_models.v05.plate import Column, Plate, Row, WellInPlate
from ome_zarr_models.v05.well import WellAttrs

__all__ = ["NGFF_VERSION", "image_attributes", "plate_attributes", "well_attributes"]

#: The OME-Zarr (NGFF) version this store writes.
NGFF_VERSION = "0.5"

#: The type NGFF gives each axis name this store writes.
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def _dump(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_none=True)


def image_attributes(axes: Sequence[str], scales: Sequence[Sequence[float]], *, units: dict[str, str],
                     name: str, omero: dict[str, Any]) -> dict[str, Any]:
    """An image group's ``ome`` attributes: one multiscale whose level ``i`` is the array ``"i"`` at ``scales[i]``.

    ``units`` gives the axes that have a unit (``{"y": "micrometer", …}``); ``omero`` is put
    beside the multiscales as it is.

    Examples
    --------
    >>> attrs = image_attributes(["c", "y", "x"], [[1.0, 0.5, 0.5]], units={"y": "micrometer", "x": "micrometer"},
    ...                          name="A/1/0", omero={"channels": []})
    >>> attrs["multiscales"][0]["axes"][1]
    {'name': 'y', 'type': 'space', 'unit': 'micrometer'}
    >>> attrs["multiscales"][0]["datasets"]
    [{'path': '0', 'coordinateTransformations': [{'type': 'scale', 'scale': [1.0, 0.5, 0.5]}]}]
    """
    multiscale = Multiscale(
        axes=[Axis(name=a, type=_AXIS_TYPES[a], unit=units.get(a)) for a in axes],
        datasets=[Dataset(path=str(level), coordinateTransformations=[VectorScale(type="scale", scale=list(scale))])
                  for level, scale in enumerate(scales)],
        name=name,
    )
    return {"omero": omero, "version": NGFF_VERSION, "multiscales": [_dump(multiscale)]}


def well_attributes(fields: Sequence[int]) -> dict[str, Any]:
    """A well group's ``ome`` attributes listing these fields' images.

    Examples
    --------
    >>> well_attributes([0, 2])
    {'version': '0.5', 'well': {'images': [{'path': '0'}, {'path': '2'}]}}
    """
    return _dump(WellAttrs(version=NGFF_VERSION, well=WellMeta(images=[WellImage(path=str(f)) for f in fields])))


def plate_attributes(rows: Sequence[str], columns: Sequence[str], wells: Sequence[tuple[str, str]], *,
                     name: str | None, field_count: int | None) -> dict[str, Any]:
    """A plate group's ``ome`` attributes: ``rows`` and ``columns`` in order, ``wells`` as (row, column) names.

    Raises
    ------
    pydantic.ValidationError
        A row or column name that is not alphanumeric, a well outside the rows or columns.

    Examples
    --------
    >>> plate = plate_attributes(["A", "C"], ["1", "5"], [("C", "5")], name="P1", field_count=4)["plate"]
    >>> plate["wells"], plate["field_count"]
    ([{'path': 'C/5', 'rowIndex': 1, 'columnIndex': 1}], 4)
    """
    row_index = {row: i for i, row in enumerate(rows)}
    column_index = {column: i for i, column in enumerate(columns)}
    plate = Plate(
        columns=[Column(name=c) for c in columns],
        rows=[Row(name=r) for r in rows],
        wells=[WellInPlate(path=f"{r}/{c}", rowIndex=row_index[r], columnIndex=column_index[c]) for r, c in wells],
        name=name,
        field_count=field_count,
        version=NGFF_VERSION,
    )
    return _dump(HCSAttrs(version=NGFF_VERSION, plate=plate))
