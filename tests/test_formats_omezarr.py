"""OME-Zarr HCS plates as input, written here by ome-zarr-py's own writer (not by hcs_dask)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

from hcs_dask.formats import PlateError, open_plate, read_sources
from hcs_dask.formats.omezarr import is_omezarr

FORMATS = [pytest.param(FormatV04(), id="ngff04-zarr2"), pytest.param(FormatV05(), id="ngff05-zarr3")]
WINDOW = {"start": 0, "end": 1000, "min": 0, "max": 65535}


def pixels(well: str, field: int, shape: tuple[int, ...]) -> np.ndarray:
    """Distinct, reproducible pixels for each field."""
    seed = sum(ord(ch) for ch in well) * 10 + field
    return np.random.default_rng(seed).integers(0, 4000, shape, dtype=np.uint16)


def write_ngff_plate(path: Path, fmt: object, *, wells: tuple[str, ...] = ("A/1", "B/3"), fields: int = 2,
                     axes: str = "czyx", shape: tuple[int, ...] = (2, 3, 32, 24),
                     labels: tuple[str, ...] = ("Hoechst", "Phalloidin"), name: str = "ngff-plate") -> Path:
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)  # type: ignore[attr-defined]
    rows = sorted({w.split("/")[0] for w in wells})
    columns = sorted({w.split("/")[1] for w in wells}, key=int)
    write_plate_metadata(root, rows, columns, list(wells), fmt=fmt, field_count=fields, name=name)
    scale = {"t": 1.0, "c": 1.0, "z": 1.5, "y": 0.325, "x": 0.325}
    for well in wells:
        row, column = well.split("/")
        group = root.require_group(row).require_group(column)
        write_well_metadata(group, [{"path": str(f)} for f in range(fields)], fmt=fmt)
        for f in range(fields):
            image = group.require_group(str(f))
            write_image(pixels(well, f, shape), image, axes=axes, fmt=fmt, scale_factors=(2,),
                        scale={a: scale[a] for a in axes},
                        axes_units={a: "micrometer" for a in axes if a in "zyx"},
                        omero={"channels": [{"label": label, "color": "FFFFFF", "window": WINDOW}
                                            for label in labels]})
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_plate_from_ome_zarr_py(tmp_path: Path, fmt: object) -> None:
    path = write_ngff_plate(tmp_path / "in.ome.zarr", fmt)
    assert is_omezarr(path)
    plate = open_plate(path)
    assert plate.format == "omezarr"
    assert plate.name == "ngff-plate"
    assert plate.root == str(path)
    assert [w.name for w in plate] == ["A01", "B03"]
    assert plate.sites == (1, 2) and plate.channels == (1, 2) and plate.zs == (1, 2, 3) and plate.timepoints == (1,)
    assert plate.channel_names == ((1, "Hoechst"), (2, "Phalloidin"))
    assert plate.pixel_size_um == pytest.approx((0.325, 0.325))
    assert plate.z_step_um == pytest.approx(1.5)
    assert plate.shape == (32, 24) and plate.dtype == "uint16"
    assert plate.gaps() == [] and plate.notes == ()
    well = plate.well("B03")
    images = list(read_sources(plate.format, plate.root, [source for _, source in well.files]))
    expected = {f: pixels("B/3", f, (2, 3, 32, 24)) for f in range(2)}
    for (key, _), image in zip(well.files, images):
        np.testing.assert_array_equal(image, expected[key.site - 1][key.channel - 1, key.z - 1])


@pytest.mark.parametrize(("axes", "shape", "expected"), [
    pytest.param("tcyx", (2, 1, 16, 16), {"timepoints": (1, 2), "zs": (1,), "channels": (1,)}, id="tcyx"),
    pytest.param("zyx", (4, 16, 16), {"timepoints": (1,), "zs": (1, 2, 3, 4), "channels": (1,)}, id="zyx"),
    pytest.param("yx", (16, 16), {"timepoints": (1,), "zs": (1,), "channels": (1,)}, id="yx"),
])
def test_fields_of_other_axes(tmp_path: Path, axes: str, shape: tuple[int, ...], expected: dict) -> None:
    path = write_ngff_plate(tmp_path / "in.ome.zarr", FormatV05(), wells=("C/12",), fields=1, axes=axes,
                            shape=shape, labels=("DNA",) if "c" in axes else ())
    plate = open_plate(path)
    assert [w.name for w in plate] == ["C12"]
    for attribute, values in expected.items():
        assert getattr(plate, attribute) == values
    assert plate.z_step_um == (pytest.approx(1.5) if "z" in axes else None)
    last = plate.wells[0].files[-1]
    (image,) = read_sources("omezarr", plate.root, [last[1]])
    data = pixels("C/12", 0, shape)
    index = tuple(getattr(last[0], {"t": "timepoint", "c": "channel", "z": "z"}[a]) - 1 for a in axes[:-2])
    np.testing.assert_array_equal(image, data[index])


def test_wells_without_images_are_left_out_with_a_note(tmp_path: Path) -> None:
    path = write_ngff_plate(tmp_path / "in.ome.zarr", FormatV05())
    write_well_metadata(zarr.open_group(str(path / "B" / "3"), mode="a"), [], fmt=FormatV05())
    plate = open_plate(path)
    assert [w.name for w in plate] == ["A01"]
    assert any("B03" in note and "list no image" in note for note in plate.notes)


def test_fields_of_different_shape_are_an_error(tmp_path: Path) -> None:
    path = write_ngff_plate(tmp_path / "in.ome.zarr", FormatV04())
    shutil.rmtree(path / "B" / "3" / "1")
    field = zarr.open_group(str(path / "B" / "3" / "1"), mode="w", zarr_format=2)
    write_image(pixels("x", 0, (2, 3, 16, 16)), field, axes="czyx", fmt=FormatV04(), scale_factors=(2,),
                scale={"c": 1.0, "z": 1.5, "y": 0.325, "x": 0.325})
    with pytest.raises(PlateError, match=r"differ in image shape.*\(16, 16\).*B/3/1.*\(32, 24\)"):
        open_plate(path)


def test_a_listed_well_missing_from_the_store_is_an_error(tmp_path: Path) -> None:
    path = write_ngff_plate(tmp_path / "in.ome.zarr", FormatV05())
    shutil.rmtree(path / "B" / "3")
    with pytest.raises(PlateError, match=r"in.ome.zarr/B/3: named by the metadata above it but not in the store"):
        open_plate(path)


def test_unsupported_axes_are_an_error(tmp_path: Path) -> None:
    path = write_ngff_plate(tmp_path / "in.ome.zarr", FormatV05(), wells=("A/1",), fields=1)
    document = path / "A" / "1" / "0" / "zarr.json"
    metadata = json.loads(document.read_text())
    metadata["attributes"]["ome"]["multiscales"][0]["axes"][0] = {"name": "angle", "type": "angle"}
    document.write_text(json.dumps(metadata))
    with pytest.raises(PlateError, match=r"A/1/0: axes \['angle', 'z', 'y', 'x'\] are not supported"):
        open_plate(path)


def test_several_acquisitions_are_noted(tmp_path: Path) -> None:
    path = tmp_path / "in.ome.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    write_plate_metadata(root, ["A"], ["1"], ["A/1"], fmt=FormatV05(), acquisitions=[{"id": 0}, {"id": 1}])
    well = root.require_group("A").require_group("1")
    write_well_metadata(well, [{"path": "0", "acquisition": 0}, {"path": "1", "acquisition": 1}], fmt=FormatV05())
    for f in ("0", "1"):
        write_image(pixels("A/1", int(f), (8, 8)), well.require_group(f), axes="yx", fmt=FormatV05(),
                    scale_factors=(2,), scale={"y": 1.0, "x": 1.0})
    plate = open_plate(path)
    assert plate.sites == (1, 2)
    assert any("2 acquisitions" in note for note in plate.notes)
