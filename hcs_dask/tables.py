"""A run's tables: beside the plate (CSV or Parquet), and inside it as Fractal/ngio tables.

Inside the store, each table is a group ``tables/<name>/`` with the attributes of ngio's
table specification (``type: "generic_table"``, ``table_version: "1"``, ``backend: "json"``,
``index_key``, ``index_type``), its columns in the attributes of the group
``tables/<name>/table`` (ngio's ``json`` backend), and the ``tables`` group lists them in
its ``tables`` attribute. Every file is a zarr group document, so zarr and the other
readers walk the store without meeting a file they do not know (ngio's CSV and Parquet
backends put a ``table.csv`` there). The client writes the tables once, after every well
has ended; no well task does.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from hcs_dask.results import PlateResult

__all__ = ["MEASUREMENTS_TABLE", "STATUS_TABLE", "TABLE_FORMATS", "status_columns", "status_table",
           "write_plate_table", "write_result_tables"]

#: ``table_format`` values: the format of the measurement table beside the store.
TABLE_FORMATS = ("csv", "parquet")
MEASUREMENTS_TABLE = "measurements"
STATUS_TABLE = "well_status"
#: ngio's table specification (``generic_table``, version 1) in its ``json`` backend.
_TABLE_META = {"type": "generic_table", "table_version": "1", "backend": "json"}


_STATUS_COLUMNS = ("well", "status", "attempts", "seconds", "started", "finished", "worker", "step", "error_type",
                   "error", "cause", "pipeline")
_STATUS_TEXT = ("well", "status", "worker", "step", "error_type", "error", "cause", "pipeline")
_STATUS_FLOAT = ("seconds", "started", "finished")


def status_table(result: PlateResult) -> pd.DataFrame:
    """One row per well: status, attempts, seconds, start and end (epoch s), worker, step, error, pipeline."""
    import pandas as pd  # with the first table, not with hcs_dask

    frame = pd.DataFrame(status_columns(result), columns=list(_STATUS_COLUMNS))
    # Explicit dtypes, so that an all-empty column reads back as text or numbers, not nulls of any type.
    for name in _STATUS_TEXT:
        frame[name] = frame[name].astype("string")
    for name in _STATUS_FLOAT:
        frame[name] = frame[name].astype("float64")
    return frame


def status_columns(result: PlateResult) -> dict[str, list]:
    """The well-status table as the JSON columns the store holds, built without pandas
    (:func:`status_table` is its DataFrame).

    A run whose pipeline measures nothing writes only this table, so it never imports pandas
    (0.6-0.8 s of the client's CPU, taken from the workers where cores are few). Values are text
    or None, floats or None, and the attempts.
    """
    columns: dict[str, list] = {name: [] for name in _STATUS_COLUMNS}
    for r in result.wells:
        for name in _STATUS_COLUMNS:
            value = getattr(r, name)
            if value is not None and name in _STATUS_TEXT:
                value = str(value)
            elif value is not None and name in _STATUS_FLOAT:
                value = None if math.isnan(float(value)) else float(value)
            columns[name].append(value)
    return columns


def _write_frame(frame: pd.DataFrame, path: Path, table_format: str) -> None:
    """Write ``frame`` without its index, through a temporary file and a rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if table_format == "parquet":
        frame.to_parquet(temporary, index=False)
    else:
        frame.to_csv(temporary, index=False)
    os.replace(temporary, path)


def _columns(frame: pd.DataFrame) -> dict[str, list]:
    """The frame as ``{column: values}`` of JSON values: missing values as null, numbers as numbers."""
    columns = {}
    for name in frame.columns:
        values = frame[name].astype(object).where(frame[name].notna(), None).tolist()
        columns[str(name)] = [v.item() if hasattr(v, "item") else v for v in values]
    return columns


def write_plate_table(output: str | Path, name: str, frame: pd.DataFrame, *, index_key: str | None = None,
                      index_type: str | None = None) -> Path:
    """Write ``frame`` as the table ``name`` of the plate store ``output`` and list it in ``tables``.

    ``index_key`` is the column ngio uses as the table's index (``index_type`` ``"str"``
    or ``"int"``). Returns the table's group folder.
    """
    return _write_columns(output, name, _columns(frame), index_key=index_key, index_type=index_type)


def _write_columns(output: str | Path, name: str, columns: dict[str, list], *, index_key: str | None = None,
                   index_type: str | None = None) -> Path:
    """:func:`write_plate_table` for a table given as ``{column: JSON values}``."""
    import zarr

    root = zarr.open_group(Path(output), mode="r+", zarr_format=3)
    tables = root.require_group("tables")
    group = tables.require_group(name)
    meta: dict[str, Any] = dict(_TABLE_META)
    if index_key is not None:
        meta |= {"index_key": index_key, "index_type": index_type or "str"}
    group.require_group("table").attrs.put(columns)
    group.attrs.put(meta)
    listed = list(tables.attrs.get("tables", []))
    if name not in listed:
        tables.attrs.put({**tables.attrs.asdict(), "tables": [*listed, name]})
    return Path(output) / "tables" / name


def write_result_tables(result: PlateResult, measurements_file: str | Path, *, table_format: str = "csv") -> None:
    """Write a finished run's tables: the measurements beside the store (``measurements_file``
    with the suffix of ``table_format``), and inside it the measurement and well-status tables.
    Sets ``result.measurements_path`` and ``result.tables``.
    """
    written = []
    # pandas only where a well measured something (result.measurements is a DataFrame).
    table = result.measurements if any(r.measurements for r in result.wells) else None
    if table is not None and len(table.columns) > 1:
        side_car = Path(measurements_file).with_suffix(f".{table_format}")
        _write_frame(table, side_car, table_format)
        result.measurements_path = str(side_car)
        inside = table.copy()
        inside.insert(0, "index", range(len(inside)))
        write_plate_table(result.output, MEASUREMENTS_TABLE, inside, index_key="index", index_type="int")
        written.append(MEASUREMENTS_TABLE)
    _write_columns(result.output, STATUS_TABLE, status_columns(result), index_key="well", index_type="str")
    written.append(STATUS_TABLE)
    result.tables = written
