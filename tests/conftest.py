"""Shared fixtures: a real LocalCluster (processes) and synthetic plates in tmp folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def client():
    """A real two-worker, single-threaded LocalCluster, shared by the tests that only submit wells."""
    from hcs_dask.cluster import connect

    # The same embedded cluster run_plate starts by itself (scheduler settings included).
    with connect(n_workers=2, threads_per_worker=1) as session_client:
        yield session_client


@pytest.fixture(scope="session")
def synthetic_source(tmp_path_factory):
    """A small synthetic ImageXpress plate, written once; tests copy it before changing it."""
    from hcs_dask.formats import write_synthetic_plate

    root = tmp_path_factory.mktemp("source") / "plate"
    return write_synthetic_plate(root, wells=4, sites=2, channels=2, z=3, size=128, seed=3)


@pytest.fixture
def synthetic_plate(synthetic_source, tmp_path) -> Path:
    """A private copy of the synthetic plate (safe to damage)."""
    return Path(shutil.copytree(synthetic_source, tmp_path / "plate"))


@pytest.fixture
def real_plate(tmp_path) -> Path:
    """The real nuclei image (BBBC038 via stardist) laid out as one ImageXpress well, one site."""
    folder = tmp_path / "real"
    folder.mkdir()
    shutil.copy(DATA / "nuclei_2d.tif", folder / "Real_A01_s1_w1.tif")
    return folder
