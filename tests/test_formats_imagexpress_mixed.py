"""ImageXpress as real MetaXpress exports mix it: channels of different depth, projections, thumbs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from hcs_dask.formats import open_plate, write_synthetic_plate
from hcs_dask.plate import ImageKey

GUID = "5D1C0E8A-2B44-4F0B-9A51-0C6B1A2E3F47"


def touch(folder: Path, *names: str) -> None:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def write_export(run: Path, wells: tuple[str, ...] = ("E07", "E08"), sites: int = 2) -> None:
    """The export of the issue: w1, w2 ten-plane stacks with projections beside the ZStep_ folders,
    w3 only as that projection, w4 in ZStep_1 only, thumbs everywhere."""
    for well in wells:
        for site in range(1, sites + 1):
            stem = f"Projection-Mix_{well}_s{site}"
            for channel in (1, 2, 3, 4):
                touch(run, f"{stem}_w{channel}_thumb{GUID}.tif")
            touch(run, f"{stem}_w1{GUID}.tif", f"{stem}_w2{GUID}.tif", f"{stem}_w3{GUID}.tif")
            for z in range(1, 11):
                touch(run, f"ZStep_{z}/{stem}_w1{GUID}.tif", f"ZStep_{z}/{stem}_w2{GUID}.tif")
            touch(run, f"ZStep_1/{stem}_w4{GUID}.tif")


def test_every_acquired_channel_comes_through_with_its_own_depth(tmp_path: Path) -> None:
    run = tmp_path / "Projection-Mix" / "2023-02-21" / "1334"
    write_export(run)
    plate = open_plate(tmp_path / "Projection-Mix", read_headers=False)
    assert plate.root == str(run)
    assert plate.channels == (1, 2, 3, 4)
    assert plate.channel_z(1) == plate.channel_z(2) == tuple(range(1, 11))
    assert plate.channel_z(3) == (1,) and plate.channel_z(4) == (1,)
    assert plate.projection_channels == (3,)
    assert not plate.uniform_depth
    assert plate.gaps() == []  # an acquisition, not 18 missing images per well
    assert plate.n_images == 2 * 2 * (10 + 10 + 1 + 1)
    well = plate.well("E07")
    assert well.path_of(ImageKey("E07", 2, 3, 1, 1)) == f"Projection-Mix_E07_s2_w3{GUID}.tif"
    assert well.path_of(ImageKey("E07", 1, 4, 1, 1)) == f"ZStep_1/Projection-Mix_E07_s1_w4{GUID}.tif"
    notes = "\n".join(plate.notes)
    assert "skipped 16 _thumb" in notes
    assert "skipped 8 image(s) beside ZStep_ folders" in notes  # w1 and w2 projections: they have planes
    assert "channel(s) 3 exist only as the projection" in notes
    described = {c["channel"]: c for c in plate.describe()["channels"]}
    assert described[3]["projection"] and described[3]["z"] == 1 and described[1]["z"] == 10


def test_a_plane_missing_in_one_well_is_still_a_gap(tmp_path: Path) -> None:
    write_export(tmp_path)
    (tmp_path / "ZStep_7" / f"Projection-Mix_E08_s1_w2{GUID}.tif").unlink()
    (gap,) = open_plate(tmp_path, read_headers=False).gaps()
    assert gap == "well E08 lacks 1 image(s): site 1 channel 2 z 7 timepoint 1"


def test_timepoints_with_mixed_depth(tmp_path: Path) -> None:
    for t in (1, 2):
        touch(tmp_path, f"TimePoint_{t}/P_A01_s1_w2.tif", f"TimePoint_{t}/P_A01_s1_w1.tif")
        for z in (1, 2, 3):
            touch(tmp_path, f"TimePoint_{t}/ZStep_{z}/P_A01_s1_w1.tif")
    plate = open_plate(tmp_path, read_headers=False)
    assert plate.timepoints == (1, 2)
    assert plate.channel_z(1) == (1, 2, 3) and plate.channel_z(2) == (1,)
    assert plate.projection_channels == (2,)
    assert plate.well("A01").path_of(ImageKey("A01", 1, 2, 1, 2)) == "TimePoint_2/P_A01_s1_w2.tif"
    assert plate.gaps() == []


def test_htd_declaring_more_is_reported_with_mixed_depth(tmp_path: Path) -> None:
    write_export(tmp_path, wells=("E07",))
    (tmp_path / "Projection-Mix.HTD").write_text("\r\n".join([
        '"HTSInfoFile", Version 1.0', '"TimePoints", 1', '"ZSeries", TRUE', '"ZSteps", 10',
        '"XWells", 12', '"YWells", 8',
        *[f'"WellsSelection{r}", ' + ", ".join("TRUE" if r == 5 and c in (7, 8) else "FALSE" for c in range(1, 13))
          for r in range(1, 9)],
        '"Sites", TRUE', '"XSites", 2', '"YSites", 2',
        '"SiteSelection1", TRUE, TRUE', '"SiteSelection2", TRUE, TRUE',
        '"Waves", TRUE', '"NWavelengths", 5',
        *[f'"WaveName{n}", "{name}"' for n, name in enumerate(("DAPI", "FITC", "TRITC", "Cy5", "Cy7"), start=1)],
        '"EndFile"']) + "\r\n")
    plate = open_plate(tmp_path, read_headers=False)
    assert plate.channel_names == ((1, "DAPI"), (2, "FITC"), (3, "TRITC"), (4, "Cy5"))
    missing = "\n".join(plate.declared_missing)
    assert "1 well(s) with no file: E08" in missing
    assert "no file has site 3, 4" in missing
    assert "wavelength 5 (Cy7)" in missing
    assert "z step" not in missing  # channel 1 has all ten planes; channel 4's one plane is no shortfall
    assert plate.gaps() == []


def test_synthetic_mixed_depth_plate(tmp_path: Path) -> None:
    folder = write_synthetic_plate(tmp_path / "mixed", wells=2, sites=1, channels=4, z=3, size=32, seed=2,
                                   mixed_depth=True)
    plate = open_plate(folder)
    assert plate.projection_channels == (3,)
    assert [plate.channel_z(c) for c in plate.channels] == [(1, 2, 3), (1, 2, 3), (1,), (1,)]
    assert plate.gaps() == [] and plate.shape == (32, 32)
    assert plate.channel_names == ((1, "DAPI"), (2, "FITC"), (3, "TRITC"), (4, "Cy5"))
    assert len(list(folder.glob("*_thumb*.tif"))) == 2 * 4
    # Each projection beside the ZStep_ folders is the maximum of its channel's planes.
    well = plate.well("A01")
    planes = [tifffile.imread(folder / p) for k, p in well.files if k.channel == 1]
    (projection,) = [p for p in folder.glob("Synthetic_A01_s1_w1*.tif") if "_thumb" not in p.name]
    np.testing.assert_array_equal(tifffile.imread(projection), np.max(planes, axis=0))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"format": "operaphenix", "mixed_depth": True}, "mixed_depth is an ImageXpress layout"),
    ({"channels": 2, "z": 3, "mixed_depth": True}, "channels >= 3"),
    ({"channels": 4, "z": 1, "mixed_depth": True}, "z >= 2"),
    ({"format": "metamorph"}, "format must be one of imagexpress, operaphenix, cellvoyager"),
])
def test_synthetic_writer_validates_before_writing(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_synthetic_plate(tmp_path / "p", size=32, **kwargs)
    assert not (tmp_path / "p").exists()
