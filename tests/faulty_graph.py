"""A max-projection pipeline with faults switched on per well from outside the pipeline.

The switches live in the JSON file named by ``HCS_DASK_TEST_FAULTS`` (``{"A03": "raise",
...}``), so removing a fault does not change the pipeline's fingerprint and a resume is
allowed. Faults: ``raise``, ``exit`` (``os._exit(1)``), ``segv`` (a real SIGSEGV),
``memory`` (allocate until the nanny's memory limit kills the worker), ``sleep`` (hang
past any timeout), ``gil`` (hang in a regular expression that holds the GIL), ``badstr``
(stash 64 MiB in the well's scope, then raise an exception whose ``str()`` raises),
``slow`` (take a second) and ``slow:<seconds>``.
"""

import json
import os
import re
import signal
import time

import numpy as np

from hcs_dask import Pipeline, Step


def _fault(well: str) -> str | None:
    path = os.environ.get("HCS_DASK_TEST_FAULTS")
    if not path or not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle).get(well)


class Unprintable(RuntimeError):
    def __str__(self):
        raise ValueError("this message cannot be made")


def faulty_max(stack, *, context):
    fault = _fault(context.well)
    if fault == "raise":
        raise RuntimeError(f"injected failure in {context.well}")
    if fault == "exit":
        os._exit(1)
    if fault == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(10)  # the signal is delivered at once; never reached
    if fault == "gil":
        # Catastrophic backtracking: the regex engine holds the GIL for minutes.
        re.match(r"(a+)+$", "a" * 40 + "b")
    if fault == "badstr":
        context.scope.put("stash", np.ones(64 * 2**20, dtype=np.uint8))
        raise Unprintable()
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
    if fault and fault.startswith("slow:"):
        time.sleep(float(fault.split(":", 1)[1]))
    return stack.max(axis=0)


pipeline = Pipeline([Step(faulty_max, stack="z", name="faulty_max")], name="faulty")
