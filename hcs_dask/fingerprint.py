"""Pipeline identity from what the pipeline computes, the same in every process.

A step's digest covers its name, axes and array type, the code of its function(s) and
every value that code depends on, and each of its ``kwargs``:

* Functions are hashed by their source text (``inspect.getsource``), or by a walk of
  their code object where no source exists (lambdas, code typed at a prompt).
  Their defaults, closure cells, ``functools.partial`` arguments and the instance a
  method is bound to are hashed by value.
* The global names a function's code uses are hashed too. A function or class defined
  in the same module, in ``__main__`` or in a module registered with
  ``cloudpickle.register_pickle_by_value`` (a pipeline file) is hashed by value,
  recursively; one from anywhere else by its ``module.qualname``. A global that cannot
  be hashed (a lock, say) counts by its type.
* A step function, or a function among the values, that lives in an installed library
  (``np.max``) is hashed by its ``module.qualname``, not its code.
* Containers are walked here: dicts by their items in any order, sets ordered by their
  elements' digests. Other values go to dask's tokenizer (``dask.base.tokenize``,
  deterministic mode), so NumPy arrays count by dtype, shape and bytes, and a type
  with a ``__dask_tokenize__`` method is hashed by what that method returns. Instances
  of other classes are hashed by what pickling them would record (``__reduce_ex__``):
  their class and their state.

Nothing depends on ``hash()``, ``id()`` or a default ``repr``, so the digests survive
a new process and another ``PYTHONHASHSEED``. A value that cannot be hashed
deterministically raises :class:`FingerprintError` naming the step and the value's
path; giving its type a ``__dask_tokenize__`` method (dask's protocol) makes it
hashable.

Examples
--------
>>> from functools import partial
>>> import numpy as np
>>> from hcs_dask import Pipeline, Step
>>> def project(stack, axis):
...     return np.max(stack, axis=axis)
>>> one = Pipeline([Step(partial(project, axis=0), stack="z", name="project")])
>>> same = Pipeline([Step(partial(project, axis=0), stack="z", name="project")])
>>> other = Pipeline([Step(partial(project, axis=1), stack="z", name="project")])
>>> one.fingerprint() == same.fingerprint() != other.fingerprint()
True
>>> [name for name, digest in one.step_fingerprints()]
['project']
"""

from __future__ import annotations

import copyreg
import difflib
import hashlib
import inspect
import math
import os
import site
import sys
import sysconfig
import textwrap
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache, partial
from types import (
    BuiltinFunctionType,
    ClassMethodDescriptorType,
    CodeType,
    FunctionType,
    MappingProxyType,
    MethodDescriptorType,
    MethodType,
    MethodWrapperType,
    ModuleType,
    WrapperDescriptorType,
)
from typing import TYPE_CHECKING, Any

import cloudpickle
from dask.base import normalize_token, tokenize

from hcs_dask.pipeline import PipelineError

if TYPE_CHECKING:
    from hcs_dask.pipeline import Pipeline, Step

__all__ = [
    "FINGERPRINT_VERSION",
    "FingerprintError",
    "pipeline_difference",
    "pipeline_fingerprint",
    "pipeline_record",
    "step_fingerprints",
]

#: Recorded in the run manifest (``hcs_dask/zarr.json``): digests of another version are not comparable.
FINGERPRINT_VERSION = 2

#: Hex characters kept of each SHA-256 digest.
DIGEST_CHARS = 16

DASK_TOKENIZE_DOCS = "https://docs.dask.org/en/latest/custom-collections.html#implementing-deterministic-hashing"

_BUILTIN_CALLABLES = (BuiltinFunctionType, MethodWrapperType, WrapperDescriptorType, MethodDescriptorType,
                      ClassMethodDescriptorType)
