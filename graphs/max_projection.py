"""Maximum-intensity projection over z of every channel.

One step: :func:`~hcs_dask.steps.max_projection` with ``stack="z"``, so each
call receives one site's, channel's and timepoint's ``(z, y, x)`` stack and
returns the 2-D projection, in the input's dtype. The output plate has the
same sites, channels and timepoints as the input, and one z plane.

Run it with ``hcs-dask run max_projection PLATE -o OUT.ome.zarr``, or
``load_pipeline("max_projection", device="gpu")`` to project on CuPy arrays.
"""

from __future__ import annotations

from hcs_dask.pipeline import Pipeline, Step, array_type_for
from hcs_dask.steps import max_projection

def make_pipeline(device: str = "cpu") -> Pipeline:
    """The max-projection pipeline on ``device``.

    Parameters
    ----------
    device : {"cpu", "gpu"}
        ``"cpu"`` runs on NumPy arrays, ``"gpu"`` on CuPy arrays.

    Returns
    -------
    Pipeline

    Raises
    ------
    PipelineError
        If ``device`` is neither ``"cpu"`` nor ``"gpu"``.
    """
    return Pipeline(
        [Step(max_projection, stack="z", name="max_projection", array_type=array_type_for(device))],
        name="max_projection",
    )


pipeline = make_pipeline()
