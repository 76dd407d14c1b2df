"""Opera Phenix / Operetta CLS (Harmony export) reader, on real files in ``tmp_path``."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hcs_dask.formats import PlateError, PlateWarning, open_plate, read_sources, write_synthetic_plate
from hcs_dask.formats._synthetic_layouts import field_position_um, PlateSpec
from hcs_dask.formats.operaphenix import is_operaphenix, read_operaphenix
from hcs_dask.plate import ImageKey


@pytest.fixture(scope="module")
def harmony(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("harmony") / "Measurement 1"
    return write_synthetic_plate(folder, wells=2, sites=3, channels=2, z=3, timepoints=2, size=32, seed=4,
                                 prefix="Screen7", format="operaphenix")


def test_synthetic_export_has_the_harmony_layout(harmony: Path) -> None:
    assert (harmony / "Images" / "Index.idx.xml").is_file()
    names = sorted(p.name for p in (harmony / "Images").glob("*.tiff"))
    assert len(names) == 2 * 3 * 2 * 3 * 2
    assert names[0] == "r01c01f01p01-ch1sk1fk1fl1.tiff"
    text = (harmony / "Images" / "Index.idx.xml").read_text()
    assert 'xmlns="http://www.perkinelmer.com/PEHH/HarmonyV6"' in text
    assert "<ImageResolutionX Unit=\"m\">6.500000E-07</ImageResolutionX>" in text


@pytest.mark.parametrize("where", ["measurement", "images", "index"])
def test_index_is_the_source_of_truth(harmony: Path, where: str) -> None:
    given = {"measurement": harmony, "images": harmony / "Images", "index": harmony / "Images" / "Index.idx.xml"}
    plate = open_plate(given[where])
    assert plate.format == "operaphenix"
    assert plate.name == "Screen7"
    assert plate.root == str(harmony / "Images")
    assert [w.name for w in plate] == ["A01", "A02"]
    assert plate.sites == (1, 2, 3) and plate.channels == (1, 2) and plate.zs == (1, 2, 3)
    assert plate.timepoints == (1, 2)  # TimepointID 0, 1 are the file names' sk1, sk2
    assert plate.channel_names == ((1, "DAPI"), (2, "FITC"))
    assert plate.pixel_size_um == pytest.approx((0.65, 0.65))
    assert plate.z_step_um == pytest.approx(2.0)
    assert plate.shape == (32, 32) and plate.dtype == "uint16"
    assert plate.gaps() == [] and plate.notes == ()
    key = ImageKey("A02", 3, 2, 1, 2)
    assert plate.well("A02").path_of(key) == "r01c02f03p01-ch2sk2fk1fl1.tiff"
    spec = PlateSpec(wells=("A01", "A02"), rows=8, columns=12, sites=3, channels=2, z=3, timepoints=2, size=32,
                     prefix="Screen7", seed=4)
    for well in plate:
        assert [site for site, _, _ in well.positions] == [1, 2, 3]
        for site, y, x in well.positions:
            assert (y, x) == pytest.approx(field_position_um(spec, site))
    assert pickle.loads(pickle.dumps(plate)) == plate


def test_images_read_back_through_read_sources(harmony: Path) -> None:
    plate = open_plate(harmony)
    well = plate.wells[0]
    images = list(read_sources(plate.format, plate.root, [path for _, path in well.files[:3]]))
    for image, (_, path) in zip(images, well.files[:3]):
        np.testing.assert_array_equal(image, tifffile.imread(Path(plate.root) / path))


def test_harmony_5_index_with_channels_in_each_image(tmp_path: Path) -> None:
    # Harmony 4.x writes the channel fields into every Image, in the HarmonyV5 namespace.
    images = tmp_path / "Images"
    images.mkdir()
    records = []
    for plane, z in ((1, "-1.5E-06"), (2, "1.5E-06")):
        name = f"r03c04f01p0{plane}-ch1sk1fk1fl1.tiff"
        tifffile.imwrite(images / name, np.zeros((8, 8), np.uint16), metadata=None)
        records.append(
            f"<Image Version=\"1\"><id>{name}</id><State>Ok</State><URL>{name}</URL><Row>3</Row><Col>4</Col>"
            f"<FieldID>1</FieldID><PlaneID>{plane}</PlaneID><TimepointID>0</TimepointID><ChannelID>1</ChannelID>"
            "<ChannelName>Alexa 488</ChannelName><ImageResolutionX Unit=\"m\">2.96688132474701E-07</ImageResolutionX>"
            "<ImageResolutionY Unit=\"m\">2.96688132474701E-07</ImageResolutionY>"
            "<PositionX Unit=\"m\">0.00135</PositionX><PositionY Unit=\"m\">-0.0007</PositionY>"
            f"<PositionZ Unit=\"m\">{z}</PositionZ></Image>"
        )
    # An image Harmony lists but never recorded: an empty URL.
    records.append("<Image Version=\"1\"><id>x</id><State>Ok</State><URL></URL><Row>3</Row><Col>4</Col>"
                   "<FieldID>2</FieldID><PlaneID>1</PlaneID><TimepointID>0</TimepointID><ChannelID>1</ChannelID></Image>")
    (images / "Index.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<EvaluationInputData xmlns:xsd="http://www.w3.org/2001/XMLSchema" Version="1" '
        'xmlns="http://www.perkinelmer.com/PEHH/HarmonyV5">'
        "<Plates><Plate><PlateID>P-1</PlateID><PlateRows>16</PlateRows><PlateColumns>24</PlateColumns>"
        "<Well id=\"0304\" /></Plate></Plates>"
        "<Wells><Well><id>0304</id><Row>3</Row><Col>4</Col><Image id=\"r03c04f01p01-ch1sk1fk1fl1\" /></Well></Wells>"
        f"<Images>{''.join(records)}</Images></EvaluationInputData>"
    )
    plate = read_operaphenix(tmp_path)
    assert plate.name == "P-1"
    assert [w.name for w in plate] == ["C04"]
    assert (plate.plate_rows, plate.plate_columns) == (16, 24)
    assert plate.channel_names == ((1, "Alexa 488"),)
    assert plate.pixel_size_um == pytest.approx((0.296688, 0.296688), rel=1e-5)
    assert plate.z_step_um == pytest.approx(3.0)
    assert plate.well("C04").positions == ((1, pytest.approx(-700.0), pytest.approx(1350.0)),)
    assert any("without a file" in note for note in plate.notes)


def test_without_an_index_the_file_names_are_read_with_a_warning(harmony: Path, tmp_path: Path) -> None:
    for path in sorted((harmony / "Images").glob("r01c02f0[12]p0*-ch1sk1*.tiff")):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    with pytest.warns(PlateWarning, match="no Index.idx.xml or Index.xml"):
        plate = open_plate(tmp_path)
    assert plate.format == "operaphenix"
    assert [w.name for w in plate] == ["A02"]
    assert plate.sites == (1, 2) and plate.zs == (1, 2, 3) and plate.channels == (1,)
    assert plate.channel_names == () and plate.pixel_size_um is None
    assert any("file names" in note for note in plate.notes)


def test_files_not_in_the_index_are_noted(harmony: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    (copy / "Images").mkdir(parents=True)
    for path in (harmony / "Images").iterdir():
        (copy / "Images" / path.name).write_bytes(path.read_bytes())
    tifffile.imwrite(copy / "Images" / "r08c12f01p01-ch1sk1fk1fl1.tiff", np.zeros((32, 32), np.uint16),
                     metadata=None)
    plate = open_plate(copy)
    assert "H12" not in [w.name for w in plate]
    assert any("r08c12f01p01-ch1sk1fk1fl1.tiff" in note and "not in Index.idx.xml" in note for note in plate.notes)


def test_detection(harmony: Path, tmp_path: Path) -> None:
    assert is_operaphenix(harmony) and is_operaphenix(harmony / "Images")
    assert is_operaphenix(harmony / "Images" / "Index.idx.xml")
    assert not is_operaphenix(tmp_path)
    with pytest.raises(PlateError, match="does not exist"):
        read_operaphenix(tmp_path / "nowhere")