# Exactly these types are walked as containers; subclasses go through __reduce_ex__.
_MAPPINGS = (dict, MappingProxyType)
_SEQUENCES = (list, tuple)
_SIMPLE = (int, float, complex, str, bytes, bool, type(None))
# Class attributes that say nothing about what the class computes.
_CLASS_SKIP = frozenset({"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__",
                         "__annotations__", "__firstlineno__", "__static_attributes__"})


class FingerprintError(PipelineError):
    """A value of a step that cannot be fingerprinted deterministically.

    The message names the step and the value's path (``kwargs['model']``,
    ``func.__closure__['model']``, ...) and says how to proceed: give the value's type a
    ``__dask_tokenize__`` method returning something deterministic (e.g. a tuple of
    its parameters).
    """


class _Unfingerprintable(Exception):
    """Raised inside the walk; becomes a :class:`FingerprintError` naming the step."""

    def __init__(self, path: str, value: Any, reason: str) -> None:
        super().__init__(path)
        self.path = path
        self.value_type = type(value)
        self.reason = reason
        #: The outermost user class on the path: the type to give a __dask_tokenize__.
        self.owner: type | None = type(value) if _is_user_type(type(value)) else None


def _digest(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _type_name(kind: type) -> str:
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _importable_name(obj: Any) -> str | None:
    """``module.qualname`` if ``obj`` can be found again by that name in another process."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module_name, str) or not isinstance(qualname, str):
        return None
    if module_name == "__main__" or "<" in qualname:  # <locals>, <lambda>
        return None
    target: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return f"{module_name}.{qualname}" if target is obj else None


def _registered_by_value(module_name: str) -> bool:
    registered = cloudpickle.list_registry_pickle_by_value()
    parts = module_name.split(".")
    return any(".".join(parts[:end]) in registered for end in range(1, len(parts) + 1))


@lru_cache(maxsize=1)
def _install_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
    return tuple(os.path.join(os.path.realpath(root), "") for root in roots)


@lru_cache(maxsize=None)
def _file_is_installed(file: str) -> bool:
    return os.path.realpath(file).startswith(_install_roots())


def _module_is_installed(module_name: str) -> bool:
    if module_name == "__main__" or _registered_by_value(module_name):
        return False
    module = sys.modules.get(module_name)
    if module is None:
        return False
    file = getattr(module, "__file__", None)
    return file is None or _file_is_installed(file)  # no file: built into the interpreter


def _is_library(obj: Any) -> bool:
    """Code of an installed library (or the standard library), found again by name."""
    module_name = getattr(obj, "__module__", None)
    if not isinstance(module_name, str) or _importable_name(obj) is None:
        return False
    return _module_is_installed(module_name)


def _is_user_type(kind: type) -> bool:
    """A class whose source the pipeline's author can edit (not a library's, not built in)."""
    module_name = kind.__module__
    if module_name == "__main__" or _registered_by_value(module_name):
        return True
    file = getattr(sys.modules.get(module_name), "__file__", None)
    return file is not None and not _file_is_installed(file)


def _by_value_as_global(obj: Any, home: str | None) -> bool:
    """A global a function uses: by value if it comes from the function's own module,
    ``__main__``, a module pickled by value, or cannot be found by name."""
    if _importable_name(obj) is None:
        return True
    module_name = obj.__module__
    return module_name == home or _registered_by_value(module_name)


def _global_names(code: CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _global_names(const)
    return names


class _Walker:
    """One step's walk: cycle protection over the current path, a memo for functions and classes."""

    def __init__(self) -> None:
        self._stack: dict[int, int] = {}
        self._low = math.inf
        self._memo: dict[int, str] = {}
        self._keep: list[Any] = []  # memo keys are ids: keep their objects alive

    # ----------------------------------------------------------------- plumbing
    def _visit(self, obj: Any, compute: Callable[[], str], *, memo: bool = False) -> str:
        key = id(obj)
        if key in self._stack:
            # The distance, not the depth, so a memoized digest fits wherever it is reused.
            self._low = min(self._low, self._stack[key])
            return _digest("cycle", str(len(self._stack) - self._stack[key]))
        if memo and key in self._memo:
            return self._memo[key]
        depth = len(self._stack)
        self._stack[key] = depth
        outer_low, self._low = self._low, math.inf
        try:
            digest = compute()
        finally:
            del self._stack[key]
            inner_low = self._low
            self._low = min(outer_low, inner_low)
        if memo and inner_low >= depth:  # no cycle through an object outside it
            self._memo[key] = digest
            self._keep.append(obj)
        return digest

    def _dask(self, obj: Any, path: str) -> str:
        try:
            return tokenize(obj, ensure_deterministic=True)
        except Exception as error:  # dask's TokenizationError, or whatever the object raised
            raise _Unfingerprintable(path, obj, _first_sentence(error)) from None

    # ------------------------------------------------------------------- values
    def value(self, obj: Any, path: str) -> str:
        """The digest of a value the computation is given explicitly; raises if it has none."""
        kind = type(obj)
        if kind in _SIMPLE:
            return _digest("value", kind.__name__, self._dask(obj, path))
        if isinstance(obj, ModuleType):
            return _digest("module", obj.__name__)
        if isinstance(obj, type):
            return self.cls(obj, path)
        if getattr(obj, "__dask_tokenize__", None) is not None:
            return _digest("tokenized", self.cls(kind, path), self._dask(obj, path))
        if isinstance(obj, FunctionType):
            return self.function(obj, path, by_value=not _is_library(obj))
        if isinstance(obj, partial):
            return self._visit(obj, lambda: self._partial(obj, path))
        if isinstance(obj, MethodType):
            return _digest("method", self.value(obj.__func__, f"{path}.__func__"),
                           self.value(obj.__self__, f"{path}.__self__"))
        if isinstance(obj, _BUILTIN_CALLABLES):
            return self._builtin(obj, path)
        if isinstance(obj, (staticmethod, classmethod)):
            return _digest(kind.__name__, self.value(obj.__func__, f"{path}.__func__"))
        if isinstance(obj, property):
            return _digest("property", *(self.value(getattr(obj, part), f"{path}.{part}")
                                         for part in ("fget", "fset", "fdel")))
        if kind in _MAPPINGS:
            return self._visit(obj, lambda: self._mapping(obj, path, sort=True))
        if kind is OrderedDict:
            return self._visit(obj, lambda: self._mapping(obj, path, sort=False))
        if kind in _SEQUENCES:
            return self._visit(obj, lambda: self._sequence(obj, path))
        if isinstance(obj, (set, frozenset)):
            return self._visit(obj, lambda: self._set(obj, path))
        has_dask_rule = normalize_token.dispatch(kind) is not normalize_token.dispatch(object)
        if (has_dask_rule and not isinstance(obj, (dict, list, tuple))) or kind is object:
            # dask has a rule for this type (NumPy arrays, dtypes, pandas objects, ...);
            # a bare object() is identity only, which dask refuses. Subclasses of containers
            # are walked below, so that functions inside them count by their code.
            return _digest("tokenized", self.cls(kind, path), self._dask(obj, path))
        if callable(obj) and _importable_name(obj) is not None and _is_library(obj):
            return _digest("ref", _importable_name(obj) or "")  # np.max and other named library callables
        if callable(obj) and callable(getattr(obj, "__wrapped__", None)):  # lru_cache and other wrappers
            return _digest("wrapper", self.cls(kind, path), self.value(obj.__wrapped__, f"{path}.__wrapped__"))
        return self._visit(obj, lambda: self._reduced(obj, path))

    def _partial(self, obj: partial, path: str) -> str:
        return _digest("partial", self.cls(type(obj), path), self.value(obj.func, f"{path}.func"),
                       self.value(obj.args, f"{path}.args"), self.value(obj.keywords, f"{path}.keywords"),
                       self.value(getattr(obj, "__dict__", None) or {}, f"{path}.__dict__"))

    def _builtin(self, obj: Any, path: str) -> str:
        owner = getattr(obj, "__self__", None)
        name = getattr(obj, "__name__", type(obj).__name__)
        if isinstance(getattr(obj, "__objclass__", None), type):  # str.upper, int.__add__: a method of a class
            return _digest("descriptor", self.cls(obj.__objclass__, path), name)
        if owner is None or isinstance(owner, ModuleType):
            module = getattr(obj, "__module__", None) or getattr(owner, "__name__", "")
            return _digest("ref", f"{module}.{getattr(obj, '__qualname__', name)}")
        return _digest("bound builtin", self.value(owner, f"{path}.__self__"), name)

    def _mapping(self, obj: Any, path: str, *, sort: bool) -> str:
        items = [(self.value(key, f"{path} (key {key!r})"), self.value(item, f"{path}[{key!r}]"))
                 for key, item in obj.items()]
        if sort:
            items.sort()
        return _digest("mapping", self.cls(type(obj), path), *(part for pair in items for part in pair))

    def _sequence(self, obj: list | tuple, path: str) -> str:
        if all(type(item) in _SIMPLE for item in obj):  # one dask call, not one per element
            return _digest("sequence", type(obj).__name__, self._dask(obj, path))
        return _digest("sequence", type(obj).__name__,
                       *(self.value(item, f"{path}[{index}]") for index, item in enumerate(obj)))

    def _set(self, obj: set | frozenset, path: str) -> str:
        # Ordered by digest: iteration order follows hash(), which PYTHONHASHSEED changes.
        return _digest("set", self.cls(type(obj), path),
                       *sorted(self.value(item, f"{path} (an element)") for item in obj))

    def _reduced(self, obj: Any, path: str) -> str:
        """An instance, by what pickling it records: how to rebuild it, and its state."""
        reducer = copyreg.dispatch_table.get(type(obj))
        try:
            reduced = reducer(obj) if reducer is not None else obj.__reduce_ex__(4)
        except Exception as error:
            raise _Unfingerprintable(path, obj, f"it cannot be pickled: {_first_sentence(error)}") from None
        if isinstance(reduced, str):  # pickled by reference to a global of that name
            return _digest("global", str(getattr(obj, "__module__", type(obj).__module__)), reduced)
        rebuild, args, state, listitems, dictitems, setter = (tuple(reduced) + (None,) * 6)[:6]
        try:
            parts = ["reduced", self.value(rebuild, f"{path}.__reduce__()[0]"),
                     self.value(args, f"{path}.__reduce__()[1]")]
            if isinstance(state, tuple) and len(state) == 2 and all(
                    part is None or isinstance(part, dict) for part in state):
                for index, part in enumerate(state):  # (__dict__, slots) of a class with __slots__
                    parts += [str(index), self._state(part or {}, path)]
            elif isinstance(state, dict):
                parts.append(self._state(state, path))
            else:
                parts.append(self.value(state, f"{path}.__getstate__()"))
            if listitems is not None:
                parts.append(self.value(list(listitems), f"{path} (items)"))
            if dictitems is not None:
                parts.append(self.value(list(dictitems), f"{path} (items)"))
            parts.append(self.value(setter, f"{path} (state setter)"))
        except _Unfingerprintable as error:
            if _is_user_type(type(obj)):
                error.owner = type(obj)
            raise
        return _digest(*parts)

    def _state(self, state: dict, path: str) -> str:
        items = sorted((self.value(key, f"{path} (attribute name)"), self.value(item, f"{path}.{key}"))
                       for key, item in state.items())
        return _digest("state", *(part for pair in items for part in pair))

    # --------------------------------------------------------- code and classes
    def function(self, fn: FunctionType, path: str, *, by_value: bool) -> str:
        if not by_value:
            return _digest("ref", _importable_name(fn) or "")
        return self._visit(fn, lambda: self._function_value(fn, path), memo=True)

    def _function_value(self, fn: FunctionType, path: str) -> str:
        code = fn.__code__
        parts = ["function", self._code_text(fn),
                 self.value(fn.__defaults__, f"{path}.__defaults__"),
                 self.value(fn.__kwdefaults__, f"{path}.__kwdefaults__")]
        for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
            try:
                contents = cell.cell_contents
            except ValueError:  # a cell not yet assigned
                parts += [name, "<empty cell>"]
                continue
            parts += [name, self.value(contents, f"{path}.__closure__[{name!r}]")]
        for name in sorted(_global_names(code)):
            if name in fn.__globals__:
                parts += [name, self.global_value(fn.__globals__[name], fn.__module__,
                                                  f"{path}.__globals__[{name!r}]")]
        return _digest(*parts)

    def _code_text(self, fn: FunctionType) -> str:
        # Two lambdas on one line share their source text: only their code tells them apart.
        if fn.__name__ != "<lambda>":
            # The source of fn's own code: getsource(fn) would follow __wrapped__ to another
            # function. Asked through a bare function of that code, not the code object itself:
            # a function names its module, where a code object has getsource look through every
            # loaded module for its file (0.05 s on a compile's critical path, 900 modules loaded).
            try:
                bare = FunctionType(fn.__code__, fn.__globals__, fn.__name__, None, fn.__closure__)
                return _digest("source", textwrap.dedent(inspect.getsource(bare)))
            except (OSError, TypeError):
                pass
        return self._code(fn.__code__)

    def _code(self, code: CodeType) -> str:
        return _digest("code", code.co_name, str(code.co_argcount), str(code.co_posonlyargcount),
                       str(code.co_kwonlyargcount), str(code.co_flags), code.co_code.hex(),
                       repr(code.co_names), repr(code.co_varnames), repr(code.co_freevars),
                       repr(code.co_cellvars), *(self._const(const) for const in code.co_consts))

    def _const(self, const: Any) -> str:
        if isinstance(const, CodeType):
            return self._code(const)
        if isinstance(const, tuple):
            return _digest("tuple", *(self._const(item) for item in const))
        if isinstance(const, frozenset):  # `x in {1, 2}` compiles to a frozenset constant
            return _digest("frozenset", *sorted(self._const(item) for item in const))
        return _digest("const", type(const).__name__, repr(const))

    def cls(self, kind: type, path: str, *, by_value: bool | None = None) -> str:
        """A class by value, or by ``module.qualname``; ``by_value=None``: by value unless a library's."""
        if by_value is None:
            by_value = not _is_library(kind)
        if by_value or _importable_name(kind) is None:
            return self._visit(kind, lambda: self._class_value(kind, path), memo=True)
        return _digest("ref", _importable_name(kind) or "")

    def _class_value(self, kind: type, path: str) -> str:
        parts = ["class", kind.__qualname__, self.cls(type(kind), path)]
        parts += [self.cls(base, path) for base in kind.__bases__]
        for name in sorted(set(kind.__dict__) - _CLASS_SKIP):
            parts += [name, self.global_value(kind.__dict__[name], kind.__module__, f"{path}.{name}")]
        return _digest(*parts)

    def global_value(self, obj: Any, home: str | None, path: str) -> str:
        """The digest of a value code reaches by name; one with no digest counts by its type."""
        if isinstance(obj, FunctionType):
            return self.function(obj, path, by_value=_by_value_as_global(obj, home))
        if isinstance(obj, type):
            return self.cls(obj, path, by_value=_by_value_as_global(obj, home))
        try:
            return self.value(obj, path)
        except (_Unfingerprintable, RecursionError):
            # A logger, a lock, a client: not chosen by the pipeline's author as an input.
            return _digest("unfingerprintable global", _type_name(type(obj)))


