"""Built-in image functions for pipeline steps, on NumPy or CuPy arrays alike.

Each function takes one array and dispatches on its type (the way dask-image
does): NumPy arrays run on scipy.ndimage and scikit-image, CuPy arrays on
``cupyx.scipy.ndimage``. CuPy is registered lazily, so importing this package
never imports it; a step declared with ``array_type="cupy"`` receives CuPy arrays
and runs on the GPU with the same code.

>>> from hcs_dask.pipeline import Step
>>> Step(max_projection, stack="z", name="max_projection")
Step('max_projection', stack=('z',))
"""

from hcs_dask.steps._filters import max_projection, percentile_normalize, smooth, subtract_background
from hcs_dask.steps._segment import count_nuclei, segment_nuclei

__all__ = [
    "count_nuclei",
    "max_projection",
    "percentile_normalize",
    "segment_nuclei",
    "smooth",
    "subtract_background",
]
