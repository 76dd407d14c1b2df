"""The built-in steps (hcs_dask.steps) and the bundled graphs that use them.

Contracts of each function (dtype, shape, errors), the array-type dispatch, and
accuracy: a real nuclei image, and synthetic plates with known counts run
through the nuclei_count graph's own steps by hand.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import tifffile

from hcs_dask.pipeline import Pipeline, PipelineError, StepContext
from hcs_dask.steps import (
    _segment,
    count_nuclei,
    max_projection,
    percentile_normalize,
    segment_nuclei,
    smooth,
    subtract_background,
)
from hcs_dask.steps._dispatch import (
    ArrayBackend,
    array_backend,
    make_backend_dispatch,
    propagate_markers,
)

REPO = Path(__file__).resolve().parents[1]
REAL_IMAGE = REPO / "tests" / "data" / "nuclei_2d.tif"


def _disc_image(centres, radius, shape=(64, 64), value=100.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.zeros(shape, np.float32)
    for y, x in centres:
        image[(yy - y) ** 2 + (xx - x) ** 2 < radius**2] = value
    return image


def _import_graph(name: str) -> types.ModuleType:
    """A bundled graph imported by path (``hcs_dask.graphs`` exists only once installed)."""
    spec = importlib.util.spec_from_file_location(f"_test_graph_{name}", REPO / "graphs" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_fresh(code: str) -> None:
    """Run ``code`` in a fresh interpreter that imports this checkout's hcs_dask; it must succeed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ dispatch
