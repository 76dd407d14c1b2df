"""Nuclei: Otsu foreground, touching nuclei split by a distance-transform watershed, counts.

Everything but the flooding itself is written against ``backend.xp`` and
``backend.ndimage`` (Otsu, peak finding and object filtering included, rather than
borrowed from scikit-image or cuCIM), so a NumPy and a CuPy run place the same
markers and find the same number of nuclei.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hcs_dask.steps._dispatch import ArrayBackend, backend_for

__all__ = ["count_nuclei", "segment_nuclei"]


def otsu_threshold(backend: ArrayBackend, image: Any, nbins: int = 256) -> float:
    """Otsu's threshold of ``image`` (scikit-image's algorithm, on any backend)."""
    xp = backend.xp
    low, high = float(image.min()), float(image.max())
    if not high > low:
        return low
    counts, edges = xp.histogram(image, bins=nbins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    counts = counts.astype(xp.float64)
    # The lowest and highest bins hold the minimum and maximum: no class is ever empty.
    weight_below = xp.cumsum(counts)
    weight_above = xp.cumsum(counts[::-1])[::-1]
    mean_below = xp.cumsum(counts * centres) / weight_below
    mean_above = (xp.cumsum((counts * centres)[::-1]) / weight_above[::-1])[::-1]
    between = weight_below[:-1] * weight_above[1:] * (mean_below[:-1] - mean_above[1:]) ** 2
    return float(centres[int(xp.argmax(between))])


def _typical_radius(backend: ArrayBackend, distance: Any, components: Any, count: int) -> float:
    """Median inscribed radius of the foreground's objects, specks of under 2 px ignored.

    The largest distance-to-background inside a clump of touching nuclei is about
    one nucleus' radius, so unlike the median area this does not grow with density.
    """
    xp, ndi = backend.xp, backend.ndimage
    inside = components > 0
    # Only foreground pixels: the per-label maximum sorts its input.
    radii = xp.asarray(ndi.maximum(distance[inside], components[inside], xp.arange(1, count + 1)))
    real = radii[radii >= 2]
    return float(xp.median(real)) if real.size else float(radii.max())


@dataclass(frozen=True)
class _Seeds:
    """The nuclei found in one image, before flooding: foreground and one marker per nucleus."""

    backend: ArrayBackend
    foreground: Any  # bool, small objects removed
    ridge: Any  # float32, smoothed distance to the background
    markers: Any  # int32, 1..marker_count
    marker_count: int
    #: Kept foreground objects without a marker (their peak lost to a nearby, higher
    #: one): each still counts as one nucleus.
    unmarked_count: int

    @property
    def count(self) -> int:
        return self.marker_count + self.unmarked_count


def _group_peaks(backend: ArrayBackend, peaks: Any, foreground: Any, min_distance: int) -> tuple[Any, int]:
    """Label ``peaks``, one label for peaks closer than ``min_distance`` in one object.

    Two peaks that close both survive the maximum filter only by being equal (a
    plateau, or the mirror-image centres of a symmetric pair): they are one nucleus.
    Grown by under half ``min_distance`` within the foreground, such peaks touch.
    """
    xp, ndi = backend.xp, backend.ndimage
    eight = xp.ones((3, 3), dtype=bool)
    half = (min_distance - 1) // 2
    grown = peaks
    if half:
        grown = ndi.maximum_filter(peaks.astype(xp.uint8), size=2 * half + 1).astype(bool) & foreground
    groups, count = ndi.label(grown, structure=eight)
    # A grown piece cut off from its peak by the background holds no peak: renumber
    # the groups that do, 1..n.
    has_peak = xp.zeros(int(count) + 1, dtype=bool)
    has_peak[groups[peaks]] = True
    has_peak[0] = False
    number = xp.cumsum(has_peak, dtype=xp.int32) * has_peak
    return xp.where(peaks, number[groups], 0).astype(xp.int32), int(has_peak.sum())


def _seed_nuclei(
    image: Any,
    *,
    min_size: int | None,
    min_distance: int | None,
    threshold: float | None,
    function: str,
) -> _Seeds:
    backend = backend_for(image, function)
    if getattr(image, "ndim", None) != 2:
        raise ValueError(f"{function}() segments a 2-D image, got shape {image.shape}")
    if min_size is not None and min_size < 0:
        raise ValueError(f"{function}(): min_size must be >= 0, got {min_size!r}")
    if min_distance is not None and min_distance < 1:
        raise ValueError(f"{function}(): min_distance must be >= 1, got {min_distance!r}")
    xp, ndi = backend.xp, backend.ndimage
    image = image.astype(xp.float32, copy=False)
    # 8-connected throughout, so that flooding the markers (8-connected too) reaches
    # exactly the objects that hold one: the count needs no flooding.
    eight = xp.ones((3, 3), dtype=bool)

    level = otsu_threshold(backend, image) if threshold is None else float(threshold)
    # No hole filling: with touching nuclei it also fills the gap enclosed by a ring
    # of them, merging the ring into one object with one distance peak.
    foreground = image > level
    components, count = ndi.label(foreground, structure=eight)
    count = int(count)
    if count == 0:
        empty = xp.zeros(image.shape, dtype=xp.int32)
        return _Seeds(backend, foreground, empty.astype(xp.float32), empty, 0, 0)
    distance = ndi.distance_transform_edt(foreground).astype(xp.float32)

    if min_size is None or min_distance is None:
        # Defaults from the nuclei's own size in pixels, whatever the image size.
        radius = _typical_radius(backend, distance, components, count)
        if min_size is None:
            min_size = int(0.25 * math.pi * radius**2)
        if min_distance is None:
            min_distance = max(2, round(0.5 * radius))

    # Drop small objects; the distance map of the rest is unchanged (they never touch).
    areas = xp.bincount(components.ravel(), minlength=count + 1)
    keep = areas >= min_size
    keep[0] = False
    foreground = keep[components]
    distance = xp.where(foreground, distance, xp.float32(0))

    # One marker per distance-map peak. Smoothing first removes the spurious peaks of
    # a ragged outline.
    ridge = ndi.gaussian_filter(distance, sigma=1.0)
    window = 2 * int(min_distance) + 1
    peaks = (ridge == ndi.maximum_filter(ridge, size=window)) & foreground & (ridge > 0.5)
    markers, marker_count = _group_peaks(backend, peaks, foreground, int(min_distance))

    marked = xp.zeros(count + 1, dtype=bool)
    marked[components[peaks]] = True
    unmarked_count = int((keep & ~marked).sum())
    return _Seeds(backend, foreground, ridge, markers, int(marker_count), unmarked_count)


def segment_nuclei(
    image: Any,
    *,
    min_size: int | None = None,
    min_distance: int | None = None,
    threshold: float | None = None,
) -> Any:
    """Label the nuclei of a 2-D image, splitting touching ones.

    Foreground is above Otsu's threshold; objects smaller than ``min_size``
    pixels are dropped; each peak of the smoothed distance transform at least
    ``min_distance`` from a higher one seeds a nucleus (equal peaks closer than
    that seed one), and a watershed of the distance map from those seeds splits
    touching nuclei. An object whose peak is suppressed by a nearby one still
    counts once. Holes are not filled: a ring of touching nuclei would become one.

    Give it a background-corrected, lightly smoothed image (see
    :func:`subtract_background` and :func:`smooth`).

    On NumPy arrays the flooding is :func:`skimage.segmentation.watershed`. On CuPy
    arrays everything runs in CuPy and :mod:`cupyx.scipy.ndimage`, without cuCIM:
    neither has a watershed, so the seeds are grown over the foreground instead,
    one pixel per step; the nuclei and their count are the same, the line
    between two touching nuclei may differ by a pixel or two.

    Parameters
    ----------
    image : numpy.ndarray or cupy.ndarray
        A 2-D image, nuclei bright.
    min_size : int, optional
        Smallest object kept, in pixels. Default: a quarter of the area of a
        typical nucleus, ``pi * r**2 / 4``, where ``r`` is the median inscribed
        radius of the foreground's objects. The defaults follow the nuclei's size
        in pixels, so they hold at any magnification or image size.
    min_distance : int, optional
        Smallest distance, in pixels, between the centres of two nuclei.
        Default: ``0.5 * r``.
    threshold : float, optional
        Intensity threshold to use instead of Otsu's.

    Returns
    -------
    numpy.ndarray or cupy.ndarray
        ``int32`` labels, the shape and array type of ``image``: 0 is background,
        nuclei are numbered ``1..n`` without gaps.

    Raises
    ------
    ValueError
        If ``image`` is not 2-D, or a size parameter is out of range.
    TypeError
        If ``image`` is neither a NumPy nor a CuPy array.

    Examples
    --------
    >>> import numpy as np
    >>> yy, xx = np.mgrid[:64, :64]
    >>> image = (((yy - 32) ** 2 + (xx - 22) ** 2 < 100) |
    ...          ((yy - 32) ** 2 + (xx - 40) ** 2 < 100)).astype(np.float32)
    >>> labels = segment_nuclei(image)
    >>> labels.dtype, int(labels.max())
    (dtype('int32'), 2)
    """
    seeds = _seed_nuclei(
        image, min_size=min_size, min_distance=min_distance, threshold=threshold,
        function="segment_nuclei",
    )
    xp, ndi = seeds.backend.xp, seeds.backend.ndimage
    if seeds.count == 0:
        return xp.zeros(image.shape, dtype=xp.int32)
    labels = seeds.backend.watershed(seeds.ridge, seeds.markers, seeds.foreground)
    labels = labels.astype(xp.int32, copy=False)
    if seeds.unmarked_count:
        unmarked, _ = ndi.label(seeds.foreground & (labels == 0), structure=xp.ones((3, 3), dtype=bool))
        labels = xp.where(unmarked > 0, unmarked.astype(xp.int32) + seeds.marker_count, labels)
    return labels


def count_nuclei(
    stack: Any,
    *,
    nuclear_channel: int = 1,
    context: Any = None,
    min_size: int | None = None,
    min_distance: int | None = None,
    threshold: float | None = None,
) -> tuple[Any, dict[str, int | float]]:
    """Count the nuclei of a ``(channel, y, x)`` stack and measure every channel in them.

    Use it as ``Step(count_nuclei, stack="channel", kwargs={"nuclear_channel": 1})``:
    the pipeline then passes a :class:`~hcs_dask.pipeline.StepContext` whose
    ``channel`` is the tuple of channel numbers in stack order.

    Parameters
    ----------
    stack : numpy.ndarray or cupy.ndarray
        ``(channel, y, x)``; a 2-D image is taken as a single channel.
    nuclear_channel : int, optional
        The channel number (the vendor's, e.g. ``w1`` is 1) holding the nuclear stain.
    context : hcs_dask.pipeline.StepContext, optional
        Names the channels of ``stack``. Without one, the channels are taken to
        be numbered ``1, 2, ...`` in stack order, so the default
        ``nuclear_channel=1`` is the first.
    min_size, min_distance, threshold
        Passed to :func:`segment_nuclei`.

    Returns
    -------
    stack : numpy.ndarray or cupy.ndarray
        The input, unchanged.
    measurements : dict
        Plain Python numbers: ``nuclei_count`` (int), ``nuclei_mean_area_px``
        (float) and, per channel ``c`` of the stack, ``mean_intensity_w<c>``, the
        mean intensity over all nuclear pixels. Areas and intensities are NaN
        when no nucleus is found.

    Raises
    ------
    ValueError
        If ``nuclear_channel`` is not in the stack, or the stack is not 2-D or 3-D.
    TypeError
        If ``stack`` is neither a NumPy nor a CuPy array.

    Examples
    --------
    >>> import numpy as np
    >>> yy, xx = np.mgrid[:64, :64]
    >>> nuclei = ((yy - 20) ** 2 + (xx - 20) ** 2 < 64).astype(np.float32)
    >>> stack = np.stack([nuclei * 100, nuclei * 10 + 5])
    >>> _, measured = count_nuclei(stack)
    >>> measured["nuclei_count"], measured["mean_intensity_w1"], measured["mean_intensity_w2"]
    (1, 100.0, 15.0)
    """
    backend = backend_for(stack, "count_nuclei")
    images = stack if getattr(stack, "ndim", None) == 3 else stack[None] if stack.ndim == 2 else None
    if images is None:
        raise ValueError(f"count_nuclei() takes a (channel, y, x) stack, got shape {stack.shape}")
    channels = _channel_numbers(context, len(images))
    if nuclear_channel not in channels:
        raise ValueError(
            f"count_nuclei(): nuclear_channel={nuclear_channel!r} is not among the stack's "
            f"channels {channels}; stack the step over 'channel' and name one of them"
        )
    # The seeds are enough: flooding them would only draw the lines between touching
    # nuclei, which change neither the count nor the nuclear pixels.
    seeds = _seed_nuclei(
        images[channels.index(nuclear_channel)], min_size=min_size, min_distance=min_distance,
        threshold=threshold, function="count_nuclei",
    )
    xp = backend.xp
    nuclear, count = seeds.foreground, seeds.count
    area = int(nuclear.sum())
    measurements: dict[str, int | float] = {
        "nuclei_count": count,
        "nuclei_mean_area_px": area / count if count else math.nan,
    }
    for number, image in zip(channels, images, strict=True):
        if area:
            total = float(xp.where(nuclear, image, 0).sum(dtype=xp.float64))
            measurements[f"mean_intensity_w{number}"] = total / area
        else:
            measurements[f"mean_intensity_w{number}"] = math.nan
    return stack, measurements


def _channel_numbers(context: Any, size: int) -> tuple[int, ...]:
    if context is None:
        return tuple(range(1, size + 1))
    channel = context.channel
    numbers = tuple(channel) if isinstance(channel, (tuple, list)) else (channel,)
    if len(numbers) != size:
        raise ValueError(
            f"count_nuclei(): the stack has {size} channel(s) but the context names {numbers}; "
            "use the step with stack='channel'"
        )
    return tuple(int(n) for n in numbers)
