"""``fsync``: the durable commit is on by default; ``fsync=False`` (``--no-fsync``) skips every flush.

``run_well`` runs in this process so that each ``os.fsync`` it makes can be counted; the
store must be complete and the well ``ok`` either way.
"""

from __future__ import annotations

import os

import pytest

from hcs_dask import Pipeline, Step, compile_plate, open_plate, run_well
from hcs_dask.options import OptionError, RunPolicy
from hcs_dask.store import Manifest
from hcs_dask.steps import max_projection


@pytest.fixture
def count_fsyncs(monkeypatch):
    calls = []
    real = os.fsync

    def counting(fd):
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


@pytest.mark.parametrize("fsync", [True, False], ids=["durable", "no-fsync"])
def test_fsync_option_decides_whether_a_well_flushes(synthetic_plate, tmp_path, count_fsyncs, fsync):
    pipeline = Pipeline([Step(max_projection, stack="z")])
    graph = compile_plate(open_plate(synthetic_plate), pipeline, tmp_path / "out.ome.zarr", fsync=fsync)
    plan = graph.plans[0]
    assert plan.fsync is fsync
    count_fsyncs.clear()  # the client's run.json is flushed in any case; the well is what is counted
    result = run_well(plan, pipeline)
    assert result.ok, result.error
    assert Manifest(graph.output).read_well(plan.well.name)["status"] == "ok"
    listed = (tmp_path / "out.ome.zarr" / plan.well.row / str(plan.well.column) / "zarr.json").read_text()
    assert '"path": "0"' in listed
    if fsync:
        assert count_fsyncs  # the well's files, its image list and its ok record
    else:
        assert count_fsyncs == []


def test_fsync_is_on_by_default_and_must_be_a_bool():
    assert RunPolicy().fsync is True
    with pytest.raises(OptionError, match="fsync"):
        RunPolicy(fsync="no")