class TestDispatch:
    def test_numpy_and_its_subclasses_get_the_numpy_backend(self):
        backend = array_backend(np.zeros((2, 2)))
        assert backend.name == "numpy"
        assert backend.xp is np and backend.ndimage is scipy.ndimage
        assert array_backend(np.zeros(3).view(np.memmap)) is backend

    def test_a_type_registered_on_a_local_dispatcher_is_dispatched_there_only(self):
        class FakeArray:
            pass

        fake = ArrayBackend("fake", np, scipy.ndimage, lambda d, m, f: m)
        local = make_backend_dispatch()
        local.register(FakeArray)(lambda array: fake)
        assert local(FakeArray()) is fake
        assert local(np.zeros(1)).name == "numpy"
        with pytest.raises(TypeError):
            array_backend(FakeArray())  # the package's dispatcher is untouched

    def test_cupy_is_registered_lazily_and_built_on_first_use(self, monkeypatch):
        # Stand-in modules named like CuPy: the registration runs only when an array
        # of a type from the top-level module "cupy" first arrives.
        fake_cupy = types.ModuleType("cupy")
        fake_ndimage = types.ModuleType("cupyx.scipy.ndimage")
        fake_cupyx = types.ModuleType("cupyx")
        fake_cupyx_scipy = types.ModuleType("cupyx.scipy")
        fake_cupyx.scipy = fake_cupyx_scipy
        fake_cupyx_scipy.ndimage = fake_ndimage

        class ndarray:  # noqa: N801 - named as CuPy names it
            pass

        ndarray.__module__ = "cupy"
        fake_cupy.ndarray = ndarray
        local = make_backend_dispatch()
        for name, module in [("cupy", fake_cupy), ("cupyx", fake_cupyx),
                             ("cupyx.scipy", fake_cupyx_scipy), ("cupyx.scipy.ndimage", fake_ndimage)]:
            monkeypatch.setitem(sys.modules, name, module)
        backend = local(ndarray())
        assert backend.name == "cupy"
        assert backend.xp is fake_cupy and backend.ndimage is fake_ndimage
        assert local(ndarray()) is backend

    def test_importing_the_steps_imports_no_gpu_library(self):
        code = (
            "import sys, hcs_dask.steps, hcs_dask.steps._dispatch\n"
            "import numpy as np\n"
            "hcs_dask.steps.smooth(np.zeros((8, 8)))\n"
            "loaded = sorted(m for m in ('cupy', 'cupyx', 'cucim', 'torch') if m in sys.modules)\n"
            "assert not loaded, loaded\n"
        )
        _run_fresh(code)

    def test_loading_a_pipeline_of_the_steps_imports_no_scipy_until_an_array_arrives(self):
        # A client loads the pipeline file; only the worker that runs a step needs SciPy.
        code = (
            "import sys\n"
            "from hcs_dask.pipeline import load_pipeline\n"
            "load_pipeline('nuclei_count')\n"
            "assert 'scipy' not in sys.modules, 'scipy imported by the pipeline'\n"
            "import numpy as np, hcs_dask.steps\n"
            "hcs_dask.steps.smooth(np.zeros((8, 8)))\n"
            "assert 'scipy.ndimage' in sys.modules\n"
        )
        _run_fresh(code)

    def test_steps_that_never_filter_never_import_scipy(self):
        # The anchor pipeline (normalise, then project) needs no SciPy: its worker skips the import.
        code = (
            "import sys\n"
            "import numpy as np, hcs_dask.steps as steps\n"
            "stack = np.arange(3 * 8 * 8, dtype=np.uint16).reshape(3, 8, 8)\n"
            "steps.max_projection(steps.percentile_normalize(stack))\n"
            "assert 'scipy' not in sys.modules, 'scipy imported by normalise and project'\n"
            "from hcs_dask.steps._dispatch import array_backend\n"
            "assert array_backend(stack).ndimage.__name__ == 'scipy.ndimage'\n"
        )
        _run_fresh(code)

    def test_the_first_arrays_of_many_threads_at_once_all_get_the_numpy_backend(self):
        # The NumPy backend is registered by the first array: a worker with several threads
        # starts several wells at once, and none may find the type unregistered meanwhile.
        import threading

        for _ in range(20):
            local = make_backend_dispatch()
            start = threading.Barrier(8)
            names: list[str] = []

            def first_array() -> None:
                start.wait()
                names.append(local(np.zeros(2)).name)

            threads = [threading.Thread(target=first_array) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert names == ["numpy"] * 8

    @pytest.mark.parametrize("function", [subtract_background, max_projection, percentile_normalize,
                                          smooth, segment_nuclei, count_nuclei])
    def test_unsupported_array_types_are_a_type_error_naming_the_function(self, function):
        with pytest.raises(TypeError, match=function.__name__):
            function([[1, 2], [3, 4]])

    def test_marker_propagation_counts_and_covers_as_the_watershed_does(self, monkeypatch):
        """The GPU path's flooding, run here on NumPy, against scikit-image's watershed."""
        image = _preprocess(tifffile.imread(REAL_IMAGE))
        expected = segment_nuclei(image)

        propagating = ArrayBackend("numpy-propagate", np, scipy.ndimage,
                                   lambda d, m, f: propagate_markers(propagating, d, m, f))
        monkeypatch.setattr(_segment, "backend_for", lambda array, function: propagating)
        labels = segment_nuclei(image)
        assert labels.dtype == np.int32
        assert labels.max() == expected.max()
        np.testing.assert_array_equal(labels > 0, expected > 0)
        # Same seeds, same numbering: only the lines between touching nuclei may move.
        agree = np.mean(labels[expected > 0] == expected[expected > 0])
        assert agree > 0.97


# ------------------------------------------------------------ image contracts
class TestSubtractBackground:
    def test_removes_a_smooth_background_and_keeps_small_objects(self):
        yy, xx = np.mgrid[:128, :128]
        background = 200 + 0.5 * xx + 0.3 * yy
        image = background.copy()
        image[60:66, 60:66] += 1000
        out = subtract_background(image.astype(np.uint16), radius=12)
        assert out.dtype == np.float32 and out.shape == image.shape
        assert out.min() >= 0
        assert np.median(out) < 5  # the gradient is gone
        assert 900 < out[62, 62] < 1100  # the object is not

    @pytest.mark.parametrize("shape", [(37, 53), (256, 256), (300, 200)])
    def test_any_shape_and_the_default_radius(self, shape):
        rng = np.random.default_rng(0)
        image = rng.integers(0, 1000, shape).astype(np.uint16)
        out = subtract_background(image)
        assert out.shape == shape and out.dtype == np.float32 and out.min() >= 0

    def test_a_flat_image_becomes_zero(self):
        out = subtract_background(np.full((50, 70), 123.0))
        np.testing.assert_allclose(out, 0, atol=1e-3)

    def test_errors(self):
        with pytest.raises(ValueError, match="2-D"):
            subtract_background(np.zeros((2, 8, 8)))
        with pytest.raises(ValueError, match="radius"):
            subtract_background(np.zeros((8, 8)), radius=0)


class TestMaxProjection:
    def test_projects_the_first_axis_and_keeps_the_dtype(self):
        stack = np.random.default_rng(1).integers(0, 60000, (3, 20, 30)).astype(np.uint16)
        out = max_projection(stack)
        assert out.shape == (20, 30) and out.dtype == np.uint16
        np.testing.assert_array_equal(out, stack.max(axis=0))

    def test_needs_a_stack(self):
        with pytest.raises(ValueError, match="z, y, x"):
            max_projection(np.zeros((8, 8)))


class TestPercentileNormalize:
    def test_float32_in_unit_range(self):
        image = np.random.default_rng(2).normal(500, 100, (64, 64)).astype(np.uint16)
        out = percentile_normalize(image)
        assert out.dtype == np.float32 and out.shape == image.shape
        assert out.min() == 0 and out.max() == 1
        assert 0.3 < np.median(out) < 0.7

    def test_a_constant_image_is_zero(self):
        np.testing.assert_array_equal(percentile_normalize(np.full((4, 4), 7)), 0)

    @pytest.mark.parametrize("low, high", [(50, 50), (-1, 99), (1, 101), (90, 10)])
    def test_bad_percentiles(self, low, high):
        with pytest.raises(ValueError, match="low"):
            percentile_normalize(np.zeros((4, 4)), low=low, high=high)


class TestSmooth:
    def test_float32_and_mass_kept(self):
        image = np.zeros((21, 21), np.uint8)
        image[10, 10] = 200
        out = smooth(image, sigma=2)
        assert out.dtype == np.float32 and out.shape == image.shape
        assert out.sum() == pytest.approx(200, rel=1e-4)
        assert out[10, 10] < 200

    def test_a_stack_is_smoothed_plane_by_plane(self):
        stack = np.zeros((2, 15, 15), np.float32)
        stack[1, 7, 7] = 1
        out = smooth(stack, sigma=1.5)
        assert out.shape == stack.shape
        np.testing.assert_array_equal(out[0], 0)

    def test_sigma_zero_converts_only(self):
        image = np.arange(16, dtype=np.uint16).reshape(4, 4)
        out = smooth(image, sigma=0)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, image)

    @pytest.mark.parametrize("sigma", [-1, math.inf, math.nan])
    def test_bad_sigma(self, sigma):
        with pytest.raises(ValueError, match="sigma"):
            smooth(np.zeros((4, 4)), sigma=sigma)


