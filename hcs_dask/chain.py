"""The worker side of a well, below the guard: read its sources, run the chain of steps, write its fields.

:class:`WellChain` interprets a pipeline for one well and one sequential combination at
a time. Its intermediate arrays live in the combination's memory-backend scope, which
the guard (:mod:`hcs_dask.guard`) opens and, in a ``finally``, resets. It remembers
where it is (``step``, ``combination``) so that a failure record can say so.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import prod
from typing import Any

import numpy as np

from hcs_dask.compile import WellPlan
from hcs_dask.formats import ImageReadError, read_sources
from hcs_dask.memory import backend
from hcs_dask.memory.convert import ConversionCounter, to_array_type, to_host
from hcs_dask.pipeline import REDUCED, Pipeline, Step, StepContext
from hcs_dask.plate import AXES, ImageKey
from hcs_dask.store import FieldLayout, FieldWriter, pyramid_levels

__all__ = ["Coord", "ImageReadError", "StepError", "WellChain"]

#: A position inside a well, in :data:`hcs_dask.plate.AXES` order: (site, channel, z, timepoint).
Coord = tuple[int, int, int, int]
_SITE, _CHANNEL, _Z, _TIMEPOINT = range(4)
_OUTPUT_AXES = (("t", _TIMEPOINT), ("c", _CHANNEL), ("z", _Z))


class StepError(RuntimeError):
    """A step returned something the pipeline cannot use (wrong shape, type, …)."""


def _coord(key: ImageKey) -> Coord:
    return (key.site, key.channel, key.z, key.timepoint)


def _check_output_grid(site: int, grid: list[list[int]], position: dict[tuple[int, ...], Coord],
                       one_plane: bool) -> None:
    """The output of a site fills the field's (t, c) grid; only z may be partial (channels of unequal depth).

    With ``one_plane`` (z processed sequentially) a channel without this plane has no image at all here.
    """
    times, channels, planes = grid
    outside = [index for index in position if index[0] not in times or index[1] not in channels
               or index[2] not in planes]
    if outside:
        raise StepError(
            f"the pipeline's output for site {site} has (t, c, z) = {sorted(outside)[0]}, outside the field's "
            f"values {grid} (set by its first write)"
        )
    held = {index[:2] for index in position}
    lacking = [(t, c) for t in times for c in channels if (t, c) not in held]
    if lacking and not one_plane:
        raise StepError(
            f"the pipeline's output for site {site} is not a full (t, c) grid: no image for (t, c) = "
            f"{lacking[0]} of {len(times)} x {len(channels)}"
        )


@dataclass
class WellChain:
    """One well's chain of steps: where it is (for failure records) and what it produced."""

    plan: WellPlan
    pipeline: Pipeline
    step: str | None = None
    combination: dict[str, int] | None = None
    measurements: dict[tuple, dict[str, Any]] = field(default_factory=dict)
    writers: dict[int, FieldWriter] = field(default_factory=dict)
    #: site -> the (t, c, z) values of its output field, fixed by its first write.
    output_values: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    conversions: ConversionCounter = field(default_factory=ConversionCounter)

    # ----------------------------------------------------------------- chain
    def run_combination(self, scope: backend.Scope, combination: dict[str, int]) -> None:
        self.combination = combination
        self.step = "read"
        state: dict[Coord, str] = {}
        selected = [(key, source) for key, source in self.plan.well.files
                    if all(getattr(key, axis) == value for axis, value in combination.items())]
        images = read_sources(self.plan.source_format, self.plan.root, [source for _, source in selected])
        for (key, _), image in zip(selected, images):
            coord = _coord(key)
            path = f"src/{coord}"
            scope.put(path, image)
            state[coord] = path
            del image  # the scope holds the source now; no stray reference past the well's cleanup
        del images
        prefix = "src/"
        for index, step in enumerate(self.pipeline.steps):
            self.step = step.name
            new_prefix = f"step{index}/"
            state = self._run_step(scope, step, state, new_prefix)
            # Only the previous step's output is needed: keep the peak at two steps.
            scope.delete_prefix(prefix)
            prefix = new_prefix
        self.step = "write"
        self._write(scope, state, combination)
        self.step = None

    def _run_step(self, scope: backend.Scope, step: Step, state: dict[Coord, str], prefix: str) -> dict[Coord, str]:
        stacked = [AXES.index(a) for a in step.stack]
        iterated = [i for i in range(len(AXES)) if i not in stacked]
        if step.over is not None:
            for i in iterated:
                if AXES[i] not in step.over and len({c[i] for c in state}) > 1:
                    raise StepError(
                        f"step {step.name!r} neither stacks nor iterates axis {AXES[i]!r}, which has "
                        f"{len({c[i] for c in state})} values here; add it to stack= or over="
                    )
        groups: dict[tuple[int, ...], list[Coord]] = {}
        for coord in sorted(state):
            groups.setdefault(tuple(coord[i] for i in iterated), []).append(coord)
        functions = step.functions()
        new_state: dict[Coord, str] = {}
        for members in groups.values():
            members.sort(key=lambda c: tuple(c[i] for i in stacked))
            grid = [sorted({c[i] for c in members}) for i in stacked]
            if prod(len(values) for values in grid) != len(members):
                raise StepError(
                    f"step {step.name!r}: the images to stack over {step.stack} do not form a full grid "
                    f"({len(members)} images for {[len(v) for v in grid]} values)"
                )
            first = members[0]
            channel = first[_CHANNEL]
            function = functions.get(channel if None not in functions else None)
            outputs = [f"{prefix}{c}" for c in members]
            if function is None:  # a dict of functions without one for this channel
                for coord, path in zip(members, outputs):
                    scope.put(path, scope.get(state[coord]))
                    new_state[coord] = path
                continue
            arrays = [scope.get(state[c]) for c in members]
            data = np.stack(arrays).reshape(*(len(v) for v in grid), *arrays[0].shape) if stacked else arrays[0]
            del arrays
            data = to_array_type(data, step.array_type, self.conversions)
            kwargs = dict(step.kwargs)
            if step.takes_context(None if None in functions else channel):
                kwargs["context"] = self._context(step, first, grid, stacked, scope)
            result = function(data, **kwargs)
            measures = None
            if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping):
                result, measures = result
            if not hasattr(result, "ndim") or not hasattr(result, "shape"):
                raise StepError(
                    f"step {step.name!r} returned {type(result).__name__}; expected an array "
                    "or (array, dict of measurements)"
                )
            if result.ndim == data.ndim and tuple(result.shape[: len(stacked)]) == tuple(len(v) for v in grid):
                flat = result.reshape(len(members), *result.shape[len(stacked):]) if stacked else result[None]
                if flat.ndim != 3:
                    raise StepError(f"step {step.name!r} returned images of {flat.ndim - 1} dimensions; expected 2")
                for i, (coord, path) in enumerate(zip(members, outputs)):
                    scope.put(path, flat[i])
                    new_state[coord] = path
                kept = first
            elif stacked and result.ndim == 2:
                reduced = list(first)
                for i in stacked:
                    reduced[i] = REDUCED
                kept = tuple(reduced)  # type: ignore[assignment]
                path = f"{prefix}{kept}"
                scope.put(path, result)
                new_state[kept] = path  # type: ignore[index]
            else:
                raise StepError(
                    f"step {step.name!r} was given an array of shape {tuple(data.shape)} (stacking "
                    f"{step.stack or 'nothing'}) and returned shape {tuple(result.shape)}; return the same "
                    "leading dimensions to keep the stacked axes, or a 2-D image to reduce them"
                )
            del data, result
            if measures:
                self._measure(first, stacked, measures, step)
        return new_state

    def _context(self, step: Step, first: Coord, grid: list[list[int]], stacked: list[int],
                 scope: backend.Scope) -> StepContext:
        values: dict[str, Any] = {axis: first[i] for i, axis in enumerate(AXES)}
        for axis_index, axis_values in zip(stacked, grid):
            values[AXES[axis_index]] = tuple(axis_values)
        return StepContext(well=self.plan.well.name, step=step.name, scope=scope, **values)

    def _measure(self, first: Coord, stacked: list[int], measures: Mapping[str, Any], step: Step) -> None:
        context = {
            AXES[i]: first[i]
            for i in range(len(AXES))
            if i not in stacked and first[i] != REDUCED
        }
        key = tuple(sorted(context.items()))
        row = self.measurements.setdefault(key, {"well": self.plan.well.name, **context})
        for name, value in measures.items():
            if isinstance(value, np.generic):
                value = value.item()
            if not isinstance(value, (int, float, str, bool)) and value is not None:
                raise StepError(
                    f"step {step.name!r}: measurement {name!r} is a {type(value).__name__}; "
                    "measurements must be scalars"
                )
            row[name] = value

    # ----------------------------------------------------------------- write
    def _write(self, scope: backend.Scope, state: dict[Coord, str], combination: dict[str, int]) -> None:
        plan = self.plan
        by_site: dict[int, list[Coord]] = {}
        for coord in state:
            by_site.setdefault(coord[_SITE], []).append(coord)
        for site, coords in sorted(by_site.items()):
            extents = {name: sorted({c[i] for c in coords}) for name, i in _OUTPUT_AXES}
            writer = self.writers.get(site)
            if writer is None:
                # The field's (t, c, z) values: a sequential axis has all the plan's, the others
                # what the first combination produced (every channel's planes, for unequal depths).
                values = {name: list(plan.values(AXES[i])) if AXES[i] in plan.sequential else extents[name]
                          for name, i in _OUTPUT_AXES}
                self.output_values[site] = values
            values = self.output_values[site]
            grid = [[combination[AXES[i]]] if AXES[i] in combination else values[name] for name, i in _OUTPUT_AXES]
            position = {tuple(c[i] for _, i in _OUTPUT_AXES): c for c in coords}
            _check_output_grid(site, grid, position, one_plane="z" in combination)
            images = [scope.get(state[position[index]]) if index in position else None
                      for index in itertools.product(*grid)]
            # Planes a channel lacks (channels of unequal depth) stay at the fill value, 0.
            some = next(image for image in images if image is not None)
            images = [np.zeros_like(some) if image is None else image for image in images]
            # Stacked where the images are (np.stack dispatches to CuPy for device arrays),
            # so a GPU pipeline's output comes back to the host in one copy per field.
            block = to_host(np.stack(images), self.conversions)
            del images, some
            block = block.reshape(*(len(v) for v in grid), *block.shape[1:])
            if writer is None:
                writer = self.writers[site] = FieldWriter(
                    plan.output,
                    f"{plan.well.row}/{plan.well.column}/{plan.field_index(site) if site != REDUCED else 0}",
                    self._layout(values, block),
                    translation_um=plan.well.position_of(site),
                    channel_planes=self._channel_planes(site, values, position),
                )
            index_by_axis = []
            for name, i in _OUTPUT_AXES:
                axis = AXES[i]
                if axis in combination:
                    # A slice, not an int: the block keeps this axis, with length one.
                    at = plan.values(axis).index(combination[axis])
                    index_by_axis.append(slice(at, at + 1))
                else:
                    index_by_axis.append(slice(None))
            if "t" not in writer.layout.axes:
                index_by_axis = index_by_axis[1:]
                block = block[0]
            writer.write(tuple(index_by_axis), block)

    def _channel_planes(self, site: int, values: dict[str, list[int]],
                        position: dict[tuple[int, ...], Coord]) -> tuple[tuple[int, ...], ...] | None:
        """The ``z`` indices that hold each channel's planes, where channels differ in depth; else ``None``."""
        planes = values["z"]
        if "z" in self.plan.sequential:
            # One plane per combination: each channel's planes are its sources' (a step keeps z or reduces it).
            held = {(key.channel, key.z) for key, _ in self.plan.well.files if key.site == site}
        else:
            held = {(index[1], index[2]) for index in position}
        per_channel = tuple(
            tuple(i for i, z in enumerate(planes) if (c, z) in held or c == REDUCED) for c in values["c"]
        )
        return None if all(len(p) == len(planes) for p in per_channel) else per_channel

    def _layout(self, values: dict[str, list[int]], block: np.ndarray) -> FieldLayout:
        plan = self.plan
        sizes = {name: len(values[name]) for name, _ in _OUTPUT_AXES}
        names = dict(plan.channel_names)
        channel_names = tuple(
            "projection" if c == REDUCED else names.get(c, f"w{c}") for c in values["c"]
        )
        axes = ("t", "c", "z") if sizes["t"] > 1 else ("c", "z")
        shape = tuple(sizes[a] for a in axes) + tuple(block.shape[-2:])
        return FieldLayout(
            axes=axes + ("y", "x"),
            shape=shape,
            dtype=str(block.dtype),
            channel_names=channel_names,
            pixel_size_um=plan.pixel_size_um,
            z_step_um=plan.z_step_um if sizes["z"] > 1 else None,
            levels=pyramid_levels(block.shape[-2:]),
        )

    def fields(self) -> list[int]:
        """Indices of the fields this well has written."""
        return [int(writer.path.rsplit("/", 1)[1]) for writer in self.writers.values()]

    def measurement_rows(self) -> list[dict[str, Any]]:
        return list(self.measurements.values())
