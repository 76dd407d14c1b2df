"""The CuPy pipeline on a real device: same answers as NumPy, and pools back to baseline per well.

Skipped where CuPy is missing or sees no device; normal CI passes without a GPU. The GPU
wells run on a ``LocalCUDACluster`` where dask-cuda is installed, otherwise on a
one-worker ``LocalCluster`` that offers ``resources={"GPU": 1}``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
from gpu_support import require_cuda_device

from hcs_dask import load_pipeline, open_plate, run_plate, write_synthetic_plate
from hcs_dask.cluster import _installed, connect

pytestmark = pytest.mark.gpu

cupy = require_cuda_device()

MIB = 1 << 20
#: What a pool may still hold after a well's cleanup: CuPy keeps nothing, RMM its initial pool.
SLACK = 4 * MIB


@contextmanager
def gpu_cluster(**rmm_options: Any) -> Iterator[Any]:
    if _installed("dask_cuda"):
        with connect(cluster="cuda", n_workers=1, **rmm_options) as client:
            yield client
        return
    if rmm_options:
        pytest.skip("the RMM options need dask-cuda")
    with connect(n_workers=1, resources={"GPU": 1}) as client:
        yield client


@pytest.fixture(scope="module")
def gpu_plate(tmp_path_factory):
    # 512 px: images large enough for CuPy's pool to hold tens of MB during a well.
    return write_synthetic_plate(tmp_path_factory.mktemp("gpu") / "plate", wells=4, sites=2, channels=2, z=3,
                                 size=512, seed=11)


@pytest.fixture(scope="module")
def cpu_result(gpu_plate, client, tmp_path_factory):
    return run_plate(open_plate(gpu_plate), load_pipeline("nuclei_count"),
                     tmp_path_factory.mktemp("cpu") / "cpu.ome.zarr", client=client, progress=False)


def _rows(result: Any) -> dict[tuple[str, int], dict[str, Any]]:
    table = result.measurements
    return {(row["well"], int(row["site"])): row for row in table.to_dict("records")}


def _assert_same_measurements(gpu_result: Any, cpu_result: Any) -> None:
    assert gpu_result.ok, [(w.well, w.step, w.error_type, w.error) for w in gpu_result.failures()]
    gpu_rows, cpu_rows = _rows(gpu_result), _rows(cpu_result)
    assert gpu_rows.keys() == cpu_rows.keys()
    for key, cpu_row in cpu_rows.items():
        gpu_row = gpu_rows[key]
        assert abs(gpu_row["nuclei_count"] - cpu_row["nuclei_count"]) <= max(1, 0.02 * cpu_row["nuclei_count"]), key
        for name, value in cpu_row.items():
            if name.startswith("mean_intensity") and not math.isnan(value):
                assert gpu_row[name] == pytest.approx(value, rel=0.02), (key, name)
    total_cpu = sum(row["nuclei_count"] for row in cpu_rows.values())
    total_gpu = sum(row["nuclei_count"] for row in gpu_rows.values())
    assert abs(total_gpu - total_cpu) <= 0.02 * total_cpu


def test_cupy_pipeline_counts_like_numpy_and_cupy_pool_returns_to_baseline(gpu_plate, cpu_result, tmp_path):
    with gpu_cluster() as client:
        result = run_plate(open_plate(gpu_plate), load_pipeline("nuclei_count", device="gpu"),
                           tmp_path / "gpu.ome.zarr", client=client, progress=False)
    _assert_same_measurements(result, cpu_result)
    for well in result.wells:
        memory = well.memory
        assert memory["conversions"]["host_to_device_bytes"] > 0, well.well  # the steps ran on the device
        assert memory["cleaner_errors"] == [], well.well
        pool = memory["process"]["gpu"]["cupy"]
        assert pool["before"] > MIB, (well.well, pool)  # the well used the pool...
        assert pool["after"] <= SLACK, (well.well, pool)  # ...and the cleanup emptied it


@pytest.mark.skipif(not (_installed("dask_cuda") and _installed("rmm")), reason="needs dask-cuda and RMM")
def test_rmm_pool_for_cupy_is_reinitialised_after_every_well(gpu_plate, cpu_result, tmp_path):
    initial = 8 * MIB  # smaller than a well needs: the pool grows during every well
    with gpu_cluster(rmm_pool_size=initial, rmm_for_cupy=True, rmm_reinitialize_pool=True) as client:
        result = run_plate(open_plate(gpu_plate), load_pipeline("nuclei_count", device="gpu"),
                           tmp_path / "rmm.ome.zarr", client=client, progress=False)
    _assert_same_measurements(result, cpu_result)
    for well in result.wells:
        memory = well.memory
        assert memory["cleaner_errors"] == [], well.well
        rmm = memory["process"]["gpu"]["rmm"]
        assert rmm["before"] > initial, (well.well, rmm)  # the pool grew during the well...
        assert rmm["after"] <= initial + SLACK, (well.well, rmm)  # ...and was re-created at its size
        # CuPy allocated through RMM: its own pool stayed empty.
        assert memory["process"]["gpu"].get("cupy", {"before": 0})["before"] <= SLACK, well.well