class TestSegmentNuclei:
    def test_two_touching_nuclei_are_split(self):
        image = _disc_image([(32, 22), (32, 40)], radius=10)
        labels = segment_nuclei(smooth(image))
        assert labels.dtype == np.int32 and labels.shape == image.shape
        assert labels.max() == 2
        assert labels[32, 18] != labels[32, 44]

    def test_labels_are_numbered_without_gaps(self):
        image = _disc_image([(20, 20), (20, 38), (50, 50), (52, 12)], radius=8, shape=(70, 70))
        labels = segment_nuclei(image)
        np.testing.assert_array_equal(np.unique(labels), np.arange(5))

    def test_small_specks_are_dropped(self):
        image = _disc_image([(30, 30)], radius=10)
        image[5:7, 5:7] = 100
        assert segment_nuclei(image).max() == 1
        assert segment_nuclei(image, min_size=1).max() == 2

    def test_an_empty_image_has_no_nuclei(self):
        for image in (np.zeros((32, 32)), np.full((32, 32), 5.0)):
            labels = segment_nuclei(image)
            assert labels.dtype == np.int32 and labels.max() == 0

    def test_explicit_parameters(self):
        image = _disc_image([(32, 22), (32, 40)], radius=10)
        # A min_distance above the centres' distance keeps one peak: the pair counts once.
        assert segment_nuclei(image, min_distance=25).max() == 1
        assert segment_nuclei(image, threshold=200).max() == 0

    def test_errors(self):
        with pytest.raises(ValueError, match="2-D"):
            segment_nuclei(np.zeros((2, 8, 8)))
        with pytest.raises(ValueError, match="min_distance"):
            segment_nuclei(np.zeros((8, 8)), min_distance=0)


