"""``hcs-dask synth --format`` and ``hcs-dask inspect`` for every format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hcs_dask.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize(("plate_format", "metadata"), [
    ("imagexpress", "Synthetic.HTD"),
    ("operaphenix", "Images/Index.idx.xml"),
    ("cellvoyager", "MeasurementData.mlf"),
])
def test_synth_and_inspect_every_vendor_format(tmp_path: Path, plate_format: str, metadata: str) -> None:
    folder = tmp_path / plate_format
    written = invoke("synth", str(folder), "--format", plate_format, "--wells", "2", "--sites", "2",
                     "--channels", "2", "--z", "2", "--size", "32")
    assert written.exit_code == 0, written.output
    assert f"wrote 16 {plate_format} images (2 wells)" in written.output
    assert (folder / metadata).is_file() and (folder / "ground_truth.csv").is_file()
    inspected = invoke("inspect", str(folder))
    assert inspected.exit_code == 0, inspected.output
    assert f"({plate_format})" in inspected.output
    assert "2 wells × 2 sites × 2 channels × 2 z × 1 timepoints = 16 images" in inspected.output
    assert "image 32×32 uint16, pixel size 0.65 × 0.65 µm, z step 2 µm" in inspected.output
    assert "channel 1: DAPI, 2 planes" in inspected.output and "channel 2: FITC, 2 planes" in inspected.output
    assert ("field positions: known for 4 field(s)" in inspected.output) == (plate_format != "imagexpress")
    described = json.loads(invoke("inspect", "--json", str(folder)).output)
    assert described["format"] == plate_format and described["gaps"] == []


def test_inspect_describes_mixed_depth_as_an_acquisition(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    assert invoke("synth", str(folder), "--mixed-depth", "--wells", "1", "--sites", "1", "--channels", "4",
                  "--z", "3", "--size", "32").exit_code == 0
    inspected = invoke("inspect", str(folder))
    assert inspected.exit_code == 0, inspected.output
    for line in ("channel 1: DAPI, 3 planes", "channel 3: TRITC, projection only", "channel 4: Cy5, 1 plane",
                 "channels differ in depth", "no gaps", "_thumb"):
        assert line in inspected.output
    assert "lacks" not in inspected.output


def test_synth_refuses_mixed_depth_for_other_formats(tmp_path: Path) -> None:
    result = invoke("synth", str(tmp_path / "p"), "--format", "cellvoyager", "--mixed-depth", "--channels", "4")
    assert result.exit_code == 2 and "mixed_depth is an ImageXpress layout" in result.output
    assert not (tmp_path / "p").exists()


def test_inspect_of_an_ome_zarr_input(tmp_path: Path) -> None:
    from ome_zarr.format import FormatV04
    from test_formats_omezarr import write_ngff_plate

    path = write_ngff_plate(tmp_path / "in.ome.zarr", FormatV04())
    inspected = invoke("inspect", str(path))
    assert inspected.exit_code == 0, inspected.output
    assert "(omezarr)" in inspected.output and "channel 2: Phalloidin, 3 planes" in inspected.output
    assert "pixel size 0.325 × 0.325 µm, z step 1.5 µm" in inspected.output


def test_inspect_warns_when_a_fallback_reads_file_names(tmp_path: Path) -> None:
    folder = tmp_path / "cv"
    assert invoke("synth", str(folder), "--format", "cellvoyager", "--wells", "1", "--sites", "1",
                  "--channels", "1", "--z", "1", "--size", "32").exit_code == 0
    (folder / "MeasurementData.mlf").unlink()
    inspected = invoke("inspect", str(folder))
    assert inspected.exit_code == 0
    assert "warning: " in inspected.output and "no MeasurementData.mlf" in inspected.output