def _first_sentence(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.split(". ")[0].rstrip(".")


def _message(step: Step, root: str, root_value: Any, error: _Unfingerprintable) -> str:
    where = f"{root} (a {_type_name(type(root_value))} object)"
    if error.path != root:
        where += f", at {error.path} (a {_type_name(error.value_type)} object),"
    fix = (f"give {_type_name(error.owner)} a __dask_tokenize__ method" if error.owner is not None
           else "pass it inside an object of your own whose class has a __dask_tokenize__ method")
    return (f"step {step.name!r}: {where} cannot be fingerprinted deterministically ({error.reason}), "
            "so a resume could not tell this pipeline from another. To proceed, "
            f"{fix} that returns a deterministic value, e.g. a tuple of its parameters "
            f"(dask's tokenize protocol: {DASK_TOKENIZE_DOCS})")


def _step_parts(step: Step) -> dict[str, str]:
    """The digests of a step's parts: its axes, each of its functions, each kwarg."""
    walker = _Walker()
    roots: list[tuple[str, Any]] = [
        ("func" if channel is None else f"func[{channel}]", function)
        for channel, function in sorted(step.functions().items(), key=lambda item: (item[0] is not None, item[0] or 0))
    ]
    roots += [(f"kwargs[{key!r}]", value) for key, value in sorted(step.kwargs.items())]
    parts = {"axes": _digest("axes", repr(step.stack), repr(step.over), step.array_type)[:DIGEST_CHARS]}
    for root, value in roots:
        try:
            parts[root] = walker.value(value, root)[:DIGEST_CHARS]
        except _Unfingerprintable as error:
            raise FingerprintError(_message(step, root, value, error)) from None
        except RecursionError:
            raise FingerprintError(
                f"step {step.name!r}: {root} (a {_type_name(type(value))} object) is nested too deeply "
                f"to fingerprint; give its type a __dask_tokenize__ method ({DASK_TOKENIZE_DOCS})"
            ) from None
    return parts


def _step_digest(name: str, parts: dict[str, str]) -> str:
    return _digest("step", name, *(item for pair in sorted(parts.items()) for item in pair))[:DIGEST_CHARS]


def _pipeline_digest(pipeline: Pipeline, steps: list[tuple[str, str]]) -> str:
    return _digest("pipeline", pipeline.name, repr(pipeline.sequential),
                   *(item for pair in steps for item in pair))[:DIGEST_CHARS]


def step_fingerprints(pipeline: Pipeline) -> list[tuple[str, str]]:
    """``[(step name, digest)]`` in the pipeline's order.

    Raises
    ------
    FingerprintError
        If a value of a step cannot be fingerprinted deterministically.
    """
    return [(step.name, _step_digest(step.name, _step_parts(step))) for step in pipeline.steps]


def pipeline_fingerprint(pipeline: Pipeline) -> str:
    """The pipeline's digest: its name, its sequential axes and every step's digest.

    Raises
    ------
    FingerprintError
        If a value of a step cannot be fingerprinted deterministically.
    """
    return _pipeline_digest(pipeline, step_fingerprints(pipeline))


def pipeline_record(pipeline: Pipeline) -> dict[str, Any]:
    """The pipeline's entries in a run's the run manifest (``hcs_dask/zarr.json``): digests of the pipeline and of each step.

    A pipeline that cannot be fingerprinted still runs: its record holds
    ``pipeline_fingerprint: None`` and the reason, and a resume of that run is refused.
    """
    record: dict[str, Any] = {"pipeline": pipeline.name, "pipeline_fingerprint_version": FINGERPRINT_VERSION,
                              "pipeline_sequential": list(pipeline.sequential)}
    try:
        parts = [_step_parts(step) for step in pipeline.steps]
    except FingerprintError as error:
        return {**record, "pipeline_fingerprint": None, "pipeline_unfingerprintable": str(error)}
    steps = [(step.name, _step_digest(step.name, part)) for step, part in zip(pipeline.steps, parts)]
    return {**record, "pipeline_fingerprint": _pipeline_digest(pipeline, steps),
            "pipeline_steps": [{"name": name, "fingerprint": digest, "parts": part}
                               for (name, digest), part in zip(steps, parts)]}


def _describe_part(part: str) -> str:
    if part == "axes":
        return "its stack/over axes or array type"
    if part.startswith("func"):
        channel = part[len("func["):-1] if part != "func" else None
        which = "its function" if channel is None else f"its function for channel {channel}"
        return f"{which} (its code, or the values it is bound to or closes over)"
    return part


def _step_change(name: str, index: int, earlier: dict, now: dict) -> str:
    before, after = earlier.get("parts", {}), now["parts"]
    changes = [f"{_describe_part(part)} changed" for part in after if part in before and before[part] != after[part]]
    changes += [f"{_describe_part(part)} was added" for part in after if part not in before]
    changes += [f"{_describe_part(part)} was removed" for part in before if part not in after]
    return f"step {name!r} (step {index + 1}) differs ({', '.join(changes) or 'its code, bound values or kwargs changed'})"


def pipeline_difference(earlier: dict, now: dict) -> str | None:
    """Why the pipeline recorded in ``earlier`` is not the one in ``now``, or ``None`` if it is.

    Both are the run manifest (``hcs_dask/zarr.json``) records as made by :func:`pipeline_record`. The sentence names
    the first step that differs, the steps added or removed, or the pipeline's name or
    sequential axes.
    """
    if now.get("pipeline_fingerprint") is None:
        return (f"the pipeline cannot be compared with the earlier run's: "
                f"{now.get('pipeline_unfingerprintable')}")
    if earlier.get("pipeline_fingerprint_version") == FINGERPRINT_VERSION and earlier.get(
            "pipeline_fingerprint") == now["pipeline_fingerprint"]:
        return None
    prefix = "the pipeline differs from the earlier run's"
    if earlier.get("pipeline_fingerprint_version") != FINGERPRINT_VERSION:
        return (f"{prefix}, or cannot be shown to be the same: that run's fingerprint is of another kind "
                f"(made by another hcs_dask version: {earlier.get('pipeline_fingerprint')!r}, "
                f"now {now['pipeline_fingerprint']!r})")
    if earlier.get("pipeline_fingerprint") is None:
        return (f"{prefix}, or cannot be shown to be the same: the earlier run's could not be fingerprinted "
                f"({earlier.get('pipeline_unfingerprintable')})")
    reasons = []
    if earlier.get("pipeline") != now["pipeline"]:
        reasons.append(f"it is named {now['pipeline']!r}, the earlier run's {earlier.get('pipeline')!r}")
    if earlier.get("pipeline_sequential") != now["pipeline_sequential"]:
        reasons.append(f"its sequential axes are {now['pipeline_sequential']}, "
                       f"the earlier run's {earlier.get('pipeline_sequential')}")
    before, after = earlier.get("pipeline_steps", []), now["pipeline_steps"]
    matcher = difflib.SequenceMatcher(a=[s["name"] for s in before], b=[s["name"] for s in after], autojunk=False)
    for tag, start, end, new_start, new_end in matcher.get_opcodes():
        if tag in ("delete", "replace"):
            reasons += [f"step {s['name']!r} was removed" for s in before[start:end]]
        if tag in ("insert", "replace"):
            reasons += [f"step {s['name']!r} was added" for s in after[new_start:new_end]]
        if tag == "equal":
            reasons += [_step_change(new["name"], new_start + offset, old, new)
                        for offset, (old, new) in enumerate(zip(before[start:end], after[new_start:new_end]))
                        if old["fingerprint"] != new["fingerprint"]]
    if not reasons:
        reasons.append(f"fingerprint {earlier.get('pipeline_fingerprint')}, now {now['pipeline_fingerprint']}")
    return f"{prefix}: " + "; ".join(reasons)
