"""Plate × Pipeline → PlateGraph: one frozen, self-contained plan per well.

Compiling validates everything that can be known without pixels (the plate's
gaps, the pipeline's axes, the output path) and only then writes the plate-level
OME-Zarr metadata, once, here on the client. A bad input therefore writes nothing.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from hcs_dask.fingerprint import pipeline_difference, pipeline_record
from hcs_dask.pipeline import Pipeline, PipelineError
from hcs_dask.plate import AXES, Plate, Well
from hcs_dask.store import (Manifest, PreparedLayout, check_output, create_plate_layout, measurements_path,
                            prepare_plate_layout)

__all__ = ["CompileError", "PlateGraph", "ResumeError", "WELL_TASK_PREFIX", "WellPlan", "check_plate",
           "check_sequential", "compile_plate", "prepare_output", "write_output"]


class CompileError(ValueError):
    """A plate that cannot be run as it is (gaps, unknown image shape, …)."""


class ResumeError(CompileError):
    """A resume that would mix runs: another plate or pipeline, or no earlier run."""


WELL_TASK_PREFIX = "hcs-well"

logger = logging.getLogger("hcs_dask")


@dataclass(frozen=True)
class WellPlan:
    """Everything a worker needs to run one well; a few kB, no pixels.

    ``sequential`` lists the axes processed one value-combination at a time
    (axes with a single value are dropped at compile time).
    """

    plate: str
    well: Well
    root: str
    output: str
    axis_values: tuple[tuple[str, tuple[int, ...]], ...]
    sequential: tuple[str, ...]
    channel_names: tuple[tuple[int, str], ...]
    pixel_size_um: tuple[float, float] | None
    z_step_um: float | None
    manifest: bool = True
    #: Flush the well's files before its commit and its ``ok`` record (``RunPolicy.fsync``).
    fsync: bool = True
    #: The plate's format, which says how the well's sources are read (:func:`hcs_dask.formats.read_sources`).
    source_format: str = "imagexpress"
    #: The fingerprint of the pipeline the well runs, written into its manifest records.
    pipeline_fingerprint: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        """The Dask key of this well's task: ``("hcs-well", plate, well)``."""
        return (WELL_TASK_PREFIX, self.plate, self.well.name)

    def values(self, axis: str) -> tuple[int, ...]:
        return dict(self.axis_values)[axis]

    def combinations(self) -> list[dict[str, int]]:
        """The sequential combinations, e.g. ``[{"timepoint": 1}, {"timepoint": 2}]``; ``[{}]`` if none."""
        values = [self.values(axis) for axis in self.sequential]
        return [dict(zip(self.sequential, combo)) for combo in itertools.product(*values)]

    def field_index(self, site: int) -> int:
        return self.values("site").index(site)


@dataclass(frozen=True)
class PlateGraph:
    """The compiled plate: one :class:`WellPlan` per well, plus what is shared by all."""

    plate: Plate
    pipeline: Pipeline
    output: str
    plans: tuple[WellPlan, ...]
    #: On resume: the manifest records of the wells already ``ok``, which are not re-run.
    done: tuple[dict, ...] = ()
    #: What the manifest records of this run (``hcs_dask/zarr.json``) (the plate's and pipeline's fingerprints).
    run_info: dict = field(default_factory=dict, compare=False)
    #: With ``skip_incomplete``: the records of the wells not run because they lack images.
    skipped: tuple[dict, ...] = ()

    def __len__(self) -> int:
        return len(self.plans)

    @property
    def measurements_path(self) -> Path:
        return measurements_path(self.output)


def check_sequential(pipeline: Pipeline) -> None:
    """An axis processed sequentially cannot also be gathered into a stack."""
    for step in pipeline.steps:
        clash = set(step.stack) & set(pipeline.sequential)
        if clash:
            axis = sorted(clash)[0]
            raise PipelineError(
                f"step {step.name!r} stacks axis {axis!r}, which pipeline {pipeline.name!r} "
                f"processes sequentially; a sequential axis has one value at a time, so it cannot be stacked"
            )


def check_plate(plate: Plate, *, skip_incomplete: bool = False) -> dict[str, str]:
    """Every well has the same images; the image shape is known.

    With ``skip_incomplete``, wells that lack images are allowed: returns them, each with
    the sentence saying what it lacks (an empty dict for a complete plate).
    """
    if not plate.wells:
        raise CompileError(f"plate {plate.name!r} ({plate.root}) has no wells with images")
    gaps = plate.gaps()
    if gaps and not skip_incomplete:
        raise CompileError(
            f"plate {plate.name!r} is incomplete ({len(gaps)} well(s) with gaps; --skip-incomplete "
            "(skip_incomplete=True) runs the complete ones):\n  " + "\n  ".join(gaps)
        )
    incomplete = {line.split(" ", 2)[1]: line for line in gaps}  # "well B03 lacks ..."
    if len(incomplete) == len(plate.wells):
        raise CompileError(f"plate {plate.name!r}: every well lacks images, none can run:\n  " + "\n  ".join(gaps))
    if not plate.dtype or 0 in plate.shape:
        raise CompileError(
            f"plate {plate.name!r}: image shape unknown (opened with read_headers=False?)"
        )
    return incomplete


