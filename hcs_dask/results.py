"""What a run returns: one :class:`ExecutionResult` per well, gathered in a :class:`PlateResult`."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["STATUSES", "ExecutionResult", "PlateResult"]

#: Well statuses. ``ok`` means the well's arrays are in the store.
STATUSES = ("ok", "failed", "worker_died", "timeout", "cancelled")


@dataclass
class ExecutionResult:
    """The outcome of one well task.

    ``memory`` holds what the cleanup did and left behind. The well's own figures:
    ``backend_bytes_before``, ``backend_bytes_after_cleanup`` and ``backend_bytes_freed``
    (its memory-backend scope), ``cleanup_seconds``, ``cleanups``, ``cleaner_errors`` and
    ``conversions``. Under ``memory["process"]``, the worker process's figures:
    ``rss_before_bytes``, ``rss_after_cleanup_bytes``, ``backend_bytes_before`` (every
    scope), ``gpu`` (per loaded framework: pool bytes before and after cleanup; None where
    a framework cannot say), ``threads``, and ``shared``: whether another well ran in the
    process meanwhile, in which case these figures are not this well's alone.

    ``attempts`` counts the runs that the well itself ended (a run lost to another
    well's worker death does not count); ``run`` is the token of the submission that
    produced the record.
    """

    well: str
    status: str
    seconds: float = 0.0
    started: float | None = None
    finished: float | None = None
    worker: str | None = None
    pid: int | None = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    step: str | None = None
    combination: dict[str, int] | None = None
    cause: str | None = None
    attempts: int = 1
    run: str | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    measurements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def record(self) -> dict[str, Any]:
        """Everything, as JSON-ready data: the well's manifest record in the store."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ExecutionResult:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in record.items() if k in known})

    def summary(self) -> dict[str, Any]:
        """A flat, JSON-ready record (what ``--summary`` writes per well)."""
        record = asdict(self)
        record.pop("measurements")
        memory = record["memory"]
        for flat in ("backend_bytes_before", "backend_bytes_after_cleanup", "cleanup_seconds"):
            record[flat] = memory.get(flat)
        process = memory.get("process", {})
        for flat in ("rss_before_bytes", "rss_after_cleanup_bytes", "shared"):
            record[f"process_{flat}"] = process.get(flat)
        return record


@dataclass
class PlateResult:
    """All wells' results, with the measurement table."""

    plate: str
    output: str
    wells: list[ExecutionResult]
    seconds: float = 0.0
    measurements_path: str | None = None

    def counts(self) -> dict[str, int]:
        counter = Counter(r.status for r in self.wells)
        return {status: counter[status] for status in STATUSES if counter[status]} | {
            s: n for s, n in counter.items() if s not in STATUSES
        }

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.wells)

    def failures(self) -> list[ExecutionResult]:
        return [r for r in self.wells if not r.ok]

    def __getitem__(self, well: str) -> ExecutionResult:
        for result in self.wells:
            if result.well == well:
                return result
        raise KeyError(well)

    @property
    def measurements(self) -> pd.DataFrame:
        """One row per well and per context a step measured in (e.g. per site)."""
        rows = [row for result in self.wells for row in result.measurements]
        if not rows:
            return pd.DataFrame({"well": pd.Series([], dtype=str)})
        frame = pd.DataFrame(rows)
        keys = [c for c in ("well", "site", "channel", "z", "timepoint") if c in frame.columns]
        return frame.sort_values(keys, kind="stable").reset_index(drop=True)

    def summary(self) -> dict[str, Any]:
        return {
            "plate": self.plate,
            "output": self.output,
            "measurements": self.measurements_path,
            "seconds": round(self.seconds, 3),
            "counts": self.counts(),
            "wells": [r.summary() for r in self.wells],
        }

    def write_summary(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.summary(), indent=2, default=str))

    def plot_plate(self, column: str = "nuclei_count", *, aggregate: str = "mean", ax: Any = None) -> Any:
        """A plate map of one measurement: a heat map of ``column`` per well.

        Wells that measured nothing (failed, or not imaged) stay blank. Returns the
        matplotlib ``Axes``.
        """
        import matplotlib.pyplot as plt
        import numpy as np

        from hcs_dask.plate import row_index, row_name, split_well_name

        table = self.measurements
        if column not in table.columns:
            known = ", ".join(c for c in table.columns if c not in ("well", "site", "timepoint", "channel", "z"))
            raise KeyError(f"no measurement {column!r}; measured: {known or 'nothing'}")
        per_well = table.groupby("well")[column].agg(aggregate)
        positions = {well: split_well_name(well) for well in [r.well for r in self.wells]}
        n_rows = max(row_index(r) for r, _ in positions.values()) + 1
        n_columns = max(c for _, c in positions.values())
        n_rows, n_columns = max(n_rows, 8), max(n_columns, 12)
        grid = np.full((n_rows, n_columns), np.nan)
        for well, value in per_well.items():
            row, column_number = positions.get(well, split_well_name(well))
            grid[row_index(row), column_number - 1] = value
        if ax is None:
            _, ax = plt.subplots(figsize=(1 + n_columns * 0.5, 1 + n_rows * 0.45))
        image = ax.imshow(grid, cmap="viridis")
        ax.set_xticks(range(n_columns), [str(c + 1) for c in range(n_columns)])
        ax.set_yticks(range(n_rows), [row_name(r) for r in range(n_rows)])
        ax.set_title(f"{self.plate}: {column} ({aggregate} per well)")
        ax.figure.colorbar(image, ax=ax, shrink=0.8)
        return ax

    def _repr_html_(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items())
        head = f"<b>{self.plate}</b>: {len(self.wells)} wells ({counts}) in {self.seconds:.1f} s → <code>{self.output}</code>"
        failures = self.failures()
        if not failures:
            return head
        rows = "".join(
            f"<tr><td>{r.well}</td><td>{r.status}</td><td>{r.step or ''}</td><td>{r.error_type or ''}: {r.error or r.cause or ''}</td></tr>"
            for r in failures
        )
        return f"{head}<table><tr><th>well</th><th>status</th><th>step</th><th>error</th></tr>{rows}</table>"

    def __repr__(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items())
        return f"PlateResult({self.plate!r}, {len(self.wells)} wells: {counts}, output={self.output!r})"
