"""Bad plate input: each case names the file and the problem, exits 2, and writes nothing."""

from __future__ import annotations

import gc
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner
from ome_zarr.format import FormatV05
from ome_zarr.writer import write_image

from hcs_dask.cli import main
from hcs_dask.formats import PlateError, open_plate, write_synthetic_plate


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small plate per vendor format, written once; tests copy the one they damage."""
    root = tmp_path_factory.mktemp("bad-input-sources")
    return {f: write_synthetic_plate(root / f, wells=1, sites=1, channels=1, z=2, size=32, format=f)
            for f in ("imagexpress", "operaphenix", "cellvoyager")}


def copy(sources: dict[str, Path], plate_format: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sources[plate_format], tmp_path / plate_format))


def assert_bad_input(plate: Path, tmp_path: Path, *words: str) -> None:
    """``inspect`` and ``run`` both exit 2 with ``words`` in the message; ``run`` writes no output;
    no file is left open (a reader's file that only the garbage collector would close)."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        inspected = CliRunner().invoke(main, ["inspect", str(plate)], catch_exceptions=False)
        output = tmp_path / "out.ome.zarr"
        ran = CliRunner().invoke(main, ["run", "max_projection", str(plate), "-o", str(output)],
                                 catch_exceptions=False)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
    assert inspected.exit_code == 2, inspected.output
    assert ran.exit_code == 2, ran.output
    for result in (inspected, ran):
        assert result.output.startswith("error: ")
        for word in words:
            assert word in result.output, result.output
    assert not output.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(("plate_format", "damaged"), [
    ("operaphenix", "Images/Index.idx.xml"),
    ("cellvoyager", "MeasurementData.mlf"),
    ("cellvoyager", "MeasurementDetail.mrf"),
])
def test_malformed_xml(sources: dict[str, Path], tmp_path: Path, plate_format: str, damaged: str) -> None:
    plate = copy(sources, plate_format, tmp_path)
    text = (plate / damaged).read_text()
    (plate / damaged).write_text(text[: len(text) // 2])  # cut off mid-document, as a broken copy leaves it
    assert_bad_input(plate, tmp_path, str(plate / damaged), "malformed XML (line")


@pytest.mark.parametrize(("plate_format", "document", "victim"), [
    ("operaphenix", "Images/Index.idx.xml", "Images/r01c01f01p02-ch1sk1fk1fl1.tiff"),
    ("cellvoyager", "MeasurementData.mlf", "Synthetic_A01_T0001F001L01A01Z02C01.tif"),
])
def test_xml_naming_files_that_do_not_exist(sources: dict[str, Path], tmp_path: Path, plate_format: str,
                                            document: str, victim: str) -> None:
    plate = copy(sources, plate_format, tmp_path)
    (plate / victim).unlink()
    assert_bad_input(plate, tmp_path, str(plate / document), "names 1 image file(s) that do not exist",
                     Path(victim).name)


@pytest.mark.parametrize(("plate_format", "document", "replacement", "expected"), [
    ("operaphenix", "Images/Index.idx.xml", '<?xml version="1.0"?><Settings/>',
     "is not a Harmony index: its root element is <Settings>"),
    ("cellvoyager", "MeasurementData.mlf", '<?xml version="1.0"?><MeasurementData/>',
     "expected a <bts:MeasurementData> root element in the http://www.yokogawa.co.jp/BTS/BTSSchema/1.0"),
])
def test_xml_of_another_kind(sources: dict[str, Path], tmp_path: Path, plate_format: str, document: str,
                             replacement: str, expected: str) -> None:
    plate = copy(sources, plate_format, tmp_path)
    (plate / document).write_text(replacement)
    assert_bad_input(plate, tmp_path, str(plate / document), expected)


def test_file_names_of_no_known_format(tmp_path: Path) -> None:
    plate = tmp_path / "scope-export"
    plate.mkdir()
    for index in range(3):
        tifffile.imwrite(plate / f"image_{index:03d}.tif", np.zeros((8, 8), np.uint16), metadata=None)
    assert_bad_input(plate, tmp_path, str(plate), "match no known naming", "image_000.tif",
                     # one expected name per format
                     "Plate1_B05_s1_w1", "r02c05f01p01-ch1sk1fk1fl1.tiff", "Plate1_B05_T0001F001L01A01Z01C01.tif",
                     "zarr.json")


def test_two_formats_mixed_in_one_folder(sources: dict[str, Path], tmp_path: Path) -> None:
    plate = copy(sources, "cellvoyager", tmp_path)
    ixm = sources["imagexpress"]
    for path in ixm.glob("ZStep_1/*.tif"):
        shutil.copy(path, plate / path.name)
    assert_bad_input(plate, tmp_path, str(plate), "mixes 2 plate formats", "imagexpress (e.g. Synthetic_A01_s1_w1",
                     "cellvoyager (e.g. MeasurementData.mlf)")


@pytest.mark.parametrize("what", ["image", "well", "plain group"])
def test_ome_zarr_that_is_not_an_hcs_plate(tmp_path: Path, what: str) -> None:
    path = tmp_path / "input.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    if what == "image":
        write_image(np.zeros((2, 16, 16), np.uint16), group, axes="cyx", fmt=FormatV05(), scale_factors=(2,),
                    scale={"c": 1.0, "y": 1.0, "x": 1.0})
    elif what == "well":
        group.attrs["ome"] = {"version": "0.5", "well": {"images": [{"path": "0"}]}}
    expected = {"image": "it is an image", "well": "open the plate above it",
                "plain group": "without NGFF metadata"}[what]
    assert_bad_input(path, tmp_path, str(path), "is not an OME-Zarr HCS plate", expected)


def test_reader_errors_are_plate_errors(sources: dict[str, Path], tmp_path: Path) -> None:
    # The Python API raises the same PlateError the command reports.
    plate = copy(sources, "operaphenix", tmp_path)
    (plate / "Images" / "Index.idx.xml").write_text("<EvaluationInputData><Images><Image>")
    with pytest.raises(PlateError, match=r"Index.idx.xml is malformed XML \(line 1, column \d+\)"):
        open_plate(plate)


def test_an_ome_zarr_input_cannot_be_its_own_output(tmp_path: Path) -> None:
    from test_formats_omezarr import write_ngff_plate

    path = write_ngff_plate(tmp_path / "in.ome.zarr", FormatV05())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for output in (path, tmp_path):
        ran = CliRunner().invoke(main, ["run", "max_projection", str(path), "-o", str(output), "--overwrite"],
                                 catch_exceptions=False)
        assert ran.exit_code == 2 and "the output would replace the input plate" in ran.output, ran.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
