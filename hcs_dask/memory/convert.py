"""Array-type conversion at step boundaries (numpy ⇄ cupy ⇄ torch).

Conversion happens only where the declared array type changes between two
steps, once per stack. Device-to-device moves (cupy ⇄ torch) go through DLPack
without a copy; host ⇄ device moves are the only copies. GPU libraries are
imported inside the functions, so importing this module never loads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ConversionCounter", "array_type_of", "to_array_type", "to_host"]


def array_type_of(array: Any) -> str:
    """``"numpy"``, ``"cupy"`` or ``"torch"`` (by the array's module, without importing any)."""
    if isinstance(array, np.ndarray):
        return "numpy"
    module = type(array).__module__.split(".")[0]
    if module in ("cupy", "torch"):
        return module
    return "numpy"


@dataclass
class ConversionCounter:
    """Bookkeeping of the conversions a well did: how many, and bytes moved host⇄device."""

    conversions: int = 0
    host_to_device_bytes: int = 0
    device_to_host_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "conversions": self.conversions,
            "host_to_device_bytes": self.host_to_device_bytes,
            "device_to_host_bytes": self.device_to_host_bytes,
        }


def to_array_type(array: Any, target: str, counter: ConversionCounter | None = None) -> Any:
    """Return ``array`` as ``target`` type; the same object when it already is one."""
    source = array_type_of(array)
    if source == target:
        return array
    converted = _convert(array, source, target)
    if counter is not None:  # counted once it happened: a failed conversion moved nothing
        counter.conversions += 1
        nbytes = int(getattr(array, "nbytes", 0) or 0)
        if source == "numpy":
            counter.host_to_device_bytes += nbytes
        elif target == "numpy":
            counter.device_to_host_bytes += nbytes
    return converted


def _convert(array: Any, source: str, target: str) -> Any:
    if target == "numpy":
        if source == "cupy":
            return array.get()
        return array.detach().cpu().numpy()  # torch
    if target == "cupy":
        import cupy

        if source == "torch" and array.is_cuda:
            return cupy.from_dlpack(array)
        return cupy.asarray(array if source == "numpy" else array.cpu().numpy())
    if target == "torch":
        import torch

        if source == "cupy":
            return torch.from_dlpack(array)
        return torch.from_numpy(np.ascontiguousarray(array)).cuda()
    raise ValueError(f"unknown array type {target!r}")


def to_host(array: Any, counter: ConversionCounter | None = None) -> np.ndarray:
    """The array as numpy (one device-to-host copy for device arrays)."""
    return to_array_type(array, "numpy", counter)

