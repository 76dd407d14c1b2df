"""Live views of a plate run in a notebook: an HTML summary and a plate map that follow the run.

A view is an ipywidgets widget (``HTML`` or ``Output``) redrawn by a thread of its own
when the run's driver reports a finished well (``_Driver.listeners``), and every couple
of seconds for the wells that start. The kernel is never blocked: the driver only sets
an event, and the drawing happens on the view's thread. Outside Jupyter (or without
ipywidgets) the same functions return a snapshot instead.
"""

from __future__ import annotations

import base64
import logging
import sys
import threading
from typing import Any, Callable

from hcs_dask._html import STATUS_COLOURS, escape, plate_grid, table
from hcs_dask.platemap import draw_plate_map, png_bytes

__all__ = ["in_jupyter", "live_summary", "plate_map", "run_html", "snapshot_figure"]

logger = logging.getLogger("hcs_dask")

#: Fewest seconds between two redraws of one view; most seconds without one while the run goes on.
MIN_REDRAW_SECONDS = 0.5
MAX_REDRAW_SECONDS = 2.0


def in_jupyter() -> bool:
    """Whether this process is a Jupyter kernel."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ipython = shell.get_ipython()
    except AttributeError:
        return False
    return ipython is not None and "IPKernelApp" in getattr(ipython, "config", {})


def _widgets() -> Any:
    """The ipywidgets module inside a Jupyter kernel, else None."""
    if not in_jupyter():
        return None
    try:
        import ipywidgets
    except ImportError:
        return None
    return ipywidgets


def run_html(driver: Any) -> str:
    """A run as HTML now: counts, a progress bar, the dashboard link, failures so far, a plate grid."""
    graph = driver.graph
    statuses = driver.statuses()
    counts = driver.counts()
    total = len(statuses)
    ended = sum(n for status, n in counts.items() if status not in ("queued", "running"))
    state = "done" if driver.finished.is_set() else "running"
    link = getattr(driver.client, "dashboard_link", None) if not driver.finished.is_set() else None
    dashboard = f' · <a href="{escape(link)}" target="_blank">dashboard</a>' if link else ""
    parts = [
        f"<b>{escape(graph.plate.name)}</b> ({state}): "
        f"{escape(', '.join(f'{n} {s}' for s, n in counts.items()))}{dashboard} → "
        f"<code>{escape(graph.output)}</code>",
        f'<div><progress value="{ended}" max="{max(total, 1)}" style="width:20em"></progress> '
        f"{ended}/{total} wells ended</div>",
    ]
    if driver.stopped:
        parts.append(f'<div style="color:#c62828">stopped early: {escape(driver.stopped)}</div>')
    failures = [r for r in driver.final_results() if not r.ok]
    if failures:
        parts.append(table(["well", "status", "error", "step"], (
            (r.well, r.status, f"{r.error_type}: {r.error}" if r.error_type else (r.error or r.cause or ""),
             r.step or "") for r in failures), limit=10))
    parts.append(plate_grid(graph.plate.plate_rows, graph.plate.plate_columns, statuses, STATUS_COLOURS))
    return "".join(parts)


def snapshot_figure(driver: Any) -> Any:
    """The run's plate map of well status now, as a matplotlib Figure."""
    plate = driver.graph.plate
    state = "done" if driver.finished.is_set() else "running"
    return draw_plate_map((plate.plate_rows, plate.plate_columns), driver.statuses(),
                          title=f"{plate.name}: well status ({state})")


class _Redrawer:
    """Calls ``draw`` on a thread of its own after each finished well (at most every half second),
    every couple of seconds while the run goes on, and once more when it has ended."""

    def __init__(self, driver: Any, draw: Callable[[], None]) -> None:
        self.driver = driver
        self.draw = draw
        self.wake = threading.Event()
        self.listener = lambda result: self.wake.set()
        driver.listeners.append(self.listener)
        self.thread = threading.Thread(target=self._loop, name=f"hcs-dask-view-{driver.graph.plate.name}",
                                       daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            while True:
                ended = self.driver.finished.is_set()
                try:
                    self.draw()
                except Exception as error:  # a display must never take the run down
                    logger.warning("redrawing a live view failed: %s: %s", type(error).__name__, error)
                if ended:
                    return
                self.driver.finished.wait(MIN_REDRAW_SECONDS)
                self.wake.wait(MAX_REDRAW_SECONDS)
                self.wake.clear()
        finally:
            try:
                self.driver.listeners.remove(self.listener)
            except ValueError:
                pass


def plate_map(driver: Any) -> Any:
    """In Jupyter: an ``ipywidgets.Output`` holding the run's plate map, redrawn as wells end.

    Elsewhere (or without ipywidgets): the plate map now, as a matplotlib Figure.
    """
    widgets = _widgets()
    if widgets is None:
        return snapshot_figure(driver)
    output = widgets.Output()

    def draw() -> None:
        png = base64.b64encode(png_bytes(snapshot_figure(driver))).decode()
        # Set, not `with output:` — the context manager routes output only on the kernel's own thread.
        output.outputs = ({"output_type": "display_data", "metadata": {},
                           "data": {"image/png": png, "text/plain": f"plate map of {driver.graph.plate.name}"}},)

    _Redrawer(driver, draw)
    return output


def live_summary(driver: Any) -> Any:
    """In Jupyter: an ``ipywidgets.HTML`` of :func:`run_html`, redrawn as wells end; else None."""
    widgets = _widgets()
    if widgets is None:
        return None
    view = widgets.HTML(value=run_html(driver))

    def draw() -> None:
        view.value = run_html(driver)

    _Redrawer(driver, draw)
    return view
