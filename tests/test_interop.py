"""The output plate opens in the OME-Zarr tools of the field: ome-zarr-models, ome-zarr-py, ngio
(Fractal) and napari-ome-zarr, tables included."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from hcs_dask import load_pipeline, open_plate, run_plate


@pytest.fixture(scope="module")
def output(synthetic_source, tmp_path_factory, client) -> Path:
    """The nuclei-count plate, with its measurement and status tables."""
    path = tmp_path_factory.mktemp("interop") / "out.ome.zarr"
    result = run_plate(open_plate(synthetic_source), load_pipeline("nuclei_count"), path, client=client,
                       progress=False)
    assert result.ok, result.failures()
    return path


def test_validates_with_ome_zarr_models(output):
    import ome_zarr_models
    from ome_zarr_models.v05.hcs import HCS

    hcs = ome_zarr_models.open_ome_zarr(output)
    assert isinstance(hcs, HCS)
    assert len(hcs.attributes.ome.plate.wells) == 4


def test_ome_zarr_reader_sees_a_plate(output):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Plate, Reader

    nodes = list(Reader(parse_url(str(output)))())
    assert any(isinstance(spec, Plate) for spec in nodes[0].specs)
    assert nodes[0].data and nodes[0].data[0].shape[-1] > 0


def test_ngio_opens_the_plate_every_well_and_image_and_reads_the_tables(output, synthetic_source):
    import ngio
    import pandas as pd

    plate = ngio.open_ome_zarr_plate(output, mode="r")
    assert plate.rows == ["A"] and plate.columns == ["1", "2", "3", "4"]
    images = 0
    for path in plate.wells_paths():
        row, column = path.split("/")
        well = plate.get_well(row, column)
        assert well.paths() == ["0", "1"]
        for field in well.paths():
            image = plate.get_image(row, column, field).get_image()
            assert image.channel_labels == ["DAPI", "FITC"]
            pixels = image.get_as_numpy()
            stored = zarr.open_array(output / row / column / field / "0", mode="r")[:]
            np.testing.assert_array_equal(pixels, stored)
            assert image.pixel_size.x == pytest.approx(0.65)
            images += 1
    assert images == 8
    assert plate.list_tables() == ["measurements", "well_status"]
    status = plate.get_table("well_status").dataframe
    assert status.index.name == "well" and set(status["status"]) == {"ok"}
    measurements = plate.get_table("measurements").dataframe
    expected = pd.read_csv(output.parent / "out.measurements.csv")
    assert list(measurements["nuclei_count"]) == list(expected["nuclei_count"])
    assert list(measurements["well"]) == list(expected["well"])


def test_napari_ome_zarr_reads_a_field_without_a_viewer(output):
    with warnings.catch_warnings():
        # napari's own imports warn (pydantic deprecations); they are not ours to fix.
        warnings.simplefilter("ignore")
        from napari_ome_zarr import napari_get_reader

        reader = napari_get_reader(str(output / "A" / "1" / "0"))
        assert reader is not None
        layers = reader(str(output / "A" / "1" / "0"))
    data, metadata, kind = layers[0]
    assert kind == "image"
    assert data[0].shape == (2, 1, 128, 128)
    np.testing.assert_array_equal(np.asarray(data[0]), zarr.open_array(output / "A/1/0/0", mode="r")[:])
    assert metadata["channel_axis"] == 0 and [n.split(": ")[-1] for n in metadata["name"]] == ["DAPI", "FITC"]
    window = zarr.open_group(output / "A/1/0", mode="r").attrs["ome"]["omero"]["channels"][0]["window"]
    assert list(metadata["contrast_limits"][0]) == [window["start"], window["end"]]
