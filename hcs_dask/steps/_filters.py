"""Per-image corrections and projections: background, projection, normalisation, smoothing."""

from __future__ import annotations

import math
from typing import Any

from hcs_dask.steps._dispatch import backend_for

__all__ = ["max_projection", "percentile_normalize", "smooth", "subtract_background"]


def _require_ndim(image: Any, ndim: int, function: str, what: str) -> None:
    if getattr(image, "ndim", None) != ndim:
        raise ValueError(
            f"{function}() takes {what}, got an array of shape {getattr(image, 'shape', '?')}"
        )


def subtract_background(image: Any, *, radius: float | None = None) -> Any:
    """Subtract a smooth background estimate from a 2-D image.

    The background is a morphological opening: the image is reduced by block
    minima to about ``radius / 4`` pixels per block, opened with a square of
    side ``2 * radius + 1`` (in full-resolution pixels), smoothed, and
    interpolated back to full size. Objects narrower than about ``2 * radius``
    pixels (nuclei) stay out of the estimate, so they stay in the output;
    illumination gradients, camera offset and the out-of-focus glow between
    crowded nuclei are removed. Working on the reduced image keeps this far
    faster than a rolling ball (about 3 ms at 256 px, 10 ms at 512 px, 30 ms at
    1024 px on one CPU core).

    Parameters
    ----------
    image : numpy.ndarray or cupy.ndarray
        A 2-D image of any real dtype.
    radius : float, optional
        In pixels; from the radius of the largest nucleus to about twice it.
        Too small a radius hollows out large nuclei; too large a one leaves the
        glow between touching nuclei, which then merge. Default: a twentieth
        of the image's longer side (25.6 px at 512 px), which suits fields of
        view some 20 nuclear radii wide.

    Returns
    -------
    numpy.ndarray or cupy.ndarray
        ``float32``, the same shape and array type as ``image``, clipped at 0.

    Raises
    ------
    ValueError
        If ``image`` is not 2-D or ``radius`` is not positive.
    TypeError
        If ``image`` is neither a NumPy nor a CuPy array.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.full((64, 64), 100, dtype=np.uint16)
    >>> image[30:34, 30:34] = 400
    >>> corrected = subtract_background(image, radius=8)
    >>> corrected.dtype, float(corrected[0, 0]), float(corrected[31, 31])
    (dtype('float32'), 0.0, 300.0)
    """
    backend = backend_for(image, "subtract_background")
    _require_ndim(image, 2, "subtract_background", "a 2-D image")
    height, width = image.shape
    if radius is None:
        radius = max(height, width) / 20
    if not radius > 0:
        raise ValueError(f"subtract_background(): radius must be positive, got {radius!r}")
    xp, ndi = backend.xp, backend.ndimage
    image = image.astype(xp.float32, copy=False)

    block = max(1, int(radius) // 4)
    rows, cols = -(-height // block), -(-width // block)
    padded = xp.pad(image, ((0, rows * block - height), (0, cols * block - width)), mode="edge")
    reduced = padded.reshape(rows, block, cols, block).min(axis=(1, 3))
    side = max(1, round((2 * radius + 1) / block)) | 1
    background = ndi.grey_opening(reduced, size=(side, side), mode="nearest")
    # The opening is blocky (flat plateaus with steps): smooth it before upsampling.
    background = ndi.uniform_filter(background, size=side, mode="nearest")
    if block > 1:
        background = ndi.zoom(background, block, order=1, mode="nearest", grid_mode=True)
        background = background[:height, :width]
    corrected = image - background
    return xp.maximum(corrected, 0, out=corrected)


def max_projection(stack: Any) -> Any:
    """Maximum over the first axis of a ``(z, y, x)`` stack.

    Parameters
    ----------
    stack : numpy.ndarray or cupy.ndarray
        A 3-D stack; use it as ``Step(max_projection, stack="z")``.

    Returns
    -------
    numpy.ndarray or cupy.ndarray
        The 2-D ``(y, x)`` projection, with the dtype of ``stack``.

    Raises
    ------
    ValueError
        If ``stack`` is not 3-D.
    TypeError
        If ``stack`` is neither a NumPy nor a CuPy array.

    Examples
    --------
    >>> import numpy as np
    >>> max_projection(np.arange(8, dtype=np.uint8).reshape(2, 2, 2))
    array([[4, 5],
           [6, 7]], dtype=uint8)
    """
    backend = backend_for(stack, "max_projection")
    _require_ndim(stack, 3, "max_projection", "a (z, y, x) stack")
    return backend.xp.max(stack, axis=0)


def percentile_normalize(image: Any, *, low: float = 1, high: float = 99.8) -> Any:
    """Rescale so that the ``low`` and ``high`` percentiles map to 0 and 1.

    Parameters
    ----------
    image : numpy.ndarray or cupy.ndarray
        An image (any shape; percentiles are taken over all of it).
    low, high : float, optional
        Percentiles, ``0 <= low < high <= 100``.

    Returns
    -------
    numpy.ndarray or cupy.ndarray
        ``float32`` in ``[0, 1]``, clipped; all zeros for a constant image.

    Raises
    ------
    ValueError
        If the percentiles are out of order or out of range.
    TypeError
        If ``image`` is neither a NumPy nor a CuPy array.

    Examples
    --------
    >>> import numpy as np
    >>> percentile_normalize(np.array([0, 50, 100]), low=0, high=100)
    array([0. , 0.5, 1. ], dtype=float32)
    """
    backend = backend_for(image, "percentile_normalize")
    if not 0 <= low < high <= 100:
        raise ValueError(
            f"percentile_normalize(): need 0 <= low < high <= 100, got low={low!r}, high={high!r}"
        )
    xp = backend.xp
    image = image.astype(xp.float32, copy=False)
    bounds = xp.percentile(image, xp.asarray([low, high], dtype=xp.float64))
    lo, hi = float(bounds[0]), float(bounds[1])
    if not hi > lo:
        return xp.zeros_like(image)
    scaled = (image - xp.float32(lo)) * xp.float32(1.0 / (hi - lo))
    return xp.clip(scaled, 0, 1).astype(xp.float32, copy=False)


def smooth(image: Any, *, sigma: float = 1.0) -> Any:
    """Gaussian smoothing of each 2-D plane.

    Parameters
    ----------
    image : numpy.ndarray or cupy.ndarray
        A 2-D image, or a stack whose last two axes are ``(y, x)``; leading
        axes are not smoothed across.
    sigma : float, optional
        Standard deviation in pixels; ``0`` only converts to ``float32``.

    Returns
    -------
    numpy.ndarray or cupy.ndarray
        ``float32``, the same shape and array type as ``image``.

    Raises
    ------
    ValueError
        If ``sigma`` is negative or ``image`` has fewer than 2 dimensions.
    TypeError
        If ``image`` is neither a NumPy nor a CuPy array.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.zeros((9, 9), dtype=np.uint8)
    >>> image[4, 4] = 100
    >>> out = smooth(image, sigma=1.0)
    >>> out.dtype, round(float(out.sum()), 3)
    (dtype('float32'), 100.0)
    """
    backend = backend_for(image, "smooth")
    if getattr(image, "ndim", 0) < 2:
        raise ValueError(f"smooth() takes a 2-D image or a stack of them, got shape {image.shape}")
    if not sigma >= 0 or math.isinf(sigma):
        raise ValueError(f"smooth(): sigma must be a finite number >= 0, got {sigma!r}")
    xp = backend.xp
    image = image.astype(xp.float32, copy=False)
    if sigma == 0:
        return image.copy()
    sigmas = (0,) * (image.ndim - 2) + (sigma, sigma)
    return backend.ndimage.gaussian_filter(image, sigma=sigmas, mode="nearest")
