"""The source lines of step functions, shipped with a pipeline so that tracebacks show them.

A function defined in a notebook cell or a pipeline file travels to the workers by value
(cloudpickle), and with it only its code, renamed ``<dynamic-code>``: a worker's traceback
shows ``File "<dynamic-code>", line 7`` and no line. The client reads the text where it
knows it (IPython keeps every cell in :mod:`linecache`; a file is read from disk) and
notes which file each function's code came from; the pickled pipeline carries both, and
unpickling gives the code its file name back and registers the text in the worker's
:mod:`linecache`.
"""

from __future__ import annotations

import functools
import hashlib
import linecache
from collections.abc import Mapping
from types import CodeType, FunctionType, MethodType
from typing import Any, Callable, Iterable

import cloudpickle

__all__ = ["function_sources", "register_sources"]

#: Source files shipped per pipeline at most; a guard against walking a whole program.
MAX_FILES = 64
#: The file name cloudpickle gives the code it pickles by value.
_PICKLED_NAME = "<dynamic-code>"


def _by_value(function: FunctionType) -> bool:
    """Whether cloudpickle ships the function by value: defined in ``__main__`` (a notebook, a
    script) or in a module registered to pickle by value (a pipeline file)."""
    module = getattr(function, "__module__", None)
    if not isinstance(module, str) or module == "__main__":
        return True
    registered = cloudpickle.list_registry_pickle_by_value()
    parts = module.split(".")
    return any(".".join(parts[:end]) in registered for end in range(1, len(parts) + 1))


def _code_names(code: CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _code_names(const)
    return names


def _code_key(code: CodeType) -> str:
    """Names a code object by what survives pickling: qualified name, first line, bytecode."""
    return f"{code.co_qualname}:{code.co_firstlineno}:{hashlib.sha256(code.co_code).hexdigest()[:16]}"


def _relabel(code: CodeType, filename: str) -> CodeType:
    """``code`` and the code objects inside it (nested functions, comprehensions) with this file name."""
    consts = tuple(_relabel(c, filename) if isinstance(c, CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def _functions(values: Iterable[Any], wanted: Callable[[FunctionType], bool] = _by_value) -> Iterable[FunctionType]:
    """The ``wanted`` functions among ``values``, the values they are bound to or close over,
    and the ``wanted`` functions their code calls by global name."""
    stack = list(values)
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, functools.partial):
            stack += [value.func, *value.args, *value.keywords.values()]
        elif isinstance(value, MethodType):
            stack.append(value.__func__)
        elif isinstance(value, Mapping):
            stack += list(value.values())
        elif isinstance(value, (list, tuple)):
            stack += list(value)
        elif isinstance(value, FunctionType):
            if not wanted(value):
                continue
            yield value
            stack += [cell.cell_contents for cell in value.__closure__ or () if _filled(cell)]
            stack += [value.__globals__[name] for name in sorted(_code_names(value.__code__))
                      if isinstance(value.__globals__.get(name), (FunctionType, functools.partial))]
        elif callable(value) and not isinstance(value, type):
            call = getattr(type(value), "__call__", None)
            if isinstance(call, FunctionType):
                stack.append(call)


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def function_sources(values: Iterable[Any]) -> dict[str, dict]:
    """The text of the by-value functions in ``values``, where it is known here.

    Returns ``{"files": {file name: lines}, "code": {code key: file name}}``.

    >>> function_sources([len])  # a builtin travels by reference: nothing to ship
    {'files': {}, 'code': {}}
    """
    files: dict[str, list[str]] = {}
    code: dict[str, str] = {}
    for function in _functions(values):
        filename = function.__code__.co_filename
        if filename not in files and len(files) < MAX_FILES:
            lines = linecache.getlines(filename, function.__globals__)
            if lines:
                files[filename] = list(lines)
        if filename in files:
            code[_code_key(function.__code__)] = filename
    return {"files": files, "code": code}


def register_sources(sources: Mapping[str, dict] | None, values: Iterable[Any]) -> None:
    """Give the unpickled functions in ``values`` their file names back and put the files'
    text into this process's :mod:`linecache`, so that tracebacks through them show lines.

    The :mod:`linecache` entries carry no modification time, so
    :func:`linecache.checkcache` keeps them: they are the text of the code that runs, even
    where a file of that name differs.
    """
    if not sources:
        return
    for filename, lines in sources.get("files", {}).items():
        linecache.cache[filename] = (sum(len(line) for line in lines), None, list(lines), filename)
    origins = sources.get("code", {})
    # Here the pipeline file's module is not registered to pickle by value: what counts is
    # that cloudpickle renamed the code.
    for function in _functions(values, lambda f: f.__code__.co_filename == _PICKLED_NAME):
        filename = origins.get(_code_key(function.__code__))
        if filename is not None and function.__code__.co_filename != filename:
            function.__code__ = _relabel(function.__code__, filename)
