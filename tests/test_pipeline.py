"""Pipeline definitions: validation sentences name the step and say what is wrong."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from hcs_dask.compile import check_sequential
from hcs_dask.pipeline import Pipeline, PipelineError, Step, StepContext, load_pipeline


def project(stack):
    return stack.max(axis=0)


def scale(image, *, factor=2.0):
    return image * factor


def with_context(image, *, context):
    return image


def two_arrays(a, b):
    return a + b


def test_step_defaults_iterate_every_axis_not_stacked():
    step = Step(project, stack="z")
    assert step.stack == ("z",)
    assert step.iterated_axes() == ("site", "channel", "timepoint")
    assert step.name == "project"


def test_step_pickles_with_its_kwargs():
    step = Step(scale, kwargs={"factor": 3.0}, name="triple")
    again = pickle.loads(pickle.dumps(step))
    assert again.name == "triple" and dict(again.kwargs) == {"factor": 3.0}


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: Step(42, name="bad"), ["'bad'", "not callable"]),
        (lambda: Step(project, stack="zz", name="p"), ["'p'", "unknown axis 'zz'"]),
        (lambda: Step(project, stack="z", over=("z", "site"), name="p"), ["'p'", "both stacked and iterated"]),
        (lambda: Step(two_arrays, name="add"), ["'add'", "cannot be called"]),
        (lambda: Step(scale, kwargs={"nope": 1}, name="s"), ["'s'", "cannot be called"]),
        (lambda: Step({1: scale}, stack="channel", name="d"), ["'d'", "iterate over 'channel'"]),
        (lambda: Step({"DAPI": scale}, name="d"), ["'d'", "channel numbers"]),
        (lambda: Step(scale, array_type="jax", name="s"), ["'s'", "array_type"]),
    ],
    ids=["not-callable", "unknown-axis", "stacked-and-iterated", "signature", "bad-kwarg", "dict-stacked",
         "dict-keys", "array-type"],
)
def test_invalid_steps_are_explained(make, words):
    with pytest.raises(PipelineError) as error:
        make()
    for word in words:
        assert word in str(error.value)


def test_context_parameter_is_detected():
    assert Step(with_context).takes_context()
    assert not Step(scale).takes_context()
    context = StepContext(well="B03", site=1, channel=(1, 2), z=1, timepoint=1, step="s")
    assert context.channel == (1, 2)


def test_pipeline_rejects_non_steps_and_unknown_sequential_axis():
    with pytest.raises(PipelineError, match="item 0 is function"):
        Pipeline([project])
    with pytest.raises(PipelineError, match="unknown sequential axis 'frame'"):
        Pipeline([Step(scale)], sequential=("frame",))
    with pytest.raises(PipelineError, match="no steps"):
        Pipeline([])


def test_sequential_axis_cannot_be_stacked():
    pipeline = Pipeline([Step(project, stack="timepoint", name="tmax")], sequential="timepoint")
    with pytest.raises(PipelineError, match="'tmax' stacks axis 'timepoint'"):
        check_sequential(pipeline)


def test_fingerprint_follows_kwargs_not_identity():
    a = Pipeline([Step(scale, kwargs={"factor": 2.0})])
    b = Pipeline([Step(scale, kwargs={"factor": 2.0})])
    c = Pipeline([Step(scale, kwargs={"factor": 3.0})])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_load_pipeline_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "from hcs_dask import Pipeline, Step\n"
        "def double(image):\n    return image * 2\n"
        "pipeline = Pipeline([Step(double)], name='mine')\n"
    )
    pipeline = load_pipeline(path)
    assert pipeline.name == "mine"
    assert pipeline.steps[0].func(np.ones(2)).tolist() == [2, 2]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("x = 1\n", ["defines no `pipeline`"]),
        ("pipeline = 3\n", ["not a hcs_dask.Pipeline"]),
        ("import nonexistent_module_xyz\n", ["failed to import", "nonexistent_module_xyz"]),
        ("from hcs_dask import Pipeline, Step\npipeline = Pipeline([Step(5, name='five')])\n",
         ["'five'", "not callable"]),
    ],
    ids=["no-pipeline", "not-a-pipeline", "import-error", "invalid-step"],
)
def test_bad_pipeline_files_name_the_file(tmp_path, text, words):
    path = tmp_path / "broken.py"
    path.write_text(text)
    with pytest.raises(PipelineError) as error:
        load_pipeline(path)
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_unknown_graph_lists_the_bundled_ones():
    with pytest.raises(PipelineError, match="nuclei_count"):
        load_pipeline("no_such_graph")
