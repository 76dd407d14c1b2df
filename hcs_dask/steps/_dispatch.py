"""Choose the array library of a step from the type of its input array.

The steps are written once against a small :class:`ArrayBackend` (an array module
``xp``, an ``ndimage`` module and a watershed), and :data:`array_backend` picks the
backend for an array the way dask-image picks its filters: a
:class:`dask.utils.Dispatch` with both NumPy and CuPy registered lazily, so that
importing the steps (a client loading a pipeline file) imports neither CuPy nor
SciPy (``scipy.ndimage``: about 0.3 s). Each backend is built the first time an
array of its library arrives, when that library is by definition imported; the NumPy
backend imports ``scipy.ndimage`` only when a step first uses it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
from dask.utils import Dispatch

__all__ = ["ArrayBackend", "array_backend", "backend_for", "make_backend_dispatch", "propagate_markers"]


class ArrayBackend:
    """The array library a step runs on.

    Parameters
    ----------
    name
        ``"numpy"`` or ``"cupy"`` (or a name of a registered third backend).
    xp
        The array module: :mod:`numpy` or :mod:`cupy`.
    ndimage
        :mod:`scipy.ndimage` or :mod:`cupyx.scipy.ndimage`, or the name of such a module, which
        is then imported the first time :attr:`ndimage` is read (the NumPy backend does this: a
        pipeline whose steps never filter, such as normalise and project, never imports SciPy).
    watershed
        ``watershed(distance, markers, mask) -> labels``: floods ``markers`` over
        ``mask``, splitting touching objects along the valleys of ``distance``
        (larger values are object centres).

    Examples
    --------
    >>> import numpy as np
    >>> backend = ArrayBackend("numpy", np, "scipy.ndimage", lambda distance, markers, mask: markers)
    >>> backend.ndimage.__name__
    'scipy.ndimage'
    """

    __slots__ = ("name", "xp", "_ndimage", "watershed")

    def __init__(self, name: str, xp: ModuleType, ndimage: ModuleType | str,
                 watershed: Callable[[Any, Any, Any], Any]) -> None:
        self.name = name
        self.xp = xp
        self._ndimage = ndimage
        self.watershed = watershed

    @property
    def ndimage(self) -> ModuleType:
        """The ndimage module, imported now if it was given by name."""
        if isinstance(self._ndimage, str):
            # import_module holds the import lock: threads reading this at once all get the module.
            self._ndimage = importlib.import_module(self._ndimage)
        return self._ndimage

    def __repr__(self) -> str:
        ndimage = self._ndimage if isinstance(self._ndimage, str) else self._ndimage.__name__
        return f"ArrayBackend({self.name!r}, xp={self.xp.__name__}, ndimage={ndimage})"


def _skimage_watershed(distance: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # Imported on first use: skimage.segmentation costs ~0.3 s to import.
    from skimage.segmentation import watershed

    return watershed(-distance, markers, mask=mask, connectivity=2)


def propagate_markers(backend: ArrayBackend, distance: Any, markers: Any, mask: Any) -> Any:
    """Grow ``markers`` over ``mask`` one pixel per iteration until nothing changes.

    The device stand-in for a watershed (neither CuPy nor cuCIM has one): each
    pixel of ``mask`` takes the label of the marker geodesically nearest to it, so
    touching nuclei split halfway between their centres. Objects and their
    count are those of the watershed; only the dividing line between two touching
    nuclei may sit a pixel or two elsewhere. ``distance`` is unused (kept for the
    watershed's signature). Written against ``backend.xp`` so it runs, and is
    tested, on NumPy too.
    """
    xp, ndi = backend.xp, backend.ndimage
    labels = xp.where(mask, markers, 0).astype(xp.int32)
    free = mask & (labels == 0)
    # Checking for convergence synchronises a GPU: do it every few steps only.
    check_every = 8
    while True:
        for _ in range(check_every):
            grown = ndi.grey_dilation(labels, size=(3, 3))
            labels = xp.where(free, grown, labels)
            free = free & (labels == 0)
        still_growing = free & (ndi.grey_dilation(labels, size=(3, 3)) > 0)
        if not bool(still_growing.any()):
            return labels


def make_backend_dispatch() -> Dispatch:
    """A fresh dispatcher: NumPy and CuPy registered lazily (on their first array).

    The package uses one instance, :data:`array_backend`; tests and extensions can
    build their own and register further array types on it without touching the
    package's.

    Returns
    -------
    dask.utils.Dispatch
        Called with an array, returns the :class:`ArrayBackend` for its type.

    Examples
    --------
    >>> import numpy as np
    >>> dispatch = make_backend_dispatch()
    >>> dispatch(np.zeros(3)).name
    'numpy'
    """
    dispatch = Dispatch(name="array_backend")

    def register_numpy() -> None:
        # Runs once, when the first NumPy array arrives; SciPy is imported when a step first
        # reads ``backend.ndimage``, not with the steps nor with the first array.
        numpy_backend = ArrayBackend("numpy", np, "scipy.ndimage", _skimage_watershed)

        def numpy_array(array: np.ndarray) -> ArrayBackend:
            return numpy_backend

        dispatch.register(np.ndarray, numpy_array)

    def register_cupy() -> None:
        # Runs once, when the first array of a type from the module "cupy" arrives.
        import cupy
        import cupyx.scipy.ndimage

        def cupy_watershed(distance: Any, markers: Any, mask: Any) -> Any:
            return propagate_markers(cupy_backend, distance, markers, mask)

        cupy_backend = ArrayBackend("cupy", cupy, cupyx.scipy.ndimage, cupy_watershed)

        def cupy_array(array: Any) -> ArrayBackend:
            return cupy_backend

        dispatch.register(cupy.ndarray, cupy_array)

    dispatch.register_lazy("numpy", register_numpy)
    dispatch.register_lazy("cupy", register_cupy)
    return dispatch


#: The package's dispatcher: ``array_backend(array)`` is the :class:`ArrayBackend` for it.
array_backend = make_backend_dispatch()


def backend_for(array: Any, function: str) -> ArrayBackend:
    """The backend for ``array``, or a :class:`TypeError` that names ``function``."""
    try:
        backend: ArrayBackend = array_backend(array)
    except TypeError:
        raise TypeError(
            f"{function}() takes a NumPy or CuPy array, got {type(array).__module__}."
            f"{type(array).__qualname__}"
        ) from None
    return backend
