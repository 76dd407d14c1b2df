"""Plate maps drawn with matplotlib: well status, or one value per well as a heat map.

The figures are :class:`matplotlib.figure.Figure` objects on an Agg canvas, never
registered with ``pyplot``: they can be drawn on any thread (the live map of a run is
redrawn on one of its own), and a notebook full of them does not pile up open figures.
They carry a PNG repr, so Jupyter shows a returned figure once; a script saves it with
``figure.savefig(path)``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np

from hcs_dask._html import STATUS_COLOURS
from hcs_dask.plate import plate_geometry, row_index, row_name, split_well_name

__all__ = ["NOT_IMAGED_COLOUR", "draw_plate_map", "infer_geometry", "new_figure", "png_bytes"]

#: The face of a well the plate does not have (never imaged).
NOT_IMAGED_COLOUR = "#ffffff"
#: The mark of a well with no value because it did not succeed.
_NOT_OK_MARK = "x"


def infer_geometry(wells: list[str]) -> tuple[int, int]:
    """The smallest standard plate (at least 96 wells) holding these well names.

    >>> infer_geometry(["A01", "H12"])
    (8, 12)
    >>> infer_geometry(["P24"])
    (16, 24)
    >>> infer_geometry(["AF48"])
    (32, 48)
    """
    positions = [split_well_name(w) for w in wells] or [("A", 1)]
    rows, columns = plate_geometry(max(row_index(r) for r, _ in positions), max(c for _, c in positions))
    return max(rows, 8), max(columns, 12)


def new_figure(size: tuple[float, float]) -> Any:
    """A Figure on an Agg canvas, outside pyplot (safe off the main thread), that Jupyter shows as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = _figure_class()(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


@functools.cache
def _figure_class() -> type:
    from matplotlib.figure import Figure

    class ShownFigure(Figure):
        """A matplotlib Figure with a PNG repr: IPython shows it without pyplot's inline backend."""

        def _repr_png_(self) -> bytes:
            return png_bytes(self)

    ShownFigure.__qualname__ = "ShownFigure"  # found again by name (module __getattr__): it pickles
    return ShownFigure


def __getattr__(name: str) -> Any:
    # ShownFigure is made on first use, so that importing this module does not import matplotlib.
    if name == "ShownFigure":
        return _figure_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def png_bytes(figure: Any, dpi: int = 90) -> bytes:
    """The figure rendered as PNG."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _layout(columns: int) -> tuple[float, int]:
    """Inches per well and tick font size for a plate of ``columns`` columns."""
    if columns <= 12:
        return 0.42, 9
    if columns <= 24:
        return 0.3, 7
    return 0.19, 5


def draw_plate_map(
    geometry: tuple[int, int],
    statuses: Mapping[str, str],
    values: Mapping[str, float] | None = None,
    *,
    title: str = "",
    label: str = "",
    ax: Any = None,
    cmap: str = "viridis",
) -> Any:
    """Draw a plate map and return its matplotlib Figure.

    Parameters
    ----------
    geometry : (rows, columns)
        The plate's layout: (8, 12), (16, 24), (32, 48), ...
    statuses : mapping
        Well name → status of every well the plate has. Wells not in it were never
        imaged: they stay blank.
    values : mapping, optional
        Well name → value: a heat map with a colour bar labelled ``label``. Wells whose
        status is not ``ok`` are marked with a cross in their status colour, so a failed
        well never looks like a missing one. Without ``values``: a map of the statuses,
        with a colour bar naming them.
    title, label : str
        The figure's title; the colour bar's label.
    ax : matplotlib Axes, optional
        Draw into these axes instead of a new figure.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n_rows, n_columns = geometry
    inches, font = _layout(n_columns)
    own = ax is None
    if own:
        # Room for the colour bar: its status names need more than its numbers.
        figure = new_figure(((1.8 if values is not None else 2.8) + n_columns * inches, 1.0 + n_rows * inches))
        ax = figure.add_subplot()
    figure = ax.figure
    positions = {well: (row_index(row), column - 1)
                 for well, (row, column) in ((w, split_well_name(w)) for w in statuses)}
    legend = []
    if values is not None:
        grid = np.full((n_rows, n_columns), np.nan)
        for well, value in values.items():
            if well in positions and value is not None:
                grid[positions[well]] = value
        colour_map = _colour_map(cmap)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=colour_map, aspect="equal", interpolation="nearest")
        figure.colorbar(image, ax=ax, shrink=0.85, label=label)
        not_ok: dict[str, list[tuple[int, int]]] = {}
        for well, status in statuses.items():
            if status != "ok":
                not_ok.setdefault(status, []).append(positions[well])
        for status, cells in sorted(not_ok.items()):
            colour = STATUS_COLOURS.get(status, "#424242")
            ys, xs = zip(*cells)
            ax.scatter(xs, ys, marker=_NOT_OK_MARK, s=(inches * 40) ** 2, c=colour, linewidths=1.5)
            legend.append(Line2D([], [], marker=_NOT_OK_MARK, linestyle="", color=colour, label=status))
    else:
        order = [s for s in STATUS_COLOURS if s in set(statuses.values())]
        order += sorted(set(statuses.values()) - set(order))
        codes = {status: i for i, status in enumerate(order)}
        grid = np.full((n_rows, n_columns), np.nan)
        for well, status in statuses.items():
            grid[positions[well]] = codes[status]
        colour_map = ListedColormap([STATUS_COLOURS.get(s, "#424242") for s in order] or ["#ffffff"]).with_extremes(
            bad=NOT_IMAGED_COLOUR)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=colour_map, vmin=-0.5,
                          vmax=max(len(order), 1) - 0.5, aspect="equal", interpolation="nearest")
        bar = figure.colorbar(image, ax=ax, shrink=0.85, ticks=range(len(order)), label=label or "status")
        bar.ax.set_yticklabels([f"{s} ({sum(1 for v in statuses.values() if v == s)})" for s in order])
    if len(statuses) < n_rows * n_columns:
        legend.append(Patch(facecolor=NOT_IMAGED_COLOUR, edgecolor="#bdbdbd", label="not imaged"))
    ax.set_xticks(range(n_columns), [str(c + 1) for c in range(n_columns)], fontsize=font)
    ax.set_yticks(range(n_rows), [row_name(r) for r in range(n_rows)], fontsize=font)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_xticks(np.arange(-0.5, n_columns, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows, 1), minor=True)
    ax.grid(which="minor", color="#bdbdbd", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    if legend:
        ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(0, -0.01), ncol=min(len(legend), 4),
                  fontsize=font + 1, frameon=False)
    if title and own:
        # A figure title: the constrained layout leaves no room for an axes title above top ticks.
        figure.suptitle(title, fontsize=font + 3)
    elif title:
        ax.set_title(title, fontsize=font + 3, pad=font + 8)
    return figure


def _colour_map(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=NOT_IMAGED_COLOUR)
