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


def check_positions(output: Path, plate) -> None:
    """Each field's translation is its stage position (level 0) or nothing where the format has none."""
    for well in plate.wells:
        for index, site in enumerate(plate.sites):
            datasets = field_metadata(output, well.name, index)["multiscales"][0]["datasets"]
            transforms = datasets[0]["coordinateTransformations"]
            position = well.position_of(site)
            if position is None:
                assert [t["type"] for t in transforms] == ["scale"]
                continue
            assert transforms[1]["type"] == "translation"
            assert transforms[1]["translation"][-2:] == pytest.approx(list(position))
            # Level 1 pixels are 2x2 block means: their centres sit half a level-0 pixel further on.
            assert len(datasets) >= 2
            level1 = datasets[1]["coordinateTransformations"][1]["translation"][-2:]
            assert level1 == pytest.approx([position[0] + PIXEL_SIZE_UM / 2, position[1] + PIXEL_SIZE_UM / 2])


@pytest.mark.parametrize("plate_format", VENDOR_FORMATS)
def test_round_trip(tmp_path: Path, client, plate_format: str) -> None:
    # 512 px: two pyramid levels (store.pyramid_levels), so the translation of a coarser level is checked too.
    folder = write_synthetic_plate(tmp_path / plate_format, wells=2, sites=2, channels=2, z=2, size=512, seed=1,
                                   format=plate_format)
    plate = open_plate(folder)
    assert plate.format == plate_format
    output = tmp_path / "out.ome.zarr"
    result = run_plate(plate, Pipeline([Step(keep)]), output, client, progress=False)
    assert result.counts() == {"ok": 2}, result.failures()
    check_output(output, plate, z_planes=2)
    check_positions(output, plate)
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


def planes_seen(stack):
    """Max projection, and how many planes this channel's stack held."""
    return stack.max(axis=0), {"planes": int(stack.shape[0])}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mixed") / "plate"
    return write_synthetic_plate(folder, wells=1, sites=2, channels=4, z=3, size=32, seed=3, mixed_depth=True)


def test_mixed_depth_stacks_see_each_channels_own_planes(mixed: Path, tmp_path: Path, client) -> None:
    plate = open_plate(mixed)
    result = run_plate(plate, Pipeline([Step(planes_seen, stack="z")]), tmp_path / "p.ome.zarr", client,
                       progress=False)
    assert result.ok, result.failures()
    seen = result.measurements.groupby("channel")["planes"].unique().to_dict()
    assert {c: list(v) for c, v in seen.items()} == {1: [3], 2: [3], 3: [1], 4: [1]}
    written = zarr.open_array(str(tmp_path / "p.ome.zarr" / "A" / "1" / "0" / "0"), mode="r")
    assert written.shape == (4, 1, 32, 32)
    assert "hcs_dask" not in zarr.open_group(str(tmp_path / "p.ome.zarr" / "A" / "1" / "0"), mode="r").attrs
    labels = [c["label"] for c in field_metadata(tmp_path / "p.ome.zarr", "A01", 0)["omero"]["channels"]]
    assert labels == ["DAPI", "FITC", "TRITC", "Cy5"]


def test_mixed_depth_kept_planes_are_padded_to_the_deepest_channel(mixed: Path, tmp_path: Path, client) -> None:
    plate = open_plate(mixed)
    output = tmp_path / "keep.ome.zarr"
    assert run_plate(plate, Pipeline([Step(keep)]), output, client, progress=False).ok
    written = zarr.open_array(str(output / "A" / "1" / "1" / "0"), mode="r")[:]
    assert written.shape == (4, 3, 32, 32)
    well = plate.wells[0]
    for key, source in well.files:
        if key.site == 2:
            (image,) = read_sources(plate.format, plate.root, [source])
            np.testing.assert_array_equal(written[key.channel - 1, key.z - 1], image)
    # Channel 3 (the projection) and 4 (one plane) hold plane 0 only; their other planes stay 0.
    assert not written[2:, 1:].any() and written[2:, 0].all()
    attributes = zarr.open_group(str(output / "A" / "1" / "1"), mode="r").attrs.asdict()
    assert attributes["hcs_dask"] == {"channel_planes": [[0, 1, 2], [0, 1, 2], [0], [0]]}
    import ome_zarr_models

    assert type(ome_zarr_models.open_ome_zarr(output)).__name__ == "HCS"


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_input_from_ome_zarr_py(tmp_path: Path, client, version: str) -> None:
    from ome_zarr.format import FormatV04, FormatV05
    from test_formats_omezarr import pixels, write_ngff_plate

    source = write_ngff_plate(tmp_path / "in.ome.zarr", FormatV04() if version == "0.4" else FormatV05(),
                              labels=("DAPI", "FITC"))
    plate = open_plate(source)
    output = tmp_path / "out.ome.zarr"
    result = run_plate(plate, Pipeline([Step(keep)]), output, client, progress=False)
    assert result.counts() == {"ok": 2}, result.failures()
    attrs = field_metadata(output, "B03", 1)
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["DAPI", "FITC"]
    scale = attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == pytest.approx([1.0, 1.5, 0.325, 0.325])
    assert zarr.open_group(str(output), mode="r").attrs["ome"]["plate"]["field_count"] == 2
    np.testing.assert_array_equal(zarr.open_array(str(output / "B" / "3" / "1" / "0"), mode="r")[:],
                                  pixels("B/3", 1, (2, 3, 32, 24)))


