"""What a run returns: one :class:`ExecutionResult` per well, gathered in a :class:`PlateResult`.

A :class:`PlateResult` is also the way into a finished plate from a notebook: its tables
(:meth:`~PlateResult.to_dataframe`, :attr:`~PlateResult.measurements`), plate maps
(:meth:`~PlateResult.plot_plate`), a well's pixels (:meth:`~PlateResult.image`,
:meth:`~PlateResult.show_well`), and a second run of the wells that did not succeed
(:meth:`~PlateResult.rerun_failed`). :meth:`PlateResult.load` rebuilds one from a store.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["STATUSES", "ExecutionResult", "PlateResult"]

#: Well statuses. ``ok`` means the well's arrays are in the store; ``skipped``: the well
#: lacks images and the run was asked to skip such wells; ``not_started``: a loaded store
#: has no record of the well.
STATUSES = ("ok", "failed", "worker_died", "timeout", "cancelled", "skipped", "not_started")

#: The columns of :attr:`PlateResult.measurements` that say where a row was measured.
CONTEXT_COLUMNS = ("well", "site", "channel", "z", "timepoint")


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
    produced the record; ``pipeline`` the fingerprint of the pipeline that ran the well.
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
    pipeline: str | None = None
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

    def memory_columns(self) -> dict[str, Any]:
        """``memory`` as flat columns: the well's figures by name, the process's as ``process_*``.

        Nested figures join their keys with ``_`` (``process_gpu_cupy_after``,
        ``conversions_to_device_bytes``); ``cleaner_errors`` becomes one string.

        >>> ExecutionResult("A01", "ok", memory={"cleanup_seconds": 0.001, "cleaner_errors": [],
        ...     "process": {"shared": False, "gpu": {"cupy": {"before": 8, "after": 0}}}}).memory_columns()
        {'cleanup_seconds': 0.001, 'cleaner_errors': '', 'process_shared': False, 'process_gpu_cupy_before': 8, 'process_gpu_cupy_after': 0}
        """
        columns: dict[str, Any] = {}

        def flatten(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    flatten(f"{prefix}_{key}" if prefix else str(key), inner)
            elif isinstance(value, list):
                columns[prefix] = "; ".join(str(v) for v in value)
            else:
                columns[prefix] = value

        flatten("", self.memory)
        return columns


@dataclass
class PlateResult:
    """All wells' results, with the measurement table, and the way into the output store.

    Parameters
    ----------
    plate, output
        The plate's name; the ``.ome.zarr`` store the wells were written to.
    wells
        One :class:`ExecutionResult` per well of the store, in plate order.
    seconds
        How long the run took (for a loaded store: first start to last finish).
    measurements_path
        The measurement table beside the store (CSV or Parquet), where one was written.
    geometry
        ``(rows, columns)`` of the plate (8×12, 16×24, 32×48, ...).
    sites, channels, channel_names
        The plate's site and channel numbers, and channel names by number.
    plate_root
        The plate folder the run read (what :meth:`rerun_failed` opens again).
    stopped
        Why the run stopped submitting wells before the end, if it did.
    tables
        The tables written inside the store (``tables/<name>``).
    source_plate, pipeline
        The :class:`~hcs_dask.Plate` and :class:`~hcs_dask.Pipeline` of the run
        (``None`` for a loaded store): what :meth:`rerun_failed` reuses.
    """

    plate: str
    output: str
    wells: list[ExecutionResult]
    seconds: float = 0.0
    measurements_path: str | None = None
    geometry: tuple[int, int] | None = None
    sites: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()
    channel_names: dict[int, str] = field(default_factory=dict)
    plate_root: str | None = None
    stopped: str | None = None
    tables: list[str] = field(default_factory=list)
    source_plate: Any = field(default=None, repr=False, compare=False)
    pipeline: Any = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------ counting
    def counts(self) -> dict[str, int]:
        counter = Counter(r.status for r in self.wells)
        return {status: counter[status] for status in STATUSES if counter[status]} | {
            s: n for s, n in counter.items() if s not in STATUSES
        }

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.wells)

    def failures(self) -> list[ExecutionResult]:
        """The wells that are not ``ok`` (failed, died, timed out, cancelled, skipped, ...)."""
        return [r for r in self.wells if not r.ok]

    def __getitem__(self, well: str) -> ExecutionResult:
        for result in self.wells:
            if result.well == well:
                return result
        raise KeyError(f"plate {self.plate!r} has no well {well!r} in {self.output}")

    def pipelines(self) -> dict[str, int]:
        """How many ``ok`` wells each pipeline fingerprint produced (unknown ones left out)."""
        return dict(Counter(r.pipeline for r in self.wells if r.ok and r.pipeline))

    @property
    def mixed(self) -> bool:
        """Whether the ``ok`` wells come from more than one version of the pipeline."""
        return len(self.pipelines()) > 1

    def mixed_text(self) -> str:
        """A sentence naming the pipeline versions of the ``ok`` wells and how many wells each made."""
        parts = ", ".join(f"{digest[:8]}: {n} wells" for digest, n in
                          sorted(self.pipelines().items(), key=lambda item: -item[1]))
        return f"mixed: the ok wells come from {len(self.pipelines())} versions of the pipeline ({parts})"

    # -------------------------------------------------------------- tables
    @property
    def measurements(self) -> pd.DataFrame:
        """One row per well and per context a step measured in (e.g. per site)."""
        import pandas as pd  # with the first table, not with hcs_dask

        rows = [row for result in self.wells for row in result.measurements]
        if not rows:
            return pd.DataFrame({"well": pd.Series([], dtype=str)})
        frame = pd.DataFrame(rows)
        keys = [c for c in CONTEXT_COLUMNS if c in frame.columns]
        return frame.sort_values(keys, kind="stable").reset_index(drop=True)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per well: status, error, timings (UTC datetimes), worker, and memory figures.

        The memory figures are flat columns (:meth:`ExecutionResult.memory_columns`): the
        well's own by name (``backend_bytes_after_cleanup``, ``cleanup_seconds``, ...), the
        worker process's as ``process_*`` (``process_rss_after_cleanup_bytes``, and
        ``process_shared``: whether those were shared with another well).
        """
        import pandas as pd  # with the first table, not with hcs_dask

        from hcs_dask.plate import split_well_name

        rows = []
        for r in self.wells:
            row_letter, column = split_well_name(r.well)
            rows.append({
                "well": r.well, "row": row_letter, "column": column, "status": r.status,
                "attempts": r.attempts, "seconds": r.seconds, "started": r.started, "finished": r.finished,
                "worker": r.worker, "pid": r.pid, "step": r.step, "error_type": r.error_type,
                "error": r.error, "cause": r.cause, "pipeline": r.pipeline, **r.memory_columns(),
            })
        frame = pd.DataFrame(rows, columns=None if rows else ["well", "status"])
        for column in ("started", "finished"):
            if column in frame:
                frame[column] = pd.to_datetime(frame[column].astype("float64"), unit="s", utc=True)
        return frame

    def summary(self) -> dict[str, Any]:
        return {
            "plate": self.plate,
            "output": self.output,
            "measurements": self.measurements_path,
            "seconds": round(self.seconds, 3),
            "counts": self.counts(),
            "mixed": self.mixed,
            "pipelines": self.pipelines(),
            "stopped": self.stopped,
            "wells": [r.summary() for r in self.wells],
        }

    def write_summary(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.summary(), indent=2, default=str))

    # --------------------------------------------------------------- plots
    def _geometry(self) -> tuple[int, int]:
        from hcs_dask.platemap import infer_geometry

        return self.geometry or infer_geometry([r.well for r in self.wells])

    def _channel_number(self, channel: int | str) -> int:
        if isinstance(channel, str) and not channel.isdigit():
            for number, name in self.channel_names.items():
                if name == channel:
                    return int(number)
            known = ", ".join(f"{n} ({name})" for n, name in sorted(self.channel_names.items())) or "none named"
            raise KeyError(f"plate {self.plate!r} has no channel named {channel!r}; channels: {known}")
        return int(channel)

    def plot_plate(self, metric: str = "status", channel: int | str | None = None, *,
                   aggregate: str = "mean", ax: Any = None) -> Any:
        """A plate map: each well's status, or a heat map of one measurement.

        Parameters
        ----------
        metric : str
            ``"status"`` (the default), or a column of :attr:`measurements`.
        channel : int or str, optional
            For a measurement made per channel (its rows carry a ``channel``): the channel
            to show, by number or name. Channels are never averaged together.
        aggregate : str
            How the rows of one well (its sites, ...) are combined: any pandas
            aggregation (``"mean"``, ``"median"``, ``"sum"``, ``"max"``).
        ax : matplotlib Axes, optional
            Draw into these axes.

        Returns
        -------
        matplotlib.figure.Figure
            Wells not ``ok`` are marked with a cross in their status colour; wells the
            plate does not have stay blank.

        Raises
        ------
        KeyError
            For a measurement that does not exist, naming those that do.
        ValueError
            For a per-channel measurement without ``channel=`` (or a channel it lacks).
        """
        from hcs_dask.platemap import draw_plate_map

        statuses = {r.well: r.status for r in self.wells}
        mixed = f" · {len(self.pipelines())} pipeline versions" if self.mixed else ""
        if metric == "status":
            if channel is not None:
                raise ValueError("plot_plate('status') takes no channel=")
            return draw_plate_map(self._geometry(), statuses, title=f"{self.plate}: well status{mixed}", ax=ax)
        table = self.measurements
        if metric not in table.columns or metric in CONTEXT_COLUMNS:
            known = ", ".join(c for c in table.columns if c not in CONTEXT_COLUMNS)
            raise KeyError(f"no measurement {metric!r}; measured: {known or 'nothing'} (or 'status')")
        rows = table[table[metric].notna()]
        per_channel = "channel" in rows.columns and rows["channel"].notna().any()
        label = metric
        if per_channel:
            present = sorted(int(c) for c in rows["channel"].dropna().unique())
            names = ", ".join(f"{c} ({self.channel_names.get(c, f'w{c}')})" for c in present)
            if channel is None:
                raise ValueError(f"{metric!r} is measured per channel ({names}); choose one with channel=")
            number = self._channel_number(channel)
            if number not in present:
                raise ValueError(f"{metric!r} has no values for channel {channel!r}; its channels: {names}")
            rows = rows[rows["channel"] == number]
            label = f"{metric} ({self.channel_names.get(number, f'w{number}')})"
        elif channel is not None:
            raise ValueError(f"{metric!r} is not measured per channel; leave out channel=")
        values = rows.groupby("well")[metric].agg(aggregate)
        several = bool(rows.groupby("well").size().max() > 1) if len(rows) else False
        title = f"{self.plate}: {label}" + (f" ({aggregate} per well)" if several else "") + mixed
        return draw_plate_map(self._geometry(), statuses, values.to_dict(), title=title, label=label, ax=ax)

    # -------------------------------------------------------------- pixels
    def _field(self, well: str, site: int | None) -> tuple[str, dict]:
        """The store path of a well's field and its group attributes."""
        import zarr

        from hcs_dask.plate import split_well_name

        result = self[well]
        row, column = split_well_name(well)
        well_attrs = zarr.open_group(self.output, path=f"{row}/{column}", mode="r").attrs.asdict()
        images = [image["path"] for image in well_attrs.get("ome", {}).get("well", {}).get("images", [])]
        if not images:
            why = f"its status is {result.status!r}" + (f" ({result.error_type}: {result.error})" if result.error else "")
            raise ValueError(f"well {well} has no image in {self.output}: {why}")
        if site is None:
            path = images[0]
        else:
            if not self.sites:
                raise ValueError(f"the sites of plate {self.plate!r} are not known here; leave out site=")
            if site not in self.sites:
                raise KeyError(f"plate {self.plate!r} has no site {site}; sites: {', '.join(map(str, self.sites))}")
            path = str(self.sites.index(site))
            if path not in images:
                raise KeyError(f"well {well} has no field for site {site} in {self.output}")
        field_path = f"{row}/{column}/{path}"
        attrs = zarr.open_group(self.output, path=field_path, mode="r").attrs.asdict()
        return field_path, attrs.get("ome", attrs)

    def image(self, well: str, site: int | None = None, channel: int | str | None = None, level: int = 0, *,
              z: int | None = None, timepoint: int | None = None) -> Any:
        """A well's field from the output store, as a lazy dask array (nothing is read yet).

        Parameters
        ----------
        well : str
            ``"B03"``.
        site : int, optional
            The plate's site number; the first field by default.
        channel : int or str, optional
            A channel number of the plate, or a channel name of the output (e.g.
            ``"DAPI"``); all channels by default.
        level : int
            The pyramid level: 0 is full resolution, each next level half the size.
        z, timepoint : int, optional
            Positions along the output's ``z`` and ``t`` axes (0-based; a pipeline
            may have reduced them); all by default.

        Returns
        -------
        dask.array.Array
            The field's axes (``c, z, y, x`` or ``t, c, z, y, x``) without those selected.

        Raises
        ------
        KeyError, ValueError
            For a well, site, channel or level the store does not have, naming it; for a
            well that is not ``ok`` (it has no image), with its status and error.
        """
        import dask.array as da
        import zarr

        path, ome = self._field(well, site)
        multiscale = ome["multiscales"][0]
        axes = [axis["name"] for axis in multiscale["axes"]]
        levels = [dataset["path"] for dataset in multiscale["datasets"]]
        if not 0 <= level < len(levels):
            raise KeyError(f"well {well}: no pyramid level {level}; levels 0–{len(levels) - 1}")
        array = zarr.open_array(self.output, path=f"{path}/{levels[level]}", mode="r")
        data = da.from_zarr(array)
        selection: list[Any] = [slice(None)] * len(axes)
        labels = [c.get("label") for c in ome.get("omero", {}).get("channels", [])]
        if channel is not None and "c" in axes:
            selection[axes.index("c")] = self._channel_index(channel, labels, array.shape[axes.index("c")])
        for axis, value in (("z", z), ("t", timepoint)):
            if value is None or (axis not in axes and value == 0):  # a field without t has one timepoint
                continue
            extent = array.shape[axes.index(axis)] if axis in axes else 1
            if not 0 <= value < extent:
                raise KeyError(f"well {well}: no {axis} position {value}; the output has {extent}")
            selection[axes.index(axis)] = value
        return data[tuple(selection)]

    def _channel_index(self, channel: int | str, labels: Sequence[str | None], extent: int) -> int:
        if isinstance(channel, str) and not channel.isdigit():
            if channel in labels:
                return labels.index(channel)
            raise KeyError(f"no channel {channel!r} in the output; its channels: {', '.join(map(str, labels))}")
        number = int(channel)
        if self.channels and len(self.channels) == extent and number in self.channels:
            return self.channels.index(number)
        raise KeyError(f"no channel {channel!r} in the output ({extent} channels: "
                       f"{', '.join(map(str, labels))}); name it, e.g. channel={labels[0]!r}")

    def show_well(self, well: str, site: int | None = None, *, channels: Sequence[int | str] | None = None,
                  level: int = 0, z: int | None = None, timepoint: int = 0, ax: Any = None) -> Any:
        """A colour composite of a well's field, with the channel names of the metadata.

        Each channel is scaled to its ``omero`` window (``start``–``end``) and drawn in its
        ``omero`` colour; the colours add up. Several z planes are shown as their maximum
        projection unless ``z=`` picks one. Returns the matplotlib Figure.
        """
        import numpy as np

        from hcs_dask.platemap import new_figure

        path, ome = self._field(well, site)
        omero = ome.get("omero", {}).get("channels", [])
        data = self.image(well, site, level=level, timepoint=timepoint, z=z)
        if data.ndim == 4:  # (c, z, y, x): no z chosen
            data = data.max(axis=1)
        pixels = np.asarray(data.compute(), dtype=np.float32)  # (c, y, x)
        wanted = range(pixels.shape[0]) if channels is None else [
            self._channel_index(c, [entry.get("label") for entry in omero], pixels.shape[0]) for c in channels]
        composite = np.zeros((*pixels.shape[1:], 3), dtype=np.float32)
        names = []
        for index in wanted:
            entry = omero[index] if index < len(omero) else {}
            window = entry.get("window", {})
            low, high = window.get("start"), window.get("end")
            if low is None or high is None or high <= low:
                low, high = (float(v) for v in np.percentile(pixels[index], (0.5, 99.8)))
            scaled = np.clip((pixels[index] - low) / max(high - low, 1e-12), 0, 1)
            colour = entry.get("color", "FFFFFF")
            rgb = np.array([int(colour[i:i + 2], 16) / 255 for i in (0, 2, 4)], dtype=np.float32)
            composite += scaled[..., None] * rgb
            names.append((entry.get("label", f"channel {index}"), f"#{colour}"))
        if ax is None:
            height, width = composite.shape[:2]
            figure = new_figure((6.0, 6.0 * height / width + 0.6))
            ax = figure.add_subplot()
        ax.imshow(np.clip(composite, 0, 1), interpolation="nearest")
        ax.set_axis_off()
        field_index = int(path.rsplit("/", 1)[1])
        if site is None and field_index < len(self.sites):
            site = self.sites[field_index]
        where = f"site {site}" if site is not None else f"field {field_index}"
        ax.set_title(f"{self.plate} {well} {where}", fontsize=10)
        for i, (name, colour) in enumerate(names):
            ax.text(0.01, 0.99 - 0.06 * i, str(name), color=colour, transform=ax.transAxes, va="top",
                    fontsize=9, fontweight="bold", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1.5})
        return ax.figure

    # -------------------------------------------------------------- re-run
    def rerun_failed(self, pipeline: Any = None, client: Any = None, allow_changed: bool = False,
                     **options: Any) -> PlateResult:
        """Run again exactly the wells that are not ``ok``, into the same store, and return the new result.

        A resume (``resume=True``) of the same plate: the ``ok`` wells stay as they are.

        Parameters
        ----------
        pipeline : Pipeline, graph name or pipeline file, optional
            The pipeline to run; by default the one of this result's run. A pipeline that
            differs from the run's (a fixed step, say) is refused unless ``allow_changed``.
        client : distributed.Client, optional
            As for :func:`hcs_dask.run_plate`.
        allow_changed : bool
            Accept a changed pipeline. The store then holds wells of several pipeline
            versions; every well's record says which (``ExecutionResult.pipeline``), and
            :attr:`mixed` is True.
        **options
            Further run options, as for :func:`hcs_dask.run_plate`.

        Raises
        ------
        ResumeError
            If the plate differs, or the pipeline differs and ``allow_changed`` is False;
            the message names the step that changed.
        ValueError
            If no pipeline is known (a loaded result) and none is given.
        """
        # Imported here: the driver makes PlateResults, so this module cannot import it at the top.
        from hcs_dask.driver import run_plate

        if not self.failures():
            return self
        pipeline = pipeline if pipeline is not None else self.pipeline
        if pipeline is None:
            raise ValueError(f"{self.output}: the pipeline of this run is not known here (a loaded result); "
                             "pass rerun_failed(pipeline=...)")
        options.setdefault("skip_incomplete", any(r.status == "skipped" for r in self.wells))
        return run_plate(self._open_plate(), pipeline, self.output, client, resume=True,
                         accept_changed_pipeline=allow_changed, **options)

    def _open_plate(self) -> Any:
        if self.source_plate is not None:
            return self.source_plate
        if not self.plate_root:
            raise ValueError(f"{self.output}: the plate folder of this run is not recorded")
        from hcs_dask.formats import open_plate

        plate = open_plate(self.plate_root)
        names = [r.well for r in self.wells]
        return plate if [w.name for w in plate.wells] == names else plate.select(names)

    # ---------------------------------------------------------------- load
    @classmethod
    def load(cls, output: str | os.PathLike[str]) -> PlateResult:
        """Rebuild the result of the runs into ``output`` from its manifest (e.g. after a kernel restart).

        Wells without a record are ``not_started``. The pipeline object is not stored:
        :meth:`rerun_failed` of a loaded result needs ``pipeline=``.

        Raises
        ------
        OutputError
            If ``output`` is not a store written by hcs_dask.
        """
        from hcs_dask.plate import split_well_name
        from hcs_dask.store import Manifest, OutputError, measurements_path

        output = Path(output).absolute()
        manifest = Manifest(output)
        run = manifest.read_run() if output.is_dir() else None
        if run is None:
            raise OutputError(f"{output}: not a store written by hcs_dask (no run manifest in it)")
        plate_meta = json.loads((output / "zarr.json").read_bytes())["attributes"]["ome"]["plate"]
        records = manifest.read_wells()
        by_position = {split_well_name(name): name for name in records}
        wells = []
        for entry in plate_meta["wells"]:
            row, column = entry["path"].split("/")
            name = by_position.get((row, int(column)), f"{row}{int(column):02d}")
            record = records.get(name)
            wells.append(ExecutionResult.from_record(record) if record else ExecutionResult(name, "not_started"))
        starts = [r.started for r in wells if r.started]
        ends = [r.finished for r in wells if r.finished]
        side_car = measurements_path(output)
        found = next((str(p) for p in (side_car, side_car.with_suffix(".parquet")) if p.exists()), None)
        tables_attrs = output / "tables" / "zarr.json"
        tables = json.loads(tables_attrs.read_bytes())["attributes"].get("tables", []) if tables_attrs.exists() else []
        return cls(
            plate=run.get("plate", output.name), output=str(output), wells=wells,
            seconds=(max(ends) - min(starts)) if starts and ends else 0.0, measurements_path=found,
            geometry=tuple(run["plate_geometry"]) if run.get("plate_geometry") else None,  # type: ignore[arg-type]
            sites=tuple(run.get("sites", ())), channels=tuple(run.get("channels", ())),
            channel_names={int(k): v for k, v in run.get("channel_names", {}).items()},
            plate_root=run.get("plate_root"), tables=list(tables),
        )

    # -------------------------------------------------------------- reprs
    def _timing_text(self) -> str:
        seconds = [r.seconds for r in self.wells if r.seconds]
        if not seconds:
            return f"{self.seconds:.1f} s"
        return (f"{self.seconds:.1f} s; per well median {statistics.median(seconds):.2f} s, "
                f"max {max(seconds):.2f} s")

    def _repr_html_(self) -> str:
        from hcs_dask._html import STATUS_COLOURS, escape, plate_grid, table

        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items())
        parts = [f"<b>{escape(self.plate)}</b>: {len(self.wells)} wells ({escape(counts)}) in "
                 f"{escape(self._timing_text())} → <code>{escape(self.output)}</code>"]
        if self.mixed:
            parts.append(f'<div style="color:#b26a00">{escape(self.mixed_text())}</div>')
        if self.stopped:
            parts.append(f'<div style="color:#c62828">stopped early: {escape(self.stopped)}</div>')
        failures = self.failures()
        if failures:
            parts.append(table(["well", "status", "error", "step"], (
                (r.well, r.status, f"{r.error_type}: {r.error}" if r.error_type else (r.error or r.cause or ""),
                 r.step or "") for r in failures), limit=20))
        rows, columns = self._geometry()
        parts.append(plate_grid(rows, columns, {r.well: r.status for r in self.wells}, STATUS_COLOURS))
        return "".join(parts)

    def __repr__(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items())
        mixed = ", mixed pipelines" if self.mixed else ""
        return f"PlateResult({self.plate!r}, {len(self.wells)} wells: {counts}{mixed}, output={self.output!r})"
