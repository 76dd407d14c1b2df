"""OME-Zarr HCS output (NGFF 0.5 on zarr v3).

The split follows the concurrency rule of NGFF plates: the client writes the plate, row and
well groups once (:func:`create_plate_layout`, in ``layout.py``), and each well task writes
only the field groups below its own well (:class:`FieldWriter`, in ``field.py``), then lists
them in its well group (:func:`commit_well`, in ``commit.py``) and records its outcome in the
run's manifest (:class:`Manifest`, in ``manifest.py``). No file is ever written by two tasks.

Every ``zarr.json`` is made by zarr itself, on an in-memory store, and then copied to disk as
bytes. Creating the same nodes through a ``LocalStore`` costs several milliseconds each in
zarr's async round-trips, which on a 1536-well plate or a 4-field well is most of the time
spent outside the pipeline (``bench/io.py``, ``bench/scaling.py``).
"""

from hcs_dask.store.commit import commit_well, reset_well
from hcs_dask.store.field import (CHUNK_KEY_ENCODING, CHUNK_YX, ONE_CHUNK_BYTES, WRITE_BATCH_BYTES, FieldLayout,
                                  FieldWriter, downsample, level_chunks, pyramid_levels, write_fields)
from hcs_dask.store.layout import (OutputError, PreparedLayout, check_output, create_plate_layout, measurements_path,
                                   prepare_plate_layout)
from hcs_dask.store.manifest import Manifest

__all__ = [
    "CHUNK_KEY_ENCODING",
    "CHUNK_YX",
    "ONE_CHUNK_BYTES",
    "WRITE_BATCH_BYTES",
    "FieldLayout",
    "FieldWriter",
    "Manifest",
    "OutputError",
    "PreparedLayout",
    "check_output",
    "commit_well",
    "create_plate_layout",
    "downsample",
    "level_chunks",
    "measurements_path",
    "prepare_plate_layout",
    "pyramid_levels",
    "reset_well",
    "write_fields",
]