def test_one_runs_output_feeds_the_next(tmp_path: Path, client) -> None:
    folder = write_synthetic_plate(tmp_path / "plate", wells=2, sites=2, channels=2, z=3, size=32, seed=8,
                                   format="cellvoyager")
    first = tmp_path / "first.ome.zarr"
    assert run_plate(open_plate(folder), Pipeline([Step(keep)]), first, client, progress=False).ok
    plate = open_plate(first)
    assert plate.format == "omezarr" and [w.name for w in plate] == ["A01", "A02"]
    assert [w.positions for w in plate] == [w.positions for w in open_plate(folder)]
    assert plate.channel_names == ((1, "DAPI"), (2, "FITC"))
    assert plate.pixel_size_um == pytest.approx((PIXEL_SIZE_UM, PIXEL_SIZE_UM))
    assert plate.z_step_um == pytest.approx(Z_STEP_UM) and plate.sites == (1, 2) and plate.zs == (1, 2, 3)
    second = tmp_path / "second.ome.zarr"
    projection = Pipeline([Step(np.max, stack="z", kwargs={"axis": 0})])
    assert run_plate(plate, projection, second, client, progress=False).ok
    kept = zarr.open_array(str(first / "A" / "2" / "1" / "0"), mode="r")[:]
    projected = zarr.open_array(str(second / "A" / "2" / "1" / "0"), mode="r")[:]
    np.testing.assert_array_equal(projected[:, 0], kept.max(axis=1))


def test_mixed_depth_with_z_processed_sequentially(mixed: Path, tmp_path: Path, client) -> None:
    plate = open_plate(mixed)
    together, one_by_one = tmp_path / "together.ome.zarr", tmp_path / "sequential.ome.zarr"
    assert run_plate(plate, Pipeline([Step(keep)]), together, client, progress=False).ok
    result = run_plate(plate, Pipeline([Step(keep)], sequential="z"), one_by_one, client, progress=False)
    assert result.ok, result.failures()
    for field in ("0", "1"):
        np.testing.assert_array_equal(zarr.open_array(str(one_by_one / "A" / "1" / field / "0"), mode="r")[:],
                                      zarr.open_array(str(together / "A" / "1" / field / "0"), mode="r")[:])
        attributes = zarr.open_group(str(one_by_one / "A" / "1" / field), mode="r").attrs.asdict()
        assert attributes["hcs_dask"] == {"channel_planes": [[0, 1, 2], [0, 1, 2], [0], [0]]}


@pytest.mark.parametrize("shape, options", [((64, 48), {}), ((64, 48), {"compression": "zlib"}),
                                             ((3, 64, 48), {"photometric": "minisblack"}), ((64, 48, 3), {"photometric": "rgb"})])
def test_a_tiff_reads_as_imread_reads_it(tmp_path: Path, shape: tuple[int, ...], options: dict) -> None:
    # The worker reads a one-page TIFF's page directly; anything else goes the way of imread.
    import tifffile

    from hcs_dask.formats._sources import read_tiff

    data = np.random.default_rng(1).integers(0, 4000, shape, dtype=np.uint16)
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, data, **options)
    image = read_tiff(str(path))
    np.testing.assert_array_equal(image, tifffile.imread(path))
    np.testing.assert_array_equal(image, data)


def test_a_damaged_tiff_names_its_path(tmp_path: Path) -> None:
    (tmp_path / "A01_s1_w1.tif").write_bytes(b"II*\x00 truncated")
    # tifffile.imread returns an empty array for this file.
    with pytest.raises(OSError, match="A01_s1_w1.tif: cannot read image: ValueError: no readable TIFF page"):
        list(read_sources("imagexpress", str(tmp_path), ["A01_s1_w1.tif"]))