def compile_plate(
    plate: Plate,
    pipeline: Pipeline,
    output: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    write_layout: bool = True,
    manifest: bool = True,
    fsync: bool = True,
    skip_incomplete: bool = False,
    accept_changed_pipeline: bool = False,
) -> PlateGraph:
    """Validate ``plate`` × ``pipeline`` × ``output`` and plan every well; reads no pixels.

    Parameters
    ----------
    plate, pipeline
        What to run.
    output
        The OME-Zarr plate to create (``.ome.zarr``).
    overwrite
        Replace an existing output. Without it an existing path is an error.
    resume
        Continue an earlier run into the same ``output``: plan only the wells whose
        manifest status is not ``ok``, and leave every other file untouched. Refused
        (``ResumeError``) if the plate or the pipeline differs from that run's.
    write_layout
        Write the plate/row/well groups now (the default). ``False`` plans only;
        :func:`write_output` writes them later.
    manifest
        Keep the per-well manifest in the store (needed for ``resume``). Switching it
        off exists to measure its cost.
    fsync
        Each well flushes its files to disk before its commit (``RunPolicy.fsync``).
    skip_incomplete
        Plan only the wells that have every image; the others get ``skipped`` records
        (:attr:`PlateGraph.skipped`) instead of the plate being refused.
    accept_changed_pipeline
        With ``resume``: accept a pipeline that differs from the earlier run's.

    Raises
    ------
    CompileError, PipelineError, OutputError
        Before anything is written, naming the well, step or path at fault.
    """
    pipeline.validate()
    check_sequential(pipeline)
    incomplete = check_plate(plate, skip_incomplete=skip_incomplete)
    fingerprints = {"plate": plate.name, "plate_fingerprint": plate.fingerprint(), **pipeline_record(pipeline),
                    **_plate_record(plate)}
    done: tuple[dict, ...] = ()
    if resume:
        output_path = Path(output).absolute()
        done = _check_resume(output_path, fingerprints, accept_changed=accept_changed_pipeline)
        write_layout = False
    else:
        output_path = check_output(output, overwrite=overwrite)
    _check_apart(plate, output_path)
    finished = {record["well"] for record in done}
    skipped = tuple({"well": name, "status": "skipped", "error": gap, "cause": "incomplete (skip_incomplete)"}
                    for name, gap in incomplete.items() if name not in finished)

    axis_values = tuple((axis, plate.values(axis)) for axis in AXES)
    sequential = tuple(axis for axis in pipeline.sequential if len(plate.values(axis)) > 1)
    plans = tuple(
        WellPlan(
            plate=plate.name,
            well=well,
            root=plate.root,
            output=str(output_path),
            axis_values=axis_values,
            sequential=sequential,
            channel_names=plate.channel_names,
            pixel_size_um=plate.pixel_size_um,
            z_step_um=plate.z_step_um,
            manifest=manifest,
            fsync=fsync,
            source_format=plate.format,
            pipeline_fingerprint=fingerprints.get("pipeline_fingerprint"),
        )
        for well in plate.wells
        if well.name not in finished and well.name not in incomplete
    )
    graph = PlateGraph(plate=plate, pipeline=pipeline, output=str(output_path), plans=plans, done=done,
                       run_info=fingerprints if manifest else {}, skipped=skipped)
    if write_layout:
        write_output(graph, overwrite=overwrite)
    return graph


def write_output(graph: PlateGraph, *, overwrite: bool = False) -> None:
    """Write a compiled plate's output layout (plate, row and well groups, the run's manifest), once."""
    create_plate_layout(graph.output, graph.plate, overwrite=overwrite, run_info=graph.run_info or None)


def prepare_output(graph: PlateGraph, *, overwrite: bool = False) -> PreparedLayout:
    """:func:`write_output` up to its last step: the layout is flushed but hidden until ``publish()``."""
    return prepare_plate_layout(graph.output, graph.plate, overwrite=overwrite, run_info=graph.run_info or None)


def _check_apart(plate: Plate, output: Path) -> None:
    """The output must not be, or hold, the plate's images: replacing it would delete them (an OME-Zarr input)."""
    root = Path(plate.root).absolute()
    if root.is_relative_to(output):
        raise CompileError(f"{output}: the output would replace the input plate {root}; write it elsewhere")


def _plate_record(plate: Plate) -> dict:
    """What a result read back from the store needs of the plate (``PlateResult.load``)."""
    return {"plate_root": plate.root, "plate_geometry": [plate.plate_rows, plate.plate_columns],
            "sites": list(plate.sites), "channels": list(plate.channels),
            "channel_names": {str(c): plate.channel_name(c) for c in plate.channels}}


def _check_resume(output: Path, fingerprints: dict, *, accept_changed: bool = False) -> tuple[dict, ...]:
    """The ``ok`` records of the earlier run in ``output``, after checking it is the same run.

    With ``accept_changed``, a pipeline that differs is accepted (and logged).
    """
    manifest = Manifest(output)
    earlier = manifest.read_run() if output.is_dir() else None
    if earlier is None:
        raise ResumeError(f"{output}: no earlier hcs_dask run to resume (no manifest in {Manifest.FOLDER}/)")
    if earlier.get("plate_fingerprint") != fingerprints["plate_fingerprint"]:
        raise ResumeError(
            f"{output}: cannot resume: the plate differs from the earlier run's "
            f"(earlier: {earlier.get('plate')!r}, fingerprint {earlier.get('plate_fingerprint')}; now: "
            f"{fingerprints['plate']!r}, fingerprint {fingerprints['plate_fingerprint']}); "
            "run into a new output, or use --overwrite"
        )
    difference = pipeline_difference(earlier, fingerprints)
    if difference is not None and accept_changed:
        logger.warning("%s: resuming with a changed pipeline (%s); the plate will hold wells of both", output,
                       difference)
    elif difference is not None:
        raise ResumeError(
            f"{output}: cannot resume: {difference}; to keep the ok wells and run the others with this "
            "pipeline, add --accept-changed-pipeline (accept_changed_pipeline=True, or "
            "rerun_failed(allow_changed=True)); or run into a new output, or use --overwrite")
    return tuple(record for record in manifest.read_wells().values() if record.get("status") == "ok")
