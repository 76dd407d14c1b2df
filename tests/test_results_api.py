"""The notebook face of results: reprs (escaped), tables, plate maps, a well's image, load, re-run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from click.testing import CliRunner

from hcs_dask import Pipeline, Plate, PlateResult, Step, open_plate, run_plate
from hcs_dask.cli import main
from hcs_dask.compile import CompileError, ResumeError
from hcs_dask.plate import row_name
from hcs_dask.results import ExecutionResult
from hcs_dask.store import Manifest
from hcs_dask.tables import _columns, status_table

GRAPH = Path(__file__).parent / "faulty_graph.py"
#: An error message that would be markup if it were not escaped.
NASTY = "segmentation found <0> objects in <b>DAPI</b><script>alert(1)</script>"


def project(stack, *, context, broken=None):
    """Max projection over z; raises in the well named ``broken``."""
    if context.well == broken:
        raise RuntimeError(NASTY)
    return stack.max(axis=0), {"brightest": float(stack.max()), "mean": float(stack.mean())}


def normalise(image):
    return image / imgae.max()  # noqa: F821  (the typo under test: a NameError in every well)


def pipeline(broken: str | None = "A02") -> Pipeline:
    return Pipeline([Step(project, stack="z", name="project", kwargs={"broken": broken})], name="project")


@pytest.fixture(scope="module")
def failed_run(synthetic_source, tmp_path_factory, client):
    """One run of the synthetic plate in which A02 fails; the store is only read by the tests."""
    output = tmp_path_factory.mktemp("failed") / "out.ome.zarr"
    return run_plate(open_plate(synthetic_source), pipeline(), output, client=client, progress=False)


def _result(wells: list[str], statuses: dict[str, str] | None = None, *, geometry=None) -> PlateResult:
    statuses = statuses or {}
    results = []
    for i, well in enumerate(wells):
        status = statuses.get(well, "ok")
        results.append(ExecutionResult(
            well, status, seconds=0.1, error="boom" if status != "ok" else None,
            measurements=[] if status != "ok" else [
                {"well": well, "site": 1, "channel": 1, "area": float(i)},
                {"well": well, "site": 1, "channel": 2, "area": float(100 + i)},
                {"well": well, "site": 1, "count": float(i % 7)}]))
    return PlateResult("P", "/nowhere.ome.zarr", results, geometry=geometry, channel_names={1: "DAPI", 2: "FITC"})


def _full(rows: int, columns: int) -> list[str]:
    return [f"{row_name(r)}{c:02d}" for r in range(rows) for c in range(1, columns + 1)]


# ------------------------------------------------------------------- reprs
def test_plate_repr_is_short_and_html_shows_present_and_missing_wells(synthetic_source):
    plate = open_plate(synthetic_source)
    text = repr(plate)
    assert len(text) < 300 and "4 wells" in text and "ImageKey" not in text
    assert "Well(" in repr(plate.wells[0]) and len(repr(plate.wells[0])) < 60
    html = plate._repr_html_()
    assert "imagexpress" in html and "DAPI" in html and "0.65" in html
    assert "4 of 96" in html and "92 not imaged" in html
    assert html.count("<td") >= 96  # one cell per well of the 8×12 grid
    assert 'title="A01: imaged"' in html and 'title="H12"' in html


def test_plate_html_marks_incomplete_wells_and_escapes_names(synthetic_source, tmp_path):
    root = Path(shutil.copytree(synthetic_source, tmp_path / "plate"))
    plate = open_plate(root)
    victim = plate.wells[1]
    (root / victim.files[0][1]).unlink()
    damaged = open_plate(root)
    html = damaged._repr_html_()
    assert f'title="{victim.name}: incomplete"' in html and "1 incomplete" in html
    odd = Plate(name="<b>x</b>", root="/r", format="imagexpress", wells=damaged.wells, shape=(8, 8),
                dtype="uint16", channel_names=((1, "<script>"),))
    html = odd._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html and "<b>x</b>" not in html


def test_reprs_of_1536_wells_stay_small():
    wells = [w for w in _full(32, 48)]
    result = _result(wells[:-10], {wells[5]: "failed"}, geometry=(32, 48))
    html = result._repr_html_()
    assert len(html) < 100_000 and html.count("<td") >= 32 * 48
    assert "AF" in html


def test_result_html_escapes_errors_and_lists_failures_and_timings(failed_run):
    html = failed_run._repr_html_()
    assert "<script>" not in html and "<b>DAPI" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;DAPI&lt;/b&gt;" in html
    assert "3 ok, 1 failed" in html and "per well median" in html
    for header in ("well", "status", "error", "step"):
        assert f">{header}</th>" in html
    assert ">A02<" in html and ">project<" in html
    assert "PlateResult(" in repr(failed_run) and "1 failed" in repr(failed_run)


# ------------------------------------------------------------------ tables
def test_to_dataframe_one_row_per_well_with_datetimes_and_flat_memory(failed_run):
    frame = failed_run.to_dataframe()
    assert list(frame["well"]) == ["A01", "A02", "A03", "A04"]
    assert list(frame["status"]) == ["ok", "failed", "ok", "ok"]
    assert isinstance(frame["started"].dtype, pd.DatetimeTZDtype) and frame["started"].notna().all()
    assert (frame["finished"] >= frame["started"]).all()
    for column in ("backend_bytes_after_cleanup", "cleanup_seconds", "process_rss_after_cleanup_bytes",
                   "process_shared", "worker", "error", "step", "pipeline"):
        assert column in frame.columns, column
    assert not any(isinstance(v, dict) for v in frame.to_numpy().ravel())
    assert frame.loc[frame.well == "A02", "step"].item() == "project"
    assert (frame["backend_bytes_after_cleanup"] == 0).all()
    assert set(failed_run.measurements["well"]) == {"A01", "A03", "A04"}


def test_tables_beside_and_inside_the_plate(failed_run):
    output = Path(failed_run.output)
    assert failed_run.measurements_path.endswith(".measurements.csv")
    side_car = pd.read_csv(failed_run.measurements_path)
    assert len(side_car) == len(failed_run.measurements)
    listing = zarr.open_group(output / "tables", mode="r").attrs["tables"]
    assert listing == ["measurements", "well_status"] == failed_run.tables
    for name, key in (("measurements", "index"), ("well_status", "well")):
        attrs = zarr.open_group(output / "tables" / name, mode="r").attrs.asdict()
        assert attrs == {"type": "generic_table", "table_version": "1", "backend": "json", "index_key": key,
                         "index_type": "int" if key == "index" else "str"}
    columns = zarr.open_group(output / "tables" / "well_status" / "table", mode="r").attrs.asdict()
    assert dict(zip(columns["well"], columns["status"])) == {"A01": "ok", "A02": "failed", "A03": "ok", "A04": "ok"}
    assert columns["error"][1] == NASTY and columns["error"][0] is None
    # Written without pandas; the same values as the DataFrame's columns read back.
    assert columns == _columns(status_table(failed_run))
    # Every file of the store is a zarr document: walking it warns about nothing (warnings are errors here).
    assert "tables/well_status/table" in dict(zarr.open_group(output, mode="r").members(max_depth=None))


def test_parquet_measurements_beside_the_plate(synthetic_source, tmp_path, client):
    pytest.importorskip("pyarrow")
    plate = open_plate(synthetic_source).select(["A01"])
    result = run_plate(plate, pipeline(None), tmp_path / "p.ome.zarr", client=client, table_format="parquet",
                       progress=False)
    assert result.measurements_path == str(tmp_path / "p.measurements.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(result.measurements_path), result.measurements)
    assert PlateResult.load(tmp_path / "p.ome.zarr").measurements_path == result.measurements_path


# -------------------------------------------------------------- plate maps
@pytest.mark.parametrize("rows, columns", [(8, 12), (16, 24), (32, 48)], ids=["96", "384", "1536"])
def test_plate_maps_label_every_row_and_column(rows, columns):
    wells = _full(rows, columns)
    result = _result(wells[: len(wells) // 2], {wells[0]: "failed"}, geometry=(rows, columns))
    for figure in (result.plot_plate(), result.plot_plate("count")):
        ax = figure.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == [row_name(r) for r in range(rows)]
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(c) for c in range(1, columns + 1)]
        assert len(figure.axes) == 2  # the plate and its colour bar
    letters = [t.get_text() for t in result.plot_plate().axes[0].get_yticklabels()]
    assert letters[-1] == {8: "H", 16: "P", 32: "AF"}[rows]


def test_failed_wells_are_marked_unlike_wells_never_imaged():
    wells = _full(8, 12)[:20]
    result = _result(wells, {"A03": "failed", "A05": "worker_died"})
    figure = result.plot_plate("count")
    ax = figure.axes[0]
    grid = np.ma.filled(ax.images[0].get_array(), np.nan)
    assert np.isnan(grid[0, 2]) and np.isnan(grid[7, 11])  # neither has a value...
    marked = {tuple(np.round(p).astype(int)) for c in ax.collections for p in c.get_offsets()}
    assert marked == {(2, 0), (4, 0)}  # ...but only the failed ones are crossed (x, y)
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"failed", "worker_died", "not imaged"}
    status = result.plot_plate("status").axes[0]
    codes = np.ma.filled(status.images[0].get_array(), np.nan)
    assert codes[0, 2] != codes[0, 0] and not np.isnan(codes[0, 2]) and np.isnan(codes[7, 11])
    labels = [t.get_text() for t in result.plot_plate("status").axes[1].get_yticklabels()]
    assert labels == ["ok (18)", "failed (1)", "worker_died (1)"]


def test_a_per_channel_measurement_is_chosen_not_averaged():
    result = _result(_full(8, 12)[:4])
    with pytest.raises(ValueError, match="per channel .*1 \\(DAPI\\), 2 \\(FITC\\).*channel="):
        result.plot_plate("area")
    dapi = np.ma.filled(result.plot_plate("area", channel="DAPI").axes[0].images[0].get_array(), np.nan)
    fitc = np.ma.filled(result.plot_plate("area", channel=2).axes[0].images[0].get_array(), np.nan)
    assert list(dapi[0, :4]) == [0, 1, 2, 3] and list(fitc[0, :4]) == [100, 101, 102, 103]
    with pytest.raises(ValueError, match="not measured per channel"):
        result.plot_plate("count", channel=1)
    with pytest.raises(KeyError, match="no measurement 'volume'; measured: .*area"):
        result.plot_plate("volume")


def test_plot_plate_of_a_run(failed_run):
    figure = failed_run.plot_plate("brightest", channel="DAPI")
    grid = np.ma.filled(figure.axes[0].images[0].get_array(), np.nan)
    rows = failed_run.measurements
    expected = rows[rows.channel == 1].groupby("well")["brightest"].mean()
    assert grid[0, 0] == pytest.approx(expected["A01"]) and np.isnan(grid[0, 1])
    assert "DAPI" in figure.get_suptitle()


# ------------------------------------------------------------------ pixels
def test_image_is_a_lazy_array_equal_to_the_store(failed_run):
    import dask.array as da

    output = Path(failed_run.output)
    whole = failed_run.image("A03")
    assert isinstance(whole, da.Array)
    stored = zarr.open_array(output / "A" / "3" / "0" / "0", mode="r")[:]
    np.testing.assert_array_equal(whole.compute(), stored)
    second = failed_run.image("A03", site=2, channel="FITC")
    np.testing.assert_array_equal(second.compute(), zarr.open_array(output / "A/3/1/0", mode="r")[1])
    np.testing.assert_array_equal(failed_run.image("A03", site=2, channel=2).compute(), second.compute())
    assert failed_run.image("A03", level=0, z=0).shape == (2, 128, 128)
    with pytest.raises(KeyError, match="no pyramid level 1"):  # 128 px fits one chunk: one level (pyramid_levels)
        failed_run.image("A03", level=1)
    with pytest.raises(ValueError, match="A02 has no image .*failed.*RuntimeError"):
        failed_run.image("A02")
    with pytest.raises(KeyError, match="no channel 'Cy5'"):
        failed_run.image("A01", channel="Cy5")
    with pytest.raises(KeyError, match="no site 7"):
        failed_run.image("A01", site=7)
    with pytest.raises(KeyError, match="no well 'H12'"):
        failed_run.image("H12")


def test_show_well_composes_the_channels_with_their_names(failed_run):
    figure = failed_run.show_well("A01", site=2)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.texts] == ["DAPI", "FITC"]
    pixels = ax.images[0].get_array()
    assert pixels.shape == (128, 128, 3) and pixels.max() > 0.5 and pixels.std() > 0.01
    assert "A01 site 2" in ax.get_title()
    only = failed_run.show_well("A01", channels=["FITC"]).axes[0]
    assert [t.get_text() for t in only.texts] == ["FITC"]


def test_every_channel_has_the_window_its_data_imply(failed_run):
    output = Path(failed_run.output)
    omero = zarr.open_group(output / "A/1/0", mode="r").attrs["ome"]["omero"]["channels"]
    data = zarr.open_array(output / "A/1/0/0", mode="r")[:]
    for index, channel in enumerate(omero):
        assert channel["window"] == {"start": int(data[index].min()), "end": int(data[index].max()),
                                     "min": 0, "max": 65535}


# ------------------------------------------------------- load and re-run
def test_load_rebuilds_the_result_from_the_store(failed_run):
    loaded = PlateResult.load(failed_run.output)
    assert loaded.counts() == failed_run.counts()
    assert [r.well for r in loaded.wells] == [r.well for r in failed_run.wells]
    assert loaded["A02"].error == NASTY and loaded["A02"].step == "project"
    pd.testing.assert_frame_equal(loaded.measurements, failed_run.measurements)
    assert loaded.geometry == (8, 12) and loaded.sites == (1, 2) and loaded.channel_names == {1: "DAPI", 2: "FITC"}
    assert loaded.tables == ["measurements", "well_status"] and loaded.measurements_path
    np.testing.assert_array_equal(loaded.image("A01", site=1).compute(), failed_run.image("A01", site=1).compute())
    with pytest.raises(ValueError, match="pass rerun_failed\\(pipeline=...\\)"):
        loaded.rerun_failed()


def test_load_refuses_a_folder_without_a_run(tmp_path):
    from hcs_dask import OutputError

    with pytest.raises(OutputError, match="not a store written by hcs_dask"):
        PlateResult.load(tmp_path)


def test_rerun_failed_with_the_fixed_step_after_a_deliberate_failure(synthetic_source, tmp_path, client):
    output = tmp_path / "out.ome.zarr"
    first = run_plate(open_plate(synthetic_source), pipeline("A02"), output, client=client, progress=False)
    assert first.counts() == {"ok": 3, "failed": 1}
    before = {r.well: (r.run, r.finished) for r in first.wells}
    assert first.rerun_failed(client=client).counts() == {"ok": 3, "failed": 1}  # same code: fails again

    with pytest.raises(ResumeError, match="step 'project'.*allow_changed=True"):
        first.rerun_failed(pipeline(None), client=client)
    fixed = first.rerun_failed(pipeline(None), client=client, allow_changed=True, progress=False)
    assert fixed.counts() == {"ok": 4}
    after = {r.well: (r.run, r.finished) for r in fixed.wells}
    assert {w for w in after if after[w] != before[w]} == {"A02"}  # exactly the failed well ran again
    assert fixed.mixed and sorted(fixed.pipelines().values()) == [1, 3]
    records = Manifest(output).read_wells()
    assert records["A02"]["pipeline"] != records["A01"]["pipeline"] == first["A01"].pipeline
    assert fixed.summary()["mixed"] is True
    assert "mixed" in fixed._repr_html_() and "mixed" in repr(fixed)
    assert "2 pipeline versions" in fixed.plot_plate().get_suptitle()
    assert PlateResult.load(output).mixed
    shown = CliRunner().invoke(main, ["inspect", str(output)])
    assert shown.exit_code == 0, shown.output
    assert "mixed: the ok wells come from 2 versions of the pipeline" in shown.output
    as_json = json.loads(CliRunner().invoke(main, ["inspect", str(output), "--json"]).output)
    assert as_json["mixed"] is True and as_json["counts"] == {"ok": 4} and as_json["failures"] == []
    assert fixed.rerun_failed() is fixed  # nothing left to run


def test_cli_resume_with_a_changed_pipeline_needs_the_flag(synthetic_source, tmp_path):
    graph = tmp_path / "graph.py"
    graph.write_text("from hcs_dask import Pipeline, Step\n"
                     "def project(stack):\n    return stack.max(axis=0)\n"
                     "pipeline = Pipeline([Step(project, stack='z')])\n")
    plate = tmp_path / "plate"
    shutil.copytree(synthetic_source, plate)
    output = tmp_path / "out.ome.zarr"
    runner = CliRunner()
    first = runner.invoke(main, ["run", str(graph), str(plate), "-o", str(output), "--workers", "1",
                                 "--wells", "A01,A03"])
    assert first.exit_code == 0, first.output
    assert [r.well for r in PlateResult.load(output).wells] == ["A01", "A03"]
    graph.write_text(graph.read_text().replace("axis=0", "axis=0) + 0 * (1"))
    refused = runner.invoke(main, ["run", str(graph), str(plate), "-o", str(output), "--resume",
                                   "--wells", "A01,A03"])
    assert refused.exit_code == 2 and "--accept-changed-pipeline" in refused.output
    alone = runner.invoke(main, ["run", str(graph), str(plate), "-o", str(output), "--accept-changed-pipeline"])
    assert alone.exit_code == 2 and "add resume=True (--resume)" in alone.output
    typo = runner.invoke(main, ["run", str(graph), str(plate), "-o", str(tmp_path / "x.ome.zarr"),
                                "--wells", "A01,Z99"])
    assert typo.exit_code == 2 and "Z99" in typo.output


# ------------------------------------------------- subsets, gaps, early stop
def test_select_runs_a_chosen_subset(synthetic_source):
    plate = open_plate(synthetic_source)
    chosen = plate.select(["A03", "A01"])
    assert [w.name for w in chosen.wells] == ["A01", "A03"] and chosen.fingerprint() != plate.fingerprint()
    with pytest.raises(KeyError, match="no well\\(s\\) B07"):
        plate.select(["A01", "B07"])


def test_skip_incomplete_runs_the_complete_wells_and_records_the_others(synthetic_source, tmp_path, client):
    root = Path(shutil.copytree(synthetic_source, tmp_path / "plate"))
    victim = open_plate(root).well("A02")
    (root / victim.files[0][1]).unlink()
    plate = open_plate(root)
    with pytest.raises(CompileError, match="--skip-incomplete"):
        run_plate(plate, pipeline(None), tmp_path / "refused.ome.zarr", client=client)
    output = tmp_path / "out.ome.zarr"
    result = run_plate(plate, pipeline(None), output, client=client, skip_incomplete=True, progress=False)
    assert result.counts() == {"ok": 3, "skipped": 1}
    assert result["A02"].error.startswith("well A02 lacks 1 image(s)")
    assert Manifest(output).read_well("A02")["status"] == "skipped"
    import ome_zarr_models

    ome_zarr_models.open_ome_zarr(output)  # the skipped well is listed, with no images
    again = result.rerun_failed(client=client, progress=False)
    assert again.counts() == {"ok": 3, "skipped": 1}
    shown = CliRunner().invoke(main, ["run", str(GRAPH), str(root), "-o", str(tmp_path / "cli.ome.zarr"),
                                      "--workers", "1", "--skip-incomplete"])
    assert shown.exit_code == 1, shown.output  # not every well is ok
    assert "3 ok, 1 skipped" in shown.output and "A02: skipped: well A02 lacks 1 image(s)" in shown.output


def test_a_run_whose_first_wells_fail_in_one_step_stops_early(tmp_path, client):
    from hcs_dask.formats import write_synthetic_plate

    root = write_synthetic_plate(tmp_path / "plate", wells=10, sites=1, channels=1, z=2, size=32, seed=4)
    broken = Pipeline([Step(project, stack="z", name="project", kwargs={"broken": None}),
                       Step(normalise, name="typo")], name="broken")
    result = run_plate(open_plate(root), broken, tmp_path / "out.ome.zarr", client=client, max_failures=2,
                       progress=False)
    counts = result.counts()
    assert counts["failed"] >= 2 and counts["cancelled"] >= 4 and sum(counts.values()) == 10, counts
    assert {r.step for r in result.wells if r.status == "failed"} == {"typo"}
    assert result.stopped.startswith("the first 2 wells all failed in step 'typo'")
    assert "stopped early" in result._repr_html_()
    assert all("max_failures" in r.error for r in result.wells if r.status == "cancelled")
    finished = run_plate(open_plate(root), broken, tmp_path / "all.ome.zarr", client=client, max_failures=None,
                         progress=False)
    assert finished.counts() == {"failed": 10} and finished.stopped is None
