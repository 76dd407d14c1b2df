"""The ``hcs-dask`` command: exit codes, summaries, and bad input that writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
from click.testing import CliRunner

from hcs_dask.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_run_writes_output_and_summary(synthetic_plate, tmp_path):
    output = tmp_path / "cli.ome.zarr"
    summary = tmp_path / "summary.json"
    # A real subprocess through the console entry point, as a user runs it.
    completed = subprocess.run(
        [sys.executable, "-m", "hcs_dask.cli", "run", "nuclei_count", str(synthetic_plate), "-o", str(output),
         "--workers", "2", "--summary", str(summary)],
        capture_output=True, text=True, timeout=240,
    )
    assert completed.returncode == 0, completed.stderr
    assert "4 ok" in completed.stdout and str(output) in completed.stdout
    data = json.loads(summary.read_text())
    assert data["plate"] and data["counts"] == {"ok": 4}
    for well in data["wells"]:
        assert {"well", "status", "error", "seconds", "worker"} <= set(well)
        assert well["backend_bytes_after_cleanup"] == 0
        assert well["process_rss_after_cleanup_bytes"] > 0 and well["cleanup_seconds"] >= 0


def test_exit_code_one_when_a_well_fails(synthetic_plate, tmp_path):
    graph = tmp_path / "fails.py"
    graph.write_text(
        "from hcs_dask import Pipeline, Step\n"
        "def boom(image, *, context):\n"
        "    if context.well == 'A03':\n        raise RuntimeError('broken optics')\n"
        "    return image\n"
        "pipeline = Pipeline([Step(boom)])\n"
    )
    summary = tmp_path / "s.json"
    result = invoke("run", str(graph), str(synthetic_plate), "-o", str(tmp_path / "o.ome.zarr"),
                    "--workers", "1", "--summary", str(summary))
    assert result.exit_code == 1
    wells = {w["well"]: w for w in json.loads(summary.read_text())["wells"]}
    assert wells["A03"]["status"] == "failed" and "broken optics" in wells["A03"]["error"]
    assert wells["A03"]["step"] == "boom"
    assert sum(w["status"] == "ok" for w in wells.values()) == 3


def _assert_input_error(args, words, output: Path):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    for word in words:
        assert word in result.output
    assert not output.exists()


def test_missing_path(tmp_path):
    output = tmp_path / "o.ome.zarr"
    _assert_input_error(["run", "nuclei_count", str(tmp_path / "nope"), "-o", str(output)], ["nope"], output)


def test_folder_without_plate(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    output = tmp_path / "o.ome.zarr"
    _assert_input_error(["run", "nuclei_count", str(tmp_path / "empty"), "-o", str(output)], ["empty"], output)


def test_gaps_are_all_reported(synthetic_plate, tmp_path):
    victims = sorted(synthetic_plate.rglob("*_A02_s2_w2*.tif")) + sorted(synthetic_plate.rglob("*_A04_s1_w1*.tif"))
    assert victims
    for victim in victims:
        victim.unlink()
    output = tmp_path / "o.ome.zarr"
    _assert_input_error(["run", "nuclei_count", str(synthetic_plate), "-o", str(output)],
                        ["A02", "A04", "site 2 channel 2", "site 1 channel 1"], output)


def test_mixed_shapes_name_the_files(synthetic_plate, tmp_path):
    victim = sorted(synthetic_plate.rglob("*_A03_s1_w1*.tif"))[0]
    tifffile.imwrite(victim, np.zeros((64, 64), dtype=np.uint16))
    output = tmp_path / "o.ome.zarr"
    _assert_input_error(["run", "nuclei_count", str(synthetic_plate), "-o", str(output)], [victim.name], output)


def test_mixed_dtypes_name_the_files(synthetic_plate, tmp_path):
    victim = sorted(synthetic_plate.rglob("*_A03_s1_w1*.tif"))[0]
    tifffile.imwrite(victim, np.zeros((128, 64), dtype=np.uint32))
    output = tmp_path / "o.ome.zarr"
    _assert_input_error(["run", "nuclei_count", str(synthetic_plate), "-o", str(output)], [victim.name], output)


def test_pipeline_file_without_pipeline(synthetic_plate, tmp_path):
    graph = tmp_path / "empty_graph.py"
    graph.write_text("x = 1\n")
    output = tmp_path / "o.ome.zarr"
    _assert_input_error(["run", str(graph), str(synthetic_plate), "-o", str(output)],
                        ["empty_graph.py", "pipeline"], output)


def test_pipeline_file_with_invalid_step(synthetic_plate, tmp_path):
    graph = tmp_path / "bad_step.py"
    graph.write_text("from hcs_dask import Pipeline, Step\n"
                     "import numpy as np\n"
                     "pipeline = Pipeline([Step(np.max, stack='depth', name='mip')])\n")
    output = tmp_path / "o.ome.zarr"
    _assert_input_error(["run", str(graph), str(synthetic_plate), "-o", str(output)],
                        ["bad_step.py", "'mip'", "unknown axis 'depth'"], output)


def test_existing_output_without_overwrite(synthetic_plate, tmp_path):
    output = tmp_path / "o.ome.zarr"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    result = invoke("run", "nuclei_count", str(synthetic_plate), "-o", str(output))
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (output / "keep.txt").read_text() == "mine"


def test_inspect_prints_dimensions(synthetic_plate):
    result = invoke("inspect", str(synthetic_plate))
    assert result.exit_code == 0
    assert "4 wells × 2 sites × 2 channels × 3 z" in result.output
    assert "DAPI" in result.output
    as_json = json.loads(invoke("inspect", "--json", str(synthetic_plate)).output)
    assert as_json["wells"] == 4 and as_json["gaps"] == []


def test_synth_then_demo(tmp_path):
    result = invoke("synth", str(tmp_path / "s"), "--wells", "2", "--sites", "1", "--channels", "1",
                    "--z", "1", "--size", "64", "--seed", "5")
    assert result.exit_code == 0 and (tmp_path / "s" / "ground_truth.csv").exists()
    env = dict(os.environ)
    completed = subprocess.run(
        [sys.executable, "-m", "hcs_dask.cli", "demo", "--directory", str(tmp_path / "demo"), "--wells", "2",
         "--workers", "2"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert completed.returncode == 0, completed.stderr
    assert "2 ok" in completed.stdout
    assert "output:" in completed.stdout and (tmp_path / "demo" / "nuclei_count.ome.zarr").is_dir()
    assert (tmp_path / "demo" / "plate_map.png").stat().st_size > 1000


def test_gpu_graph_on_a_cpu_cluster_exits_2_and_writes_nothing(synthetic_plate, tmp_path):
    output = tmp_path / "o.ome.zarr"
    _assert_input_error(["run", "nuclei_count", str(synthetic_plate), "-o", str(output), "--device", "gpu"],
                        ["GPU steps", "--cluster cuda"], output)
