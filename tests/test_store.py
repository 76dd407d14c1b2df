"""The OME-Zarr write path: metadata made in memory by zarr and ome-zarr, copied to disk as bytes.

The reference in each test is what zarr and ome-zarr write themselves through a
``LocalStore``; hcs_dask's files must mean exactly the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

import hcs_dask
from ome_zarr.format import FormatV05
from ome_zarr.writer import write_multiscales_metadata, write_plate_metadata, write_well_metadata

from hcs_dask.plate import ImageKey, Plate, Well
from hcs_dask.store import (
    FieldLayout,
    FieldWriter,
    commit_well,
    create_plate_layout,
    reset_well,
)

LAYOUT = FieldLayout(axes=("c", "z", "y", "x"), shape=(2, 3, 300, 200), dtype="uint16",
                     channel_names=("DAPI", "FITC"), pixel_size_um=(0.65, 0.65), z_step_um=2.0, levels=2)


def _documents(root: Path) -> dict[str, dict]:
    return {str(path.relative_to(root)): json.loads(path.read_bytes()) for path in sorted(root.rglob("zarr.json"))}


def _plate(wells: list[str]) -> Plate:
    made = tuple(Well(name, ((ImageKey(name, 1, 1, 1, 1), f"{name}.tif"), (ImageKey(name, 2, 1, 1, 1), f"{name}b.tif")))
                 for name in wells)
    return Plate(name="P1", root="/nowhere", format="imagexpress", wells=made, shape=(8, 8), dtype="uint16")


def test_a_field_means_what_zarr_and_ome_zarr_write_themselves(tmp_path):
    ours = tmp_path / "ours.zarr"
    writer = FieldWriter(ours, "B/3/1", LAYOUT)
    data = np.arange(2 * 3 * 300 * 200, dtype="uint16").reshape(2, 3, 300, 200)
    writer.write((slice(None), slice(None)), data)

    reference = tmp_path / "reference.zarr"
    group = zarr.open_group(zarr.storage.LocalStore(reference), path="B/3/1", mode="w", zarr_format=3)
    datasets = []
    # Level 0 (300 px > one chunk) is one shard of 256 px chunks, rounded up past the edge;
    # level 1 (150 × 100 px, 180 kB) is one chunk.
    for level, (y, x), chunks, shards in ((0, (300, 200), (1, 1, 256, 200), (2, 3, 512, 200)),
                                          (1, (150, 100), (2, 3, 150, 100), None)):
        group.create_array(str(level), shape=(2, 3, y, x), dtype="uint16", chunks=chunks, shards=shards,
                           dimension_names=LAYOUT.axes,
                           fill_value=0, chunk_key_encoding={"name": "default", "separator": "."})
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 2.0, 0.65 * 2**level, 0.65 * 2**level]}]})
    write_multiscales_metadata(group, datasets, fmt=FormatV05(), axes=list(LAYOUT.axes),
                               axes_units={"z": "micrometer", "y": "micrometer", "x": "micrometer"}, name="B/3/1",
                               metadata={"omero": {"channels": [
                                   {"label": "DAPI", "color": "0000FF", "active": True, "window": {
                                       "start": int(data[0].min()), "end": int(data[0].max()), "min": 0,
                                       "max": 65535}},
                                   {"label": "FITC", "color": "00FF00", "active": True, "window": {
                                       "start": int(data[1].min()), "end": int(data[1].max()), "min": 0,
                                       "max": 65535}}]}})

    assert _documents(ours / "B/3/1") == _documents(reference / "B/3/1")
    written = zarr.open_group(ours / "B/3/1", mode="r")
    np.testing.assert_array_equal(written["0"][:], data)
    assert written["1"].shape == (2, 3, 150, 100)
    # One file per level (a shard, a chunk): the field is its group, two level documents and two
    # files, in three folders (the key "c.0.0.0.0" makes none of its own).
    assert sorted(str(p.relative_to(ours / "B/3/1")) for p in (ours / "B/3/1").rglob("*")) == [
        "0", "0/c.0.0.0.0", "0/zarr.json", "1", "1/c.0.0.0.0", "1/zarr.json", "zarr.json"]


def test_fields_sharing_a_layout_keep_their_own_names(tmp_path):
    for path in ("A/1/0", "A/1/1", "C/12/0"):
        FieldWriter(tmp_path, path, LAYOUT).create()
    names = {path: zarr.open_group(tmp_path / path, mode="r").attrs["ome"]["multiscales"][0]["name"]
             for path in ("A/1/0", "A/1/1", "C/12/0")}
    assert names == {"A/1/0": "A/1/0", "A/1/1": "A/1/1", "C/12/0": "C/12/0"}


def test_plate_layout_means_what_ome_zarr_writes_and_validates(tmp_path):
    import ome_zarr_models

    plate = _plate(["A01", "A02", "C05"])
    ours = create_plate_layout(tmp_path / "ours.ome.zarr", plate)

    reference = zarr.open_group(zarr.storage.LocalStore(tmp_path / "reference.ome.zarr"), mode="w", zarr_format=3)
    write_plate_metadata(reference, rows=["A", "C"], columns=["1", "2", "5"], wells=["A/1", "A/2", "C/5"],
                         fmt=FormatV05(), field_count=2, name="P1")
    for well in ("A/1", "A/2", "C/5"):
        write_well_metadata(reference.require_group(well), [], fmt=FormatV05())

    assert _documents(ours) == _documents(tmp_path / "reference.ome.zarr")
    assert type(ome_zarr_models.open_ome_zarr(ours)).__name__ == "HCS"


def test_commit_lists_fields_and_reset_removes_them(tmp_path):
    output = create_plate_layout(tmp_path / "p.ome.zarr", _plate(["A01"]))
    for field in (0, 1):
        FieldWriter(output, f"A/1/{field}", LAYOUT).create()
    commit_well(output, "A", 1, [0, 1])
    assert zarr.open_group(output / "A/1", mode="r").attrs["ome"]["well"]["images"] == [{"path": "0"}, {"path": "1"}]
    assert not [name for name in os.listdir(output / "A/1") if name.endswith(".tmp")]

    reset_well(output, "A", 1)
    assert zarr.open_group(output / "A/1", mode="r").attrs["ome"]["well"]["images"] == []
    assert os.listdir(output / "A/1") == ["zarr.json"]


@pytest.mark.skipif(hcs_dask.cluster._USER_SET_MALLOC_TRIM,
                    reason="MALLOC_TRIM_THRESHOLD_ is exported here, and workers rightly keep the user's value")
def test_embedded_workers_keep_glibc_adaptive_malloc_even_after_a_plain_cluster(monkeypatch):
    # Dask's nanny exports MALLOC_TRIM_THRESHOLD_=65536, which makes every image array a
    # fresh mmap (bench/throughput.py measures the cost), and leaves it in this process's
    # environment, from where any later worker would inherit it.
    from distributed import Client, LocalCluster

    from hcs_dask.cluster import connect

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)  # restored after the test
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as plain, \
            Client(plain) as plain_client:
        assert set(plain_client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").values()) == {"65536"}
    assert os.environ.get("MALLOC_TRIM_THRESHOLD_") == "65536"
    with connect(n_workers=1, threads_per_worker=1) as client:
        values = client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_")
    assert values and set(values.values()) == {None}
