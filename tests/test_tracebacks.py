"""A failing step defined in a pipeline file shows its own source lines in the well's traceback,
also where the worker cannot read that file. (A step defined in a notebook cell: the quickstart
notebook's failing well, checked in tests/test_notebooks.py.)"""

from __future__ import annotations

import textwrap

from hcs_dask import compile_plate, load_pipeline, open_plate, run_well


def test_a_pipeline_file_step_shows_its_lines_on_a_worker_without_the_file(synthetic_source, tmp_path, client):
    import cloudpickle

    graph = tmp_path / "my_graph.py"
    graph.write_text(textwrap.dedent("""
        from hcs_dask import Pipeline, Step


        def measure(stack):
            brightest = stack.max()
            raise ValueError(f"no nuclei above {brightest}")


        pipeline = Pipeline([Step(measure, stack="z", name="measure")])
    """))
    pipeline = load_pipeline(graph)
    plan = compile_plate(open_plate(synthetic_source).select(["A01"]), pipeline, tmp_path / "o.ome.zarr").plans[0]
    blob = cloudpickle.dumps(pipeline)  # what submit_plate sends, made while the file is there
    graph.unlink()  # the worker cannot read the file, as on another machine
    result = client.submit(run_well, plan, blob, pure=False).result()
    assert result.status == "failed"
    text = result.traceback
    assert f'File "{graph}", line 7, in measure' in text, text
    assert 'raise ValueError(f"no nuclei above {brightest}")' in text
    assert "<dynamic-code>" not in text
