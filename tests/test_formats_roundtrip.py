"""Per reader: synth → open_plate → run_plate → the OME-Zarr output carries the plate's metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from hcs_dask import Pipeline, Step, open_plate, run_plate
from hcs_dask.formats import read_sources, write_synthetic_plate
from hcs_dask.formats._synthetic_layouts import PIXEL_SIZE_UM, Z_STEP_UM

VENDOR_FORMATS = ("imagexpress", "operaphenix", "cellvoyager")


def keep(image):
    """The identity: the output holds the input planes, so the output's metadata is the input's."""
    return image


def field_metadata(output: Path, well: str, field: int) -> dict:
    row, column = well[0], int(well[1:])
    return zarr.open_group(str(output / row / str(column) / str(field)), mode="r").attrs["ome"]


def check_output(output: Path, plate, *, z_planes: int) -> None:
    import ome_zarr_models

    assert type(ome_zarr_models.open_ome_zarr(output)).__name__ == "HCS"
    root = zarr.open_group(str(output), mode="r").attrs["ome"]["plate"]
    assert root["field_count"] == len(plate.sites)
    for well in plate.wells:
        images = zarr.open_group(str(output / well.row / str(well.column)), mode="r").attrs["ome"]["well"]["images"]
        assert len(images) == len(plate.sites)
    attrs = field_metadata(output, plate.wells[0].name, 0)
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["DAPI", "FITC"]
    multiscale = attrs["multiscales"][0]
    axes = [a["name"] for a in multiscale["axes"]]
    scale = dict(zip(axes, multiscale["datasets"][0]["coordinateTransformations"][0]["scale"]))
    assert scale["y"] == pytest.approx(PIXEL_SIZE_UM) and scale["x"] == pytest.approx(PIXEL_SIZE_UM)
    if z_planes > 1:
        assert scale["z"] == pytest.approx(Z_STEP_UM)


@pytest.mark.parametrize("plate_format", VENDOR_FORMATS)
def test_round_trip(tmp_path: Path, client, plate_format: str) -> None:
    folder = write_synthetic_plate(tmp_path / plate_format, wells=2, sites=2, channels=2, z=2, size=32, seed=1,
                                   format=plate_format)
    plate = open_plate(folder)
    assert plate.format == plate_format
    output = tmp_path / "out.ome.zarr"
    result = run_plate(plate, Pipeline([Step(keep)]), output, client, progress=False)
    assert result.counts() == {"ok": 2}, result.failures()
    check_output(output, plate, z_planes=2)
    # The written planes are the source planes.
    well = plate.wells[-1]
    written = zarr.open_array(str(output / well.row / str(well.column) / "1" / "0"), mode="r")[:]
    for key, source in well.files:
        if key.site == plate.sites[1]:
            (image,) = read_sources(plate.format, plate.root, [source])
            np.testing.assert_array_equal(written[key.channel - 1, key.z - 1], image)


def test_max_projection_of_every_vendor_layout_agrees(tmp_path: Path, client) -> None:
    # One seed, three layouts: the same pixels, so the same projections.
    pipeline = Pipeline([Step(np.max, stack="z", kwargs={"axis": 0})])
    projections = {}
    for plate_format in VENDOR_FORMATS:
        folder = write_synthetic_plate(tmp_path / plate_format, wells=1, sites=1, channels=2, z=3, size=32, seed=5,
                                       format=plate_format)
        output = tmp_path / f"{plate_format}.ome.zarr"
        assert run_plate(open_plate(folder), pipeline, output, client, progress=False).ok
        projections[plate_format] = zarr.open_array(str(output / "A" / "1" / "0" / "0"), mode="r")[:]
    np.testing.assert_array_equal(projections["imagexpress"], projections["operaphenix"])
    np.testing.assert_array_equal(projections["imagexpress"], projections["cellvoyager"])
