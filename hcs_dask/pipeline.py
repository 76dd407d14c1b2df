"""Pipelines: plain array functions, and which image axes each one sees at once.

A :class:`Step` wraps a function of one array. ``stack`` names the axes gathered
into the leading dimensions of that array (``stack="z"`` gives a ``(z, y, x)``
stack per site and channel); every other axis is iterated, one call per value.
A function may return

* an array with the same leading dimensions (the stacked axes are kept),
* a 2-D image (the stacked axes are reduced, e.g. a max projection over z),
* either of those plus a ``dict`` of scalar measurements: ``(array, {"count": 12})``.

A function that declares a ``context`` parameter receives a :class:`StepContext`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, Callable, Mapping

import cloudpickle

from hcs_dask.plate import AXES
from hcs_dask.sources import function_sources, register_sources

__all__ = ["ARRAY_TYPES", "DEVICE_ARRAY_TYPES", "REDUCED", "Pipeline", "PipelineError", "Step", "StepContext",
           "array_type_for", "bundled_graphs", "load_pipeline"]

ARRAY_TYPES = ("numpy", "cupy", "torch")

#: A value a collapsed (reduced) axis takes in the coordinates after the step.
REDUCED = 0


class PipelineError(ValueError):
    """A pipeline or pipeline file that cannot run, with a sentence naming the step."""


#: ``--device`` → the array type the steps of a bundled graph receive.
DEVICE_ARRAY_TYPES = {"cpu": "numpy", "gpu": "cupy"}


def array_type_for(device: str) -> str:
    """The step ``array_type`` for a ``device`` (``"cpu"`` → numpy, ``"gpu"`` → cupy).

    Raises
    ------
    PipelineError
        For any other device.
    """
    try:
        return DEVICE_ARRAY_TYPES[device]
    except KeyError:
        raise PipelineError(f"device must be 'cpu' or 'gpu', got {device!r}") from None


@dataclass(frozen=True)
class StepContext:
    """Where a step call is: the well, and each axis' value (a tuple for stacked axes).

    ``logger`` is the ``hcs_dask.step`` logger, for messages that should name the well.
    ``scope`` is the well's memory-backend scope (``put``/``get`` arrays by virtual path):
    what a step stashes there lives until the well's cleanup, never longer.
    """

    well: str
    site: int | tuple[int, ...]
    channel: int | tuple[int, ...]
    z: int | tuple[int, ...]
    timepoint: int | tuple[int, ...]
    step: str
    logger: logging.Logger = field(default=logging.getLogger("hcs_dask.step"), repr=False, compare=False)
    scope: Any = field(default=None, repr=False, compare=False)


def _as_axes(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _func_name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or type(func).__name__


@dataclass(frozen=True, init=False)
class Step:
    """One pipeline step.

    Parameters
    ----------
    func
        A function of one array, or a dict ``{channel: function}`` (the step must then
        iterate over ``channel``; channels without a function pass through unchanged).
    stack
        Axis or axes gathered into the array's leading dimensions, in this order.
        ``None`` (the default) calls the function on each 2-D image.
    over
        The axes iterated over. Defaults to every axis not stacked; when given, an
        axis that is neither stacked nor iterated but has several values is an error.
    name
        Shown in errors, results and logs; defaults to the function's name.
    array_type
        ``"numpy"`` (default) or ``"cupy"``: the array type the function takes.
    kwargs
        Keyword arguments passed to the function on every call.

    Examples
    --------
    >>> import numpy as np
    >>> Step(np.max, stack="z", kwargs={"axis": 0}, name="max_projection")
    Step('max_projection', stack=('z',))
    """

    func: Callable[..., Any] | Mapping[int, Callable[..., Any]]
    stack: tuple[str, ...]
    over: tuple[str, ...] | None
    name: str
    array_type: str
    kwargs: Mapping[str, Any]

    def __init__(
        self,
        func: Callable[..., Any] | Mapping[int, Callable[..., Any]],
        *,
        stack: str | tuple[str, ...] | None = None,
        over: str | tuple[str, ...] | None = None,
        name: str | None = None,
        array_type: str = "numpy",
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(func, Mapping):
            func = MappingProxyType(dict(func))
            default_name = "+".join(_func_name(f) for f in func.values())
        else:
            default_name = _func_name(func)
        object.__setattr__(self, "func", func)
        object.__setattr__(self, "stack", _as_axes(stack))
        object.__setattr__(self, "over", None if over is None else _as_axes(over))
        object.__setattr__(self, "name", name or default_name)
        object.__setattr__(self, "array_type", array_type)
        object.__setattr__(self, "kwargs", MappingProxyType(dict(kwargs or {})))
        self.validate()
        # Asked for every image group of every well: inspect.signature once, here.
        object.__setattr__(self, "_takes_context",
                           {channel: _declares_context(f) for channel, f in self.functions().items()})

    def __repr__(self) -> str:
        return f"Step({self.name!r}, stack={self.stack!r})"

    def __reduce__(self) -> tuple:
        func = dict(self.func) if isinstance(self.func, Mapping) else self.func
        return (_rebuild_step, (func, self.stack, self.over, self.name, self.array_type, dict(self.kwargs)))

    # ------------------------------------------------------------- validation
    def functions(self) -> dict[int | None, Callable[..., Any]]:
        """``{channel: function}``, or ``{None: function}`` for a single function."""
        if isinstance(self.func, Mapping):
            return dict(self.func)
        return {None: self.func}

    def iterated_axes(self) -> tuple[str, ...]:
        return self.over if self.over is not None else tuple(a for a in AXES if a not in self.stack)

    def takes_context(self, channel: int | None = None) -> bool:
        return self._takes_context[channel]

    def validate(self) -> None:
        """Raise :class:`PipelineError` with a sentence naming this step if it cannot run."""
        who = f"step {self.name!r}"
        for axis in self.stack + (self.over or ()):
            if axis not in AXES:
                raise PipelineError(
                    f"{who}: unknown axis {axis!r}; the axes inside a well are {', '.join(AXES)}"
                )
        if len(set(self.stack)) != len(self.stack):
            raise PipelineError(f"{who}: stack={self.stack!r} names an axis twice")
        both = set(self.stack) & set(self.over or ())
        if both:
            raise PipelineError(
                f"{who}: axis {sorted(both)[0]!r} is both stacked and iterated over; "
                "an axis is either gathered into the array (stack=) or looped over (over=)"
            )
        if self.array_type not in ARRAY_TYPES:
            raise PipelineError(
                f"{who}: array_type {self.array_type!r} is not one of {', '.join(ARRAY_TYPES)}"
            )
        if isinstance(self.func, Mapping):
            if "channel" not in self.iterated_axes():
                raise PipelineError(
                    f"{who}: a dict of functions is keyed by channel, so the step must iterate "
                    "over 'channel' (not stack it)"
                )
            if not self.func:
                raise PipelineError(f"{who}: the dict of functions is empty")
            for channel in self.func:
                if not isinstance(channel, int):
                    raise PipelineError(
                        f"{who}: dict keys must be channel numbers (int), got {channel!r}"
                    )
        for channel, function in self.functions().items():
            where = who if channel is None else f"{who} (channel {channel})"
            if not callable(function):
                raise PipelineError(f"{where}: {function!r} is not callable")
            _check_signature(function, self.kwargs, where)


def _rebuild_step(func, stack, over, name, array_type, kwargs) -> Step:
    return Step(func, stack=stack or None, over=over, name=name, array_type=array_type, kwargs=kwargs)


def _declares_context(function: Callable[..., Any]) -> bool:
    try:
        return "context" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _check_signature(function: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # builtins without a signature (some numpy ufuncs): trust them
    extra: dict[str, Any] = dict(kwargs)
    if "context" in signature.parameters:
        extra["context"] = None
    try:
        signature.bind(object(), **extra)
    except TypeError as error:
        raise PipelineError(
            f"{where}: {_func_name(function)}{signature} cannot be called as "
            f"f(stack{''.join(', ' + k + '=…' for k in extra)}): {error}"
        ) from None


@dataclass(frozen=True, init=False)
class Pipeline:
    """An ordered chain of steps run on every well.

    Parameters
    ----------
    steps
        The steps, in order.
    name
        The pipeline's name (shown in summaries).
    sequential
        Axes processed one combination of values at a time within a well, with the
        cleanup after each combination, e.g. ``("timepoint", "channel")``. The peak
        memory of a well then scales with one combination rather than the whole well.
    """

    steps: tuple[Step, ...]
    name: str
    sequential: tuple[str, ...]

    def __init__(self, steps: list[Step] | tuple[Step, ...], *, name: str = "pipeline",
                 sequential: str | tuple[str, ...] | None = None) -> None:
        object.__setattr__(self, "steps", tuple(steps))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "sequential", _as_axes(sequential))
        self.validate()

    def validate(self) -> None:
        if not self.steps:
            raise PipelineError(f"pipeline {self.name!r} has no steps")
        for index, step in enumerate(self.steps):
            if not isinstance(step, Step):
                raise PipelineError(
                    f"pipeline {self.name!r}: item {index} is {type(step).__name__}, not a Step; "
                    "wrap functions as Step(func, stack=...)"
                )
        for axis in self.sequential:
            if axis not in AXES:
                raise PipelineError(
                    f"pipeline {self.name!r}: unknown sequential axis {axis!r}; axes are {', '.join(AXES)}"
                )

    def __reduce__(self) -> tuple:
        # Always through cloudpickle: functions from a user's pipeline file are registered
        # to pickle by value, and plain pickle (which distributed tries first) would pickle
        # them by a module name that workers cannot import. Never cached: a pickle taken
        # now holds the code as it is now (a run pickles its pipeline once, see driver.py).
        # The steps' source lines ride along, so that a worker's traceback through a
        # notebook cell or a pipeline file shows them (hcs_dask.sources).
        sources = function_sources(step.func for step in self.steps)
        return (_pipeline_from_bytes, (cloudpickle.dumps((list(self.steps), self.name, self.sequential)), sources))

    def uses_gpu(self) -> bool:
        return any(step.array_type != "numpy" for step in self.steps)

    def fingerprint(self) -> str:
        """A digest of what the pipeline computes (see :mod:`hcs_dask.fingerprint`).

        It covers the name, the sequential axes and every step: its axes and array type,
        its functions' code and the values they are bound to or close over, the user
        functions and constants that code uses, and every kwarg (arrays by content).
        It is the same in every process, whatever ``PYTHONHASHSEED``.

        Raises
        ------
        FingerprintError
            If a value of a step cannot be fingerprinted deterministically; the message
            names the step and the value, and how to make it fingerprintable.
        """
        from hcs_dask.fingerprint import pipeline_fingerprint  # it imports this module

        return pipeline_fingerprint(self)

    def step_fingerprints(self) -> list[tuple[str, str]]:
        """``[(step name, digest)]`` in order; the parts of :meth:`fingerprint`.

        Raises
        ------
        FingerprintError
            As :meth:`fingerprint`.
        """
        from hcs_dask.fingerprint import step_fingerprints

        return step_fingerprints(self)


def _pipeline_from_bytes(blob: bytes, sources: dict[str, dict] | None = None) -> Pipeline:
    steps, name, sequential = cloudpickle.loads(blob)
    register_sources(sources, [step.func for step in steps])
    return Pipeline(steps, name=name, sequential=sequential)


def bundled_graphs() -> dict[str, Path]:
    """The pipelines shipped in ``graphs/``: ``{name: path}``."""
    from importlib.resources import files

    folder = Path(str(files("hcs_dask.graphs")))
    return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")}


def load_pipeline(graph: str | Path, **options: Any) -> Pipeline:
    """Load a pipeline from a Python file that defines ``pipeline``, or a bundled graph's name.

    A file may instead define ``make_pipeline(**options)``; then ``options`` (for example
    ``device="gpu"``) are passed to it and ``pipeline`` is not needed.

    Raises
    ------
    PipelineError
        If the file does not exist, fails to import, or defines no valid ``pipeline``.
    """
    graphs = bundled_graphs()
    path = Path(graph)
    if not path.suffix and str(graph) in graphs:
        path = graphs[str(graph)]
        # Imported under its package name, so its functions pickle by reference.
        module = importlib.import_module(f"hcs_dask.graphs.{path.stem}")
    elif path.is_file():
        module = _import_user_file(path)
    else:
        known = ", ".join(graphs) or "none"
        raise PipelineError(
            f"{graph}: no such pipeline file, and not a bundled graph (bundled: {known})"
        )
    if hasattr(module, "make_pipeline"):
        pipeline = module.make_pipeline(**options)
    elif options:
        raise PipelineError(f"{path}: options {sorted(options)} given, but the file has no make_pipeline()")
    elif hasattr(module, "pipeline"):
        pipeline = module.pipeline
    else:
        raise PipelineError(f"{path}: defines no `pipeline` (a hcs_dask.Pipeline)")
    if not isinstance(pipeline, Pipeline):
        raise PipelineError(f"{path}: `pipeline` is a {type(pipeline).__name__}, not a hcs_dask.Pipeline")
    return pipeline


def _import_user_file(path: Path) -> ModuleType:
    module_name = f"hcs_dask_user_graph_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except PipelineError as error:
        raise PipelineError(f"{path}: {error}") from None
    except Exception as error:  # a user's file: any error is theirs to read
        raise PipelineError(f"{path}: failed to import: {type(error).__name__}: {error}") from error
    # Workers cannot import this file by name: ship its functions by value.
    cloudpickle.register_pickle_by_value(module)
    return module
