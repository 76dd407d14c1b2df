"""A run seen while it runs: its HTML summary, plate map and redraws (the widgets themselves are
exercised in a real kernel by the quickstart notebook)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hcs_dask import live, submit_plate
from hcs_dask.formats import write_synthetic_plate

GRAPH = Path(__file__).parent / "faulty_graph.py"


@pytest.mark.slow
def test_a_running_plate_shows_counts_progress_failures_and_its_map(tmp_path, monkeypatch):
    root = write_synthetic_plate(tmp_path / "plate", wells=6, sites=1, channels=1, z=2, size=32, seed=3)
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"A01": "raise", **{f"A0{i}": "slow:0.7" for i in range(2, 7)}}))
    monkeypatch.setenv("HCS_DASK_TEST_FAULTS", str(faults))  # read by the workers the run starts
    run = submit_plate(root, GRAPH, tmp_path / "o.ome.zarr", n_workers=1)
    draws: list[bool] = []

    def draw() -> None:
        draws.append(run.done)

    view = live._Redrawer(run._driver, draw)
    deadline = time.monotonic() + 60
    while run.status().get("failed", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    html = run._repr_html_()
    assert "(running)" in html and "<progress" in html and 'target="_blank">dashboard</a>' in html
    assert ">A01<" in html and "RuntimeError: injected failure in A01" in html
    assert "wells ended" in html and 'title="A01: failed"' in html
    bundle = run._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html"}  # no widget outside Jupyter
    figure = run.plate_map()
    labels = [t.get_text() for t in figure.axes[1].get_yticklabels()]
    assert "failed (1)" in labels and any(label.startswith(("running", "queued")) for label in labels)
    result = run.result()
    assert result.counts() == {"ok": 5, "failed": 1}
    view.thread.join(10)  # the view's thread ends after one redraw that follows the end
    assert not view.thread.is_alive()
    assert len(draws) >= 2 and draws[-1] is True
    assert run._driver.listeners == []  # the view let go of the run
    done = run._repr_html_()
    assert "(done)" in done and "6/6 wells ended" in done
    labels = [t.get_text() for t in run.plate_map().axes[1].get_yticklabels()]
    assert labels == ["ok (5)", "failed (1)"]
