"""A failing step defined in a pipeline file or a notebook cell shows its own source lines in the
well's traceback, also where the worker cannot read that file."""

from __future__ import annotations

import textwrap

import pytest

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


@pytest.mark.slow
def test_a_notebook_step_shows_its_cell_lines_in_another_process(synthetic_source, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    blob_path = tmp_path / "pipeline.pickle"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(textwrap.dedent(f"""
        import cloudpickle
        from hcs_dask import Pipeline, Step

        def measure(stack):
            total = int(stack.sum())
            raise RuntimeError(f"measure failed on purpose after {{total}}")

        pipeline = Pipeline([Step(measure, stack="z", name="measure")])
        open({str(blob_path)!r}, "wb").write(cloudpickle.dumps(pipeline))
    """))])
    NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    blob = blob_path.read_bytes()

    # This process never saw the cell: like a worker, it has only the pickle.
    import cloudpickle

    pipeline = cloudpickle.loads(blob)
    graph = compile_plate(open_plate(synthetic_source).select(["A01"]), pipeline, tmp_path / "o.ome.zarr")
    result = run_well(graph.plans[0], blob)
    assert result.status == "failed"
    text = result.traceback
    assert "ipykernel" in text and "line 6, in measure" in text, text
    assert 'raise RuntimeError(f"measure failed on purpose after {total}")' in text
