"""A max-projection pipeline with faults switched on per well from outside the pipeline.

The switches live in the JSON file named by ``HCS_DASK_TEST_FAULTS`` (``{"A03": "raise",
...}``), so removing a fault does not change the pipeline's fingerprint and a resume is
allowed. Faults: ``raise``, ``exit`` (``os._exit(1)``), ``memory`` (allocate until the
nanny's memory limit kills the worker), ``sleep`` (hang past any timeout), ``slow``
(take a second).
"""

import json
import os
import time

import numpy as np

from hcs_dask import Pipeline, Step


def _fault(well: str) -> str | None:
    path = os.environ.get("HCS_DASK_TEST_FAULTS")
    if not path or not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle).get(well)


def faulty_max(stack, *, context):
    fault = _fault(context.well)
    if fault == "raise":
        raise RuntimeError(f"injected failure in {context.well}")
    if fault == "exit":
        os._exit(1)
    if fault == "memory":
        hog = []
        for _ in range(200):  # at most ~10 GB; the nanny stops it long before
            hog.append(np.ones(50 * 2**20 // 8))
            time.sleep(0.02)
        raise MemoryError("the memory limit did not stop this well")
    if fault == "sleep":
        time.sleep(300)
    if fault == "slow":
        time.sleep(1.0)
    return stack.max(axis=0)


pipeline = Pipeline([Step(faulty_max, stack="z", name="faulty_max")], name="faulty")
