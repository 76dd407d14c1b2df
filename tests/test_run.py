"""End to end on a real LocalCluster: TIFF plate → OME-Zarr plate + measurement table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from hcs_dask import Pipeline, Step, load_pipeline, open_plate, run_plate


def test_nuclei_count_writes_a_valid_plate_and_counts_within_ten_percent(synthetic_plate, tmp_path, client):
    import ome_zarr_models
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    plate = open_plate(synthetic_plate)
    output = tmp_path / "out.ome.zarr"
    result = run_plate(plate, load_pipeline("nuclei_count"), output, client=client)

    assert result.counts() == {"ok": 4}, result.failures()
    assert all(r.worker and r.seconds > 0 for r in result.wells)
    hcs = ome_zarr_models.open_ome_zarr(output)
    assert type(hcs).__name__ == "HCS"
    nodes = list(Reader(parse_url(str(output)))())
    assert nodes and nodes[0].data

    field = zarr.open_group(output / "A" / "1" / "0", mode="r")
    attrs = field.attrs["ome"]
    assert [a["name"] for a in attrs["multiscales"][0]["axes"]] == ["c", "z", "y", "x"]
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["DAPI", "FITC"]
    assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"][-1] == pytest.approx(0.65)
    assert field["0"].shape == (2, 1, 128, 128)
    # 128 px fits one chunk: no lower level a viewer would need (store.pyramid_levels)
    assert [d["path"] for d in attrs["multiscales"][0]["datasets"]] == ["0"]

    truth = pd.read_csv(synthetic_plate / "ground_truth.csv")
    table = pd.read_csv(result.measurements_path)
    merged = truth.merge(table, on=["well", "site"])
    assert len(merged) == 8
    relative = (merged["nuclei_count"] - merged["nuclei"]).abs() / merged["nuclei"]
    assert relative.max() <= 0.10, merged[["well", "site", "nuclei", "nuclei_count"]]
    pd.testing.assert_frame_equal(result.measurements.reset_index(drop=True), table, check_dtype=False)


def test_max_projection_output_equals_numpy_max_of_the_tiffs(synthetic_plate, tmp_path, client):
    plate = open_plate(synthetic_plate)
    output = tmp_path / "max.ome.zarr"
    result = run_plate(plate, load_pipeline("max_projection"), output, client=client)
    assert result.ok
    well = plate.well("B01") if "B01" in [w.name for w in plate.wells] else plate.wells[-1]
    for site_index, site in enumerate(plate.sites):
        written = zarr.open_array(output / well.row / str(well.column) / str(site_index) / "0", mode="r")[:]
        for channel_index, channel in enumerate(plate.channels):
            planes = [
                tifffile.imread(f"{plate.root}/{path}")
                for key, path in well.files
                if key.site == site and key.channel == channel
            ]
            np.testing.assert_array_equal(written[channel_index, 0], np.max(planes, axis=0))


def test_real_image_gives_a_plausible_count(real_plate, tmp_path, client):
    plate = open_plate(real_plate)
    result = run_plate(plate, load_pipeline("nuclei_count"), tmp_path / "real.ome.zarr", client=client)
    assert result.ok, result.failures()
    count = result.measurements.loc[0, "nuclei_count"]
    assert 80 <= count <= 160


def fail_in_some_wells(image, *, context):
    if context.well in ("A02", "A04"):
        raise ValueError(f"bad well {context.well}")
    return image


def test_a_failing_well_is_a_record_and_the_rest_complete(synthetic_plate, tmp_path, client):
    pipeline = Pipeline([Step(fail_in_some_wells, name="picky"), Step(np.max, stack="z", kwargs={"axis": 0})])
    result = run_plate(open_plate(synthetic_plate), pipeline, tmp_path / "f.ome.zarr", client=client)
    assert result.counts() == {"ok": 2, "failed": 2}
    failed = result["A02"]
    assert failed.step == "picky" and failed.error_type == "ValueError" and "bad well A02" in failed.error
    assert "fail_in_some_wells" in failed.traceback


def per_site_stats(stack, *, context):
    return stack, {"frames": int(stack.shape[0]), "site_mean": float(stack.mean())}


def test_context_kwargs_and_measurements_per_site(synthetic_plate, tmp_path, client):
    pipeline = Pipeline([
        Step(np.max, stack="z", kwargs={"axis": 0}, name="mip"),
        Step(per_site_stats, stack="channel", name="stats"),
    ])
    result = run_plate(open_plate(synthetic_plate), pipeline, tmp_path / "m.ome.zarr", client=client)
    table = result.measurements
    assert list(table.columns[:3]) == ["well", "site", "timepoint"]
    assert len(table) == 8 and (table["frames"] == 2).all()


def test_dict_of_functions_per_channel(synthetic_plate, tmp_path, client):
    def zero(image):
        return np.zeros_like(image)

    pipeline = Pipeline([Step({2: zero}, name="zero-ch2"), Step(np.max, stack="z", kwargs={"axis": 0})])
    output = tmp_path / "d.ome.zarr"
    assert run_plate(open_plate(synthetic_plate), pipeline, output, client=client).ok
    data = zarr.open_array(output / "A" / "1" / "0" / "0", mode="r")[:]
    assert data[1].max() == 0 and data[0].max() > 0


def test_sequential_timepoints_write_every_slice(tmp_path, client):
    from hcs_dask.formats import write_synthetic_plate

    root = write_synthetic_plate(tmp_path / "tp", wells=2, sites=1, channels=1, z=2, timepoints=3, size=64, seed=1)
    plate = open_plate(root)
    pipeline = Pipeline([Step(np.max, stack="z", kwargs={"axis": 0}, name="mip")], sequential=("timepoint", "site"))
    output = tmp_path / "t.ome.zarr"
    result = run_plate(plate, pipeline, output, client=client)
    assert result.ok, result.failures()
    assert result.wells[0].memory["cleanups"] == 3  # one per timepoint; site has one value and is dropped
    written = zarr.open_array(output / "A" / "1" / "0" / "0", mode="r")[:]
    assert written.shape == (3, 1, 1, 64, 64)
    well = plate.wells[0]
    for t_index, t in enumerate(plate.timepoints):
        planes = [tifffile.imread(f"{plate.root}/{p}") for k, p in well.files if k.timepoint == t]
        np.testing.assert_array_equal(written[t_index, 0, 0], np.max(planes, axis=0))


@pytest.mark.parametrize("size", [64, 320], ids=["64px", "320px-not-a-chunk-multiple"])
def test_sequential_timepoints_with_several_channels_and_planes(tmp_path, client, size):
    from hcs_dask.formats import write_synthetic_plate

    root = write_synthetic_plate(tmp_path / "tp", wells=1, sites=2, channels=2, z=2, timepoints=3, size=size, seed=2)
    plate = open_plate(root)
    pipeline = Pipeline([Step(scale_up, name="scale")], sequential="timepoint")
    output = tmp_path / "t.ome.zarr"
    result = run_plate(plate, pipeline, output, client=client)
    assert result.ok, result.failures()
    well = plate.wells[0]
    for site_index, site in enumerate(plate.sites):
        written = zarr.open_array(output / "A" / "1" / str(site_index) / "0", mode="r")[:]
        assert written.shape == (3, 2, 2, size, size)
        for key, path in well.files:
            if key.site == site:
                index = (plate.timepoints.index(key.timepoint), plate.channels.index(key.channel),
                         plate.zs.index(key.z))
                np.testing.assert_array_equal(written[index], tifffile.imread(f"{plate.root}/{path}") * 2)


def scale_up(image):
    return image * 2


def test_plate_map_of_a_measurement(synthetic_plate, tmp_path, client):
    import matplotlib

    matplotlib.use("Agg")
    result = run_plate(open_plate(synthetic_plate), load_pipeline("nuclei_count"), tmp_path / "p.ome.zarr",
                       client=client)
    figure = result.plot_plate("nuclei_count")
    shown = np.ma.filled(figure.axes[0].images[0].get_array(), np.nan)
    per_well = result.measurements.groupby("well")["nuclei_count"].mean()
    assert shown[0, 0] == pytest.approx(per_well["A01"])
    assert np.isnan(shown[7, 11])  # H12 was not imaged
    with pytest.raises(KeyError, match="no measurement 'area'"):
        result.plot_plate("area")
    figure.savefig(tmp_path / "plate.png")
