"""Pipeline identity from what the pipeline computes: code, bound values, kwargs by content."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from hcs_dask import Pipeline, Step, load_pipeline, open_plate, run_plate
from hcs_dask.compile import ResumeError
from hcs_dask.fingerprint import FingerprintError, pipeline_difference, pipeline_record
from hcs_dask.formats import write_synthetic_plate

_LOG = logging.getLogger("hcs_dask.test_fingerprint")
_LOCK = threading.Lock()


def scale(image, factor):
    return image * factor


def make_offset(offset):
    def add(image):
        return image + offset
    return add


def uses_unfingerprintable_globals(image):
    with _LOCK:  # a lock and a logger: globals no one chose as an input
        _LOG.debug("scaling %s", os.getpid())
    return image


class Model:
    def __init__(self, threshold):
        self.threshold = threshold
        self._lock = threading.Lock()

    def predict(self, image):
        return image > self.threshold


class TokenizedModel(Model):
    def __dask_tokenize__(self):
        return ("TokenizedModel", self.threshold)


def _one(step: Step) -> Pipeline:
    return Pipeline([step], name="p")


# ------------------------------------------------------------- what counts
def test_partial_arguments_count():
    two = _one(Step(functools.partial(scale, factor=2), name="scale"))
    assert two.fingerprint() == _one(Step(functools.partial(scale, factor=2), name="scale")).fingerprint()
    assert two.fingerprint() != _one(Step(functools.partial(scale, factor=3), name="scale")).fingerprint()


def test_closed_over_values_count():
    assert _one(Step(make_offset(1), name="add")).fingerprint() == _one(Step(make_offset(1), name="add")).fingerprint()
    assert _one(Step(make_offset(1), name="add")).fingerprint() != _one(Step(make_offset(2), name="add")).fingerprint()


def test_array_kwargs_count_by_content():
    weights = np.zeros(10_000)
    changed = weights.copy()
    changed[5_000] = 1.0
    same = _one(Step(scale, kwargs={"factor": weights.copy()}))
    assert _one(Step(scale, kwargs={"factor": weights})).fingerprint() == same.fingerprint()
    assert _one(Step(scale, kwargs={"factor": changed})).fingerprint() != same.fingerprint()
    as_float32 = _one(Step(scale, kwargs={"factor": weights.astype(np.float32)}))
    assert as_float32.fingerprint() != same.fingerprint()


def test_bound_instances_and_channel_functions_count():
    def by_method(threshold):
        return _one(Step(TokenizedModel(threshold).predict, name="predict"))

    assert by_method(0.5).fingerprint() == by_method(0.5).fingerprint() != by_method(0.6).fingerprint()

    def by_channel(factor):
        return _one(Step({1: make_offset(0), 2: functools.partial(scale, factor=factor)}, name="per_channel"))

    assert by_channel(2).fingerprint() == by_channel(2).fingerprint() != by_channel(3).fingerprint()


def test_library_functions_count_by_name():
    def reduce_with(function):
        return _one(Step(scale, kwargs={"factor": function}))

    assert reduce_with(np.mean).fingerprint() == reduce_with(np.mean).fingerprint()
    assert reduce_with(np.mean).fingerprint() != reduce_with(np.median).fingerprint()
    assert _one(Step(np.max, stack="z")).fingerprint() != _one(Step(np.min, stack="z")).fingerprint()


def test_cycles_end():
    def countdown(image, n=3):
        return image if n == 0 else countdown(image, n - 1)  # closes over itself

    looped: list = []
    looped.append(looped)
    first = _one(Step(countdown, kwargs={"n": looped}))
    assert first.fingerprint() == _one(Step(countdown, kwargs={"n": looped})).fingerprint()


def test_unexplicit_globals_that_cannot_be_hashed_count_by_type():
    pipeline = _one(Step(uses_unfingerprintable_globals))
    assert pipeline.fingerprint() == _one(Step(uses_unfingerprintable_globals)).fingerprint()


def test_a_changed_helper_changes_the_step(tmp_path):
    source = textwrap.dedent('''
        from hcs_dask import Pipeline, Step

        def _offset():
            return {offset}

        def shift(image):
            return image + _offset()

        pipeline = Pipeline([Step(shift, name="shift")], name="shift")
    ''')
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "graph.py").write_text(source.format(offset=1))
    (tmp_path / "b" / "graph.py").write_text(source.format(offset=1))
    (tmp_path / "changed.py").write_text(source.format(offset=2))
    original = load_pipeline(tmp_path / "a" / "graph.py")
    # The same code from another file: the module's name differs, what it computes does not.
    assert load_pipeline(tmp_path / "b" / "graph.py").fingerprint() == original.fingerprint()
    assert load_pipeline(tmp_path / "changed.py").fingerprint() != original.fingerprint()


def test_a_step_counts_by_its_own_source_text(tmp_path):
    # The same code with another comment in its body: only the source text tells them apart
    # (the code-object fallback of an unreadable source would give both one fingerprint). The
    # wrapper of a functools.wraps decorator counts by its own source, not the wrapped one's, and
    # a closure's inner function by its source too.
    source = textwrap.dedent('''
        import functools
        from hcs_dask import Pipeline, Step

        def traced(fn):
            @functools.wraps(fn)
            def wrapper(image):
                return fn(image)  # {wrapper}
            return wrapper

        @traced
        def shift(image):
            return image + 1  # {body}

        def make_scale(factor):
            def scale(image):
                return image * factor  # {inner}
            return scale

        pipeline = Pipeline([Step(shift, name="shift"), Step(make_scale(2), name="scale")], name="g")
    ''')
    variants = {"same": ("w", "b", "i"), "copy": ("w", "b", "i"), "wrapper": ("w2", "b", "i"),
                "body": ("w", "b2", "i"), "inner": ("w", "b", "i2")}
    steps = {}
    for name, (wrapper, body, inner) in variants.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "graph.py").write_text(source.format(wrapper=wrapper, body=body, inner=inner))
        steps[name] = dict(load_pipeline(tmp_path / name / "graph.py").step_fingerprints())
    assert steps["copy"] == steps["same"]
    assert steps["wrapper"]["shift"] != steps["same"]["shift"]
    assert steps["wrapper"]["scale"] == steps["same"]["scale"]
    # The wrapped function is a closure value of the wrapper: its own comment counts too.
    assert steps["body"]["shift"] != steps["same"]["shift"]
    assert steps["inner"]["scale"] != steps["same"]["scale"]
    assert steps["inner"]["shift"] == steps["same"]["shift"]


# ------------------------------------------------------- what cannot count
def test_an_unfingerprintable_kwarg_names_the_step_and_the_way_out():
    pipeline = _one(Step(scale, name="segment", kwargs={"factor": Model(0.5)}))
    with pytest.raises(FingerprintError, match=r"step 'segment': kwargs\['factor'\] \(a [\w.]*Model object\)") as info:
        pipeline.fingerprint()
    message = str(info.value)
    assert "kwargs['factor']._lock" in message and "__dask_tokenize__" in message
    assert "Model" in message.split("give ")[1]  # the type to give the method to

    def tokenized(threshold):
        return _one(Step(scale, name="segment", kwargs={"factor": TokenizedModel(threshold)}))

    assert tokenized(0.5).fingerprint() == tokenized(0.5).fingerprint() != tokenized(0.7).fingerprint()


def test_an_unfingerprintable_closure_names_its_variable():
    lock = threading.Lock()

    def guarded(image):
        with lock:
            return image

    with pytest.raises(FingerprintError, match=r"step 'guarded': func \(a function object\), "
                                               r"at func.__closure__\['lock'\].*inside an object of your own"):
        _one(Step(guarded, name="guarded")).fingerprint()


# ------------------------------------------------- the same in every process
PIPELINE_SOURCE = '''
import dataclasses
import functools

from hcs_dask import Pipeline, Step

LABELS = {"nuclei", "cells", "background", "spots", "edges", "holes", "debris", "halo"}


@dataclasses.dataclass(frozen=True)
class Settings:
    names: frozenset
    gain: float = 1.0

    def total(self):
        return len(self.names) * self.gain


def _total(image, amount):
    return image + amount


def keep(image, *, labels, weights, settings):
    return _total(image, len(labels) + sum(weights.values()) + settings.total())


def scale(image, factor):
    return image * factor


def make_offset(offset):
    def add(image):
        return image + len(offset)
    return add


pipeline = Pipeline(
    [
        Step(keep, name="keep", kwargs={"labels": set(LABELS), "weights": {"b": 2.0, "a": 1.0},
                                        "settings": Settings(frozenset(LABELS), 0.5)}),
        Step(functools.partial(scale, factor=2), name="scale"),
        Step(make_offset(frozenset(LABELS)), name="offset"),
        Step(lambda image: image if "nuclei" in {"nuclei", "cells", "spots"} else -image, name="flip"),
    ],
    name="seeded",
)
'''

REPORT = '''
import json
print(json.dumps({"fingerprint": pipeline.fingerprint(), "steps": pipeline.step_fingerprints(),
                  "order": list(pipeline.steps[0].kwargs["labels"])}))
'''


def _in_subprocess(tmp_path: Path, how: str, seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    if how == "file":  # a pipeline file, by load_pipeline: functions have source text
        graph = tmp_path / "seeded.py"
        graph.write_text(PIPELINE_SOURCE)
        script = f"from hcs_dask import load_pipeline\npipeline = load_pipeline({str(graph)!r})\n" + REPORT
        command = [sys.executable, "-c", script]
        stdin = None
    else:  # __main__ from standard input: no source text, the code objects are walked
        command = [sys.executable, "-"]
        stdin = PIPELINE_SOURCE + REPORT
    done = subprocess.run(command, input=stdin, env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("how", ["file", "main"])
def test_the_same_in_processes_with_another_hash_seed(tmp_path, how):
    one, two = _in_subprocess(tmp_path, how, "1"), _in_subprocess(tmp_path, how, "2")
    assert one["order"] != two["order"]  # the set kwarg really iterates differently
    assert one["steps"] == two["steps"]
    assert one["fingerprint"] == two["fingerprint"]


# ------------------------------------------------------ resume and run.json
def _record(steps, *, name="p", sequential=None):
    return pipeline_record(Pipeline(steps, name=name, sequential=sequential))


def test_difference_names_what_changed():
    earlier = _record([Step(make_offset(1), name="add"), Step(scale, name="scale", kwargs={"factor": 2})])
    assert pipeline_difference(earlier, earlier) is None
    kwarg = pipeline_difference(
        earlier, _record([Step(make_offset(1), name="add"), Step(scale, name="scale", kwargs={"factor": 3})]))
    assert kwarg.startswith("the pipeline differs") and "step 'scale' (step 2)" in kwarg
    assert "kwargs['factor'] changed" in kwarg and "'add'" not in kwarg
    closure = pipeline_difference(
        earlier, _record([Step(make_offset(2), name="add"), Step(scale, name="scale", kwargs={"factor": 2})]))
    assert "step 'add' (step 1)" in closure and "its function" in closure
    added = pipeline_difference(earlier, _record([Step(make_offset(1), name="add"), Step(make_offset(1), name="again"),
                                                  Step(scale, name="scale", kwargs={"factor": 2})]))
    assert "step 'again' was added" in added
    removed = pipeline_difference(earlier, _record([Step(scale, name="scale", kwargs={"factor": 2})]))
    assert "step 'add' was removed" in removed
    renamed = pipeline_difference(
        earlier, _record([Step(make_offset(1), name="add"), Step(scale, name="scale", kwargs={"factor": 2})],
                         name="q", sequential="timepoint"))
    assert "named 'q'" in renamed and "sequential axes" in renamed and "step" not in renamed
    older = {"pipeline": "p", "pipeline_fingerprint": "0123456789abcdef"}  # a store from an earlier version
    assert "another hcs_dask version" in pipeline_difference(older, earlier)


def test_an_unfingerprintable_pipeline_runs_but_is_not_resumed():
    record = _record([Step(scale, name="segment", kwargs={"factor": Model(0.5)})])
    assert record["pipeline_fingerprint"] is None and "kwargs['factor']" in record["pipeline_unfingerprintable"]
    fine = _record([Step(scale, name="segment", kwargs={"factor": 2})])
    assert "__dask_tokenize__" in pipeline_difference(fine, record)
    assert "could not be fingerprinted" in pipeline_difference(record, fine)


RESUMED_GRAPH = '''
import functools

from hcs_dask import Pipeline, Step


def scale(stack, factor, token=None):
    return stack.max(axis=0) * factor


class Token:
    """Picklable, but it holds a bare object(), which has no deterministic digest."""

    def __init__(self):
        self.nonce = object()


def make_pipeline(factor=2, token=False):
    kwargs = {"token": Token()} if token else {}
    return Pipeline([Step(functools.partial(scale, factor=factor), stack="z", name="scale", kwargs=kwargs)],
                    name="resumed")
'''


@pytest.mark.slow
def test_a_refused_resume_names_the_step(tmp_path):
    graph = tmp_path / "resumed.py"
    graph.write_text(RESUMED_GRAPH)
    root = write_synthetic_plate(tmp_path / "plate", wells=2, sites=1, channels=1, z=2, size=32, seed=6)
    output = tmp_path / "o.ome.zarr"
    options = {"n_workers": 1, "progress": False}
    assert run_plate(open_plate(root), load_pipeline(graph, factor=2), output, **options).ok
    # Reloaded from its file (new function objects), the same pipeline resumes.
    assert run_plate(open_plate(root), load_pipeline(graph, factor=2), output, resume=True, **options).ok
    with pytest.raises(ResumeError, match=r"pipeline differs.*step 'scale' \(step 1\) differs.*its function"):
        run_plate(open_plate(root), load_pipeline(graph, factor=3), output, resume=True, **options)

    unhashable = tmp_path / "token.ome.zarr"
    assert run_plate(open_plate(root), load_pipeline(graph, token=True), unhashable, **options).ok
    with pytest.raises(ResumeError, match=r"step 'scale': kwargs\['token'\].*__dask_tokenize__"):
        run_plate(open_plate(root), load_pipeline(graph, token=True), unhashable, resume=True, **options)