class TestCountNuclei:
    def _stack(self):
        nuclei = _disc_image([(20, 20), (20, 40), (45, 30)], radius=8)
        return np.stack([nuclei, nuclei * 0.5 + 10, np.full_like(nuclei, 3.0)])

    def test_returns_the_stack_and_plain_python_numbers(self):
        stack = self._stack()
        out, measured = count_nuclei(stack)
        assert out is stack
        assert set(measured) == {"nuclei_count", "nuclei_mean_area_px", "mean_intensity_w1",
                                 "mean_intensity_w2", "mean_intensity_w3"}
        assert type(measured["nuclei_count"]) is int
        assert all(type(v) is float for k, v in measured.items() if k != "nuclei_count")
        assert measured["nuclei_count"] == 3
        assert measured["nuclei_mean_area_px"] == pytest.approx(math.pi * 8**2, rel=0.1)
        assert measured["mean_intensity_w1"] == pytest.approx(100)
        assert measured["mean_intensity_w2"] == pytest.approx(60)
        assert measured["mean_intensity_w3"] == pytest.approx(3)

    def test_the_context_names_the_channels(self):
        stack = self._stack()[::-1].copy()  # nuclei last
        context = StepContext(well="B03", site=1, channel=(5, 4, 1), z=0, timepoint=1, step="count")
        _, measured = count_nuclei(stack, nuclear_channel=1, context=context)
        assert measured["nuclei_count"] == 3
        assert measured["mean_intensity_w1"] == pytest.approx(100)
        assert measured["mean_intensity_w5"] == pytest.approx(3)
        with pytest.raises(ValueError, match="nuclear_channel=2"):
            count_nuclei(stack, nuclear_channel=2, context=context)

    def test_no_nuclei(self):
        _, measured = count_nuclei(np.zeros((2, 16, 16), np.uint16))
        assert measured["nuclei_count"] == 0
        assert math.isnan(measured["nuclei_mean_area_px"]) and math.isnan(measured["mean_intensity_w2"])

    def test_counts_what_segment_nuclei_labels(self):
        image = _preprocess(tifffile.imread(REAL_IMAGE))
        _, measured = count_nuclei(image[None])
        labels = segment_nuclei(image)
        assert measured["nuclei_count"] == labels.max()
        assert measured["nuclei_mean_area_px"] == pytest.approx((labels > 0).sum() / labels.max())

    def test_errors(self):
        with pytest.raises(ValueError, match="channel, y, x"):
            count_nuclei(np.zeros((2, 2, 8, 8)))
        context = StepContext(well="B03", site=1, channel=(1, 2), z=0, timepoint=1, step="count")
        with pytest.raises(ValueError, match="stack='channel'"):
            count_nuclei(np.zeros((3, 8, 8)), context=context)


# ------------------------------------------------------------------- accuracy
def _preprocess(image):
    return smooth(subtract_background(image), sigma=1.0)


def test_real_image_count():
    """tests/data/nuclei_2d.tif holds about 120 nuclei (a few dim, some touching)."""
    count = segment_nuclei(_preprocess(tifffile.imread(REAL_IMAGE))).max()
    assert 80 <= count <= 160


def _run_nuclei_count_by_hand(plate: Path, pipeline: Pipeline, channels: int, to_device=np.asarray):
    """The nuclei_count graph's own steps, applied as their ``stack`` says, per site.

    ``to_device`` turns each image read into the array type the steps run on.
    """
    background, projection, smoothing, counting = pipeline.steps
    with open(plate / "ground_truth.csv", newline="") as handle:
        truth = {(row["well"], int(row["site"])): int(row["nuclei"]) for row in csv.DictReader(handle)}
    found = {}
    for well, site in truth:
        per_channel = []
        for channel in range(1, channels + 1):
            planes = sorted(plate.glob(f"ZStep_*/*_{well}_s{site}_w{channel}*.tif"),
                            key=lambda p: int(p.parent.name.split("_")[1]))
            assert planes, f"no images for {well} s{site} w{channel}"
            corrected = [background.func(to_device(tifffile.imread(p)), **background.kwargs) for p in planes]
            xp = array_backend(corrected[0]).xp
            projected = projection.func(xp.stack(corrected), **projection.kwargs)
            per_channel.append(smoothing.func(projected, **smoothing.kwargs))
        context = StepContext(well=well, site=site, channel=tuple(range(1, channels + 1)), z=0,
                              timepoint=1, step=counting.name)
        _, measured = counting.func(xp.stack(per_channel), context=context, **counting.kwargs)
        found[well, site] = measured["nuclei_count"]
    return truth, found


@pytest.mark.slow
@pytest.mark.parametrize("size, channels", [pytest.param(256, 2, id="256px"),
                                            pytest.param(512, 1, id="512px")])
@pytest.mark.parametrize("seed", range(5))
def test_synthetic_plate_counts_within_10_percent(tmp_path, size, channels, seed):
    synthetic = pytest.importorskip("hcs_dask.formats.synthetic")
    plate = synthetic.write_synthetic_plate(tmp_path / "plate", wells=1, sites=2, channels=channels,
                                            z=3, size=size, seed=seed)
    truth, found = _run_nuclei_count_by_hand(plate, _import_graph("nuclei_count").pipeline, channels)
    for key, expected in truth.items():
        assert abs(found[key] - expected) <= 0.1 * expected, (key, found[key], expected)


