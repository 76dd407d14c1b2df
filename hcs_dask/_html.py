"""Small HTML pieces for the notebook reprs: escaped text, tables and a plate grid.

Every text that comes from data (well names, error messages, file and channel names)
goes through :func:`escape`, so that an error message cannot inject markup.
"""

from __future__ import annotations

import html
import itertools
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["STATUS_COLOURS", "escape", "plate_grid", "table"]

#: Colours of well statuses, shared by the HTML grids and the matplotlib plate maps.
STATUS_COLOURS: dict[str, str] = {
    "ok": "#43a047",
    "failed": "#e53935",
    "worker_died": "#8e24aa",
    "timeout": "#fb8c00",
    "cancelled": "#9e9e9e",
    "skipped": "#fdd835",
    "not_started": "#cfd8dc",
    "running": "#1e88e5",
    "queued": "#bbdefb",
}

_grid_ids = itertools.count()


def escape(value: Any) -> str:
    """``str(value)`` with ``&``, ``<``, ``>`` and quotes escaped; ``None`` is empty.

    >>> escape("<script>alert(1)</script>")
    '&lt;script&gt;alert(1)&lt;/script&gt;'
    """
    return "" if value is None else html.escape(str(value), quote=True)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, limit: int | None = None) -> str:
    """An HTML table of escaped cells; past ``limit`` rows, one line says how many more there are.

    >>> table(["well"], [["A01"], ["<b>"]])
    '<table><tr><th style="text-align:left">well</th></tr><tr><td style="text-align:left">A01</td></tr><tr><td style="text-align:left">&lt;b&gt;</td></tr></table>'
    """
    rows = list(rows)
    shown = rows if limit is None else rows[:limit]
    head = "".join(f'<th style="text-align:left">{escape(h)}</th>' for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td style="text-align:left">{escape(cell)}</td>' for cell in row) + "</tr>"
        for row in shown
    )
    more = ""
    if len(rows) > len(shown):
        more = f'<tr><td colspan="{len(header)}">… and {len(rows) - len(shown)} more</td></tr>'
    return f"<table><tr>{head}</tr>{body}{more}</table>"


def plate_grid(
    rows: int,
    columns: int,
    classes: Mapping[str, str],
    colours: Mapping[str, str],
    *,
    labels: Mapping[str, str] | None = None,
) -> str:
    """A plate as a grid of small coloured cells, one per well, with row letters and column numbers.

    ``classes`` maps a well name (``"B03"``) to a class (a status, ``"present"``, …) whose
    colour is ``colours[class]``; wells not in ``classes`` are drawn empty. The classes
    seen get a legend, with ``labels[class]`` as their text where given. One ``<style>``
    block colours the cells, so a 1536-well grid stays a few tens of kB.
    """
    from hcs_dask.plate import row_index, row_name, split_well_name

    by_position = {}
    for well, cls in classes.items():
        row, column = split_well_name(well)
        by_position[(row_index(row), column)] = (well, cls)
    grid_id = f"hcs-grid-{next(_grid_ids)}"
    used = sorted(set(classes.values()), key=lambda c: list(colours).index(c) if c in colours else len(colours))
    codes = {cls: f"c{i}" for i, cls in enumerate(used)}
    size = 11 if columns <= 12 else 8 if columns <= 24 else 5
    font = 9 if columns <= 24 else 7
    style = (
        f"#{grid_id} table{{border-collapse:collapse;margin:2px 0}}"
        f"#{grid_id} td{{width:{size}px;height:{size}px;padding:0;border:1px solid #e0e0e0}}"
        f"#{grid_id} th{{font-size:{font}px;font-weight:normal;padding:0 2px;color:#555}}"
        + "".join(f"#{grid_id} td.{code}{{background:{colours.get(cls, '#90a4ae')}}}" for cls, code in codes.items())
    )
    # Column numbers on every column up to 24; on 1536-well plates every fourth.
    step = 1 if columns <= 24 else 4
    header = "<tr><th></th>" + "".join(
        f"<th>{c}</th>" if (c == 1 or c % step == 0) else "<th></th>" for c in range(1, columns + 1)) + "</tr>"
    titled = rows * columns <= 384
    lines = [header]
    for r in range(rows):
        letter = row_name(r)
        cells = []
        for c in range(1, columns + 1):
            name, cls = by_position.get((r, c), (f"{letter}{c:02d}", None))
            attributes = f' class="{codes[cls]}"' if cls is not None else ""
            if titled:
                attributes += f' title="{escape(name)}{": " + escape(cls) if cls else ""}"'
            cells.append(f"<td{attributes}></td>")
        lines.append(f"<tr><th>{letter}</th>{''.join(cells)}</tr>")
    legend = " ".join(
        f'<span style="display:inline-block;width:9px;height:9px;background:{colours.get(cls, "#90a4ae")};'
        f'border:1px solid #bbb"></span>&nbsp;{escape((labels or {}).get(cls, cls))}'
        for cls in used
    )
    return (f'<div id="{grid_id}"><style>{style}</style><table>{"".join(lines)}</table>'
            f'<div style="font-size:{font + 2}px">{legend}</div></div>')
