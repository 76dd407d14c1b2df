"""Yokogawa CellVoyager CV7000/CV8000 reader, on real files in ``tmp_path``."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hcs_dask.formats import PlateWarning, open_plate, read_sources, write_synthetic_plate
from hcs_dask.formats.cellvoyager import NAMESPACE, is_cellvoyager, read_cellvoyager

BTS = f'xmlns:bts="{NAMESPACE}"'


@pytest.fixture(scope="module")
def measurement(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cv") / "CV8000-run"
    return write_synthetic_plate(folder, wells=3, sites=2, channels=2, z=2, size=32, seed=9, prefix="ExpA",
                                 format="cellvoyager")


def copy_of(measurement: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(measurement, tmp_path / "copy"))


def test_synthetic_measurement_has_the_cellvoyager_layout(measurement: Path) -> None:
    for name in ("MeasurementData.mlf", "MeasurementDetail.mrf", "ExpA.mes"):
        text = (measurement / name).read_text()
        assert BTS in text, name
    mlf = (measurement / "MeasurementData.mlf").read_text()
    assert mlf.count('bts:Type="IMG"') == 3 * 2 * 2 * 2 and mlf.count('bts:Type="ERR"') == 1
    assert (measurement / "ExpA_A03_T0001F002L01A01Z02C02.tif").is_file()


def test_measurement_data_is_the_image_list(measurement: Path) -> None:
    plate = open_plate(measurement)
    assert plate.format == "cellvoyager"
    assert plate.name == "ExpA"
    assert [w.name for w in plate] == ["A01", "A02", "A03"]
    assert plate.sites == (1, 2) and plate.channels == (1, 2) and plate.zs == (1, 2) and plate.timepoints == (1,)
    assert plate.channel_names == ((1, "DAPI"), (2, "FITC"))  # the .mes protocol's bts:Target
    assert plate.pixel_size_um == pytest.approx((0.65, 0.65))
    assert plate.z_step_um == pytest.approx(2.0)
    assert plate.shape == (32, 32) and plate.dtype == "uint16"
    assert plate.gaps() == [] and plate.declared_missing == ()
    assert any("1 ERR" in note for note in plate.notes)
    # Stage X/Y in µm, y flipped into image orientation; wells 9 mm apart.
    a01, a02 = (dict((s, (y, x)) for s, y, x in plate.well(n).positions) for n in ("A01", "A02"))
    assert a02[1][1] - a01[1][1] == pytest.approx(9000.0)
    assert a01[2][1] - a01[1][1] == pytest.approx(32 * 0.65)
    assert pickle.loads(pickle.dumps(plate)) == plate
    well = plate.well("A02")
    first = next(read_sources(plate.format, plate.root, [well.files[0][1]]))
    np.testing.assert_array_equal(first, tifffile.imread(measurement / well.files[0][1]))


def test_mixed_actions_give_channels_of_their_own_depth(tmp_path: Path) -> None:
    # Action 1 takes channel 1 as a 3-plane stack, action 2 channel 2 as one plane.
    records = []
    for z in (1, 2, 3):
        records.append((1, 1, z, f"P_B02_T0001F001L01A01Z0{z}C01.tif"))
    records.append((2, 2, 1, "P_B02_T0001F001L01A02Z01C02.tif"))
    lines = []
    for action, channel, z, name in records:
        tifffile.imwrite(tmp_path / name, np.zeros((16, 16), np.uint16), metadata=None)
        lines.append(f'<bts:MeasurementRecord bts:Type="IMG" bts:Row="2" bts:Column="2" bts:TimePoint="1" '
                     f'bts:FieldIndex="1" bts:ZIndex="{z}" bts:ActionIndex="{action}" bts:X="10" bts:Y="20" '
                     f'bts:Z="{z * 1.5}" bts:Ch="{channel}">{name}</bts:MeasurementRecord>')
    lines.append('<bts:MeasurementRecord bts:Type="ERR" bts:Column="2" bts:Row="2" />')
    (tmp_path / "MeasurementData.mlf").write_text(
        f'<?xml version="1.0" encoding="utf-8"?><bts:MeasurementData {BTS}>{"".join(lines)}</bts:MeasurementData>')
    (tmp_path / "MeasurementDetail.mrf").write_text(
        f'<?xml version="1.0" encoding="utf-8"?><bts:MeasurementDetail {BTS} bts:RowCount="16" '
        'bts:ColumnCount="24" bts:FieldCount="4" bts:ZCount="3" bts:TimePointCount="1" '
        'bts:MeasurementSettingFileName="gone.mes">'
        '<bts:MeasurementChannel bts:Ch="1" bts:HorizontalPixelDimension="0.325" bts:VerticalPixelDimension="0.325" '
        'bts:HorizontalPixels="16" bts:VerticalPixels="16" />'
        '<bts:MeasurementChannel bts:Ch="2" bts:HorizontalPixelDimension="0.325" bts:VerticalPixelDimension="0.325" '
        'bts:HorizontalPixels="16" bts:VerticalPixels="16" /></bts:MeasurementDetail>')
    plate = read_cellvoyager(tmp_path)
    assert (plate.plate_rows, plate.plate_columns) == (16, 24)
    assert plate.channel_z(1) == (1, 2, 3) and plate.channel_z(2) == (1,)
    assert plate.gaps() == [] and not plate.uniform_depth
    # No .mes: the channels are named by action and channel, as Fractal's converters name them.
    assert plate.channel_names == ((1, "A01_C01"), (2, "A02_C02"))
    assert plate.pixel_size_um == pytest.approx((0.325, 0.325))
    assert plate.z_step_um == pytest.approx(1.5)
    assert plate.well("B02").positions == ((1, -20.0, 10.0),)
    assert plate.declared_missing == ("MeasurementDetail.mrf declares 4 field(s) (bts:FieldCount); "
                                      "no image has field 2, 3, 4",)
    assert any("gone.mes" in note for note in plate.notes)


def test_without_measurement_data_the_file_names_are_read_with_a_warning(measurement: Path, tmp_path: Path) -> None:
    folder = copy_of(measurement, tmp_path)
    (folder / "MeasurementData.mlf").unlink()
    assert is_cellvoyager(folder)
    with pytest.warns(PlateWarning, match="no MeasurementData.mlf"):
        plate = open_plate(folder)
    assert [w.name for w in plate] == ["A01", "A02", "A03"] and plate.n_images == 24
    assert plate.name == "ExpA" and plate.pixel_size_um is None


def test_detection(measurement: Path, tmp_path: Path) -> None:
    assert is_cellvoyager(measurement) and is_cellvoyager(measurement / "MeasurementData.mlf")
    assert not is_cellvoyager(tmp_path) and not is_cellvoyager(measurement / "MeasurementDetail.mrf")