# --------------------------------------------------------------------- graphs
class TestGraphs:
    def test_nuclei_count_steps(self):
        graph = _import_graph("nuclei_count")
        assert isinstance(graph.pipeline, Pipeline)
        steps = graph.pipeline.steps
        assert [s.name for s in steps] == ["background", "max_projection", "smooth", "count_nuclei"]
        assert [s.stack for s in steps] == [(), ("z",), (), ("channel",)]
        assert [s.func for s in steps] == [subtract_background, max_projection, smooth, count_nuclei]
        assert steps[3].kwargs["nuclear_channel"] == 1
        assert not graph.pipeline.uses_gpu()

    def test_max_projection_steps(self):
        graph = _import_graph("max_projection")
        (step,) = graph.pipeline.steps
        assert (step.name, step.stack, step.func) == ("max_projection", ("z",), max_projection)

    @pytest.mark.parametrize("name", ["nuclei_count", "max_projection"])
    def test_device(self, name):
        graph = _import_graph(name)
        assert {s.array_type for s in graph.make_pipeline("cpu").steps} == {"numpy"}
        assert {s.array_type for s in graph.make_pipeline(device="gpu").steps} == {"cupy"}
        assert graph.make_pipeline("gpu").uses_gpu()
        assert graph.make_pipeline().fingerprint() == graph.pipeline.fingerprint()
        with pytest.raises(PipelineError, match="device"):
            graph.make_pipeline(device="tpu")


# ------------------------------------------------------------------------ GPU
@pytest.fixture(scope="module")
def cupy():
    cupy = pytest.importorskip("cupy")
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver: CuPy imports but cannot reach a device
        devices = 0
    if devices == 0:
        pytest.skip("no CUDA device")
    return cupy


@pytest.mark.gpu
class TestOnCupy:
    """The same functions on CuPy arrays: same types out, same numbers as on NumPy."""

    @pytest.fixture(scope="class")
    def real(self):
        return tifffile.imread(REAL_IMAGE)

    def test_the_cupy_backend(self, cupy):
        backend = array_backend(cupy.zeros(1))
        assert backend.name == "cupy" and backend.xp is cupy

    @pytest.mark.parametrize("function, kwargs", [
        pytest.param(subtract_background, {}, id="subtract_background"),
        pytest.param(smooth, {"sigma": 2.0}, id="smooth"),
        pytest.param(percentile_normalize, {}, id="percentile_normalize"),
    ])
    def test_filters_match_numpy(self, cupy, real, function, kwargs):
        expected = function(real, **kwargs)
        out = function(cupy.asarray(real), **kwargs)
        assert isinstance(out, cupy.ndarray) and out.dtype == expected.dtype
        np.testing.assert_allclose(cupy.asnumpy(out), expected, rtol=1e-4, atol=1e-2)

    def test_max_projection(self, cupy):
        stack = np.random.default_rng(3).integers(0, 4000, (3, 64, 64)).astype(np.uint16)
        out = max_projection(cupy.asarray(stack))
        assert isinstance(out, cupy.ndarray) and out.dtype == np.uint16
        np.testing.assert_array_equal(cupy.asnumpy(out), stack.max(axis=0))

    def test_segment_nuclei_matches_numpy(self, cupy, real):
        image = _preprocess(real)
        expected = segment_nuclei(image)
        labels = segment_nuclei(cupy.asarray(image))
        assert isinstance(labels, cupy.ndarray) and labels.dtype == np.int32
        # Float rounding may break a tie between two peaks differently: allow one nucleus.
        assert abs(int(labels.max()) - int(expected.max())) <= 1
        assert np.mean(cupy.asnumpy(labels > 0) == (expected > 0)) > 0.999

    def test_count_nuclei_gives_python_numbers(self, cupy, real):
        image = _preprocess(real)
        stack = cupy.asarray(np.stack([image, image * 0.5]))
        out, measured = count_nuclei(stack)
        assert out is stack
        assert type(measured["nuclei_count"]) is int
        assert all(type(v) is float for k, v in measured.items() if k != "nuclei_count")
        _, expected = count_nuclei(cupy.asnumpy(stack))
        assert abs(measured["nuclei_count"] - expected["nuclei_count"]) <= 1
        assert measured["mean_intensity_w2"] == pytest.approx(expected["mean_intensity_w2"], rel=1e-3)

    def test_synthetic_counts(self, cupy, tmp_path):
        synthetic = pytest.importorskip("hcs_dask.formats.synthetic")
        plate = synthetic.write_synthetic_plate(tmp_path / "plate", wells=1, sites=2, channels=1, z=3,
                                                size=512, seed=0)
        pipeline = _import_graph("nuclei_count").make_pipeline(device="gpu")
        truth, found = _run_nuclei_count_by_hand(plate, pipeline, 1, to_device=cupy.asarray)
        for key, expected in truth.items():
            assert abs(found[key] - expected) <= 0.1 * expected, (key, found[key], expected)
