"""Shared by the gpu-marked test files: skip the whole module cleanly where no CUDA device is."""

from __future__ import annotations

import pytest


def require_cuda_device():
    """Return the ``cupy`` module, or skip the calling test module (no CuPy, or no device)."""
    cupy = pytest.importorskip("cupy")
    try:
        devices = int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no driver: CUDARuntimeError
        devices = 0
    if devices == 0:
        pytest.skip("no CUDA device", allow_module_level=True)
    return cupy
