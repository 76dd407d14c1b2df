"""Count nuclei per site and measure every channel inside them.

The graph, per well (each line is one :class:`~hcs_dask.pipeline.Step`; ``stack``
says which axes one call of the function sees at once, every other axis is
looped over):

1. ``background`` -- :func:`~hcs_dask.steps.subtract_background` on each 2-D
   image: removes uneven illumination and camera offset (``float32``, >= 0).
   Its ``radius`` defaults to a twentieth of the image side; pass
   ``kwargs={"radius": ...}`` (about the radius of your largest nuclei, in
   pixels, up to twice it) when your nuclei are much smaller or larger.
2. ``max_projection`` -- :func:`~hcs_dask.steps.max_projection` with
   ``stack="z"``: each call gets one site's and channel's ``(z, y, x)`` stack and
   returns a 2-D image, so the z axis is gone after this step.
3. ``smooth`` -- :func:`~hcs_dask.steps.smooth`, a Gaussian of sigma 1 px on
   each image, which steadies the threshold and the split of touching nuclei.
4. ``count_nuclei`` -- :func:`~hcs_dask.steps.count_nuclei` with
   ``stack="channel"``: each call gets one site's ``(channel, y, x)`` stack,
   finds the nuclei of the nuclear channel (Otsu threshold, then one seed per
   peak of the distance transform, so touching nuclei count apart; the
   watershed that would flood the seeds is skipped, as it changes neither the
   count nor the nuclear pixels) and returns the stack unchanged plus
   ``nuclei_count``, ``nuclei_mean_area_px`` and ``mean_intensity_w<c>`` for
   every channel; these become the per-site rows of the measurement table.

To make your own, copy this file and edit the list in :func:`make_pipeline`:
change ``nuclear_channel`` to the channel of your nuclear stain, pass the
segmentation's ``min_size`` / ``min_distance`` in ``kwargs`` if the automatic
ones (from the nuclei's own size) do not suit, or insert steps of your own:
any function of one array works, e.g. ``Step(my_func, name="my_step")``.

Run it with ``hcs-dask run nuclei_count PLATE -o OUT.ome.zarr`` (``--device gpu`` runs
every step on CuPy arrays), or ``load_pipeline("nuclei_count", device="gpu")``.
"""

from __future__ import annotations

from hcs_dask.pipeline import Pipeline, Step, array_type_for
from hcs_dask.steps import count_nuclei, max_projection, smooth, subtract_background

def make_pipeline(device: str = "cpu") -> Pipeline:
    """The nuclei-count pipeline on ``device``.

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
    array_type = array_type_for(device)
    return Pipeline(
        [
            # No radius: the default follows the image size (see subtract_background).
            Step(subtract_background, name="background", array_type=array_type),
            Step(max_projection, stack="z", name="max_projection", array_type=array_type),
            Step(smooth, name="smooth", array_type=array_type, kwargs={"sigma": 1.0}),
            Step(count_nuclei, stack="channel", name="count_nuclei", array_type=array_type,
                 kwargs={"nuclear_channel": 1}),
        ],
        name="nuclei_count",
    )


pipeline = make_pipeline()
