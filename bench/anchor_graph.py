"""The anchor workload as a pipeline file, for timing the whole ``hcs-dask run`` command.

Percentile normalisation over each z-stack, then max projection over z: the same
pipeline as ``_common.anchor_pipeline()``, in a file that imports only hcs_dask, so that
``hcs-dask run bench/anchor_graph.py PLATE -o OUT`` pays nothing of the benchmark helpers.
"""

from hcs_dask.pipeline import Pipeline, Step
from hcs_dask.steps import max_projection, percentile_normalize

__all__ = ["pipeline"]

pipeline = Pipeline(
    [
        Step(percentile_normalize, stack="z", name="percentile_normalize"),
        Step(max_projection, stack="z", name="max_projection"),
    ],
    name="anchor",
)
