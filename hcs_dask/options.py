"""Run options as two small frozen dataclasses, each validated when it is built.

:class:`ClusterSpec` says where a plate runs (a client, a scheduler, or the embedded
cluster and its size); :class:`RunPolicy` says how (timeouts, retries, the manifest,
overwrite or resume). A bad value raises :class:`OptionError` naming the option, in
its Python and its command-line spelling, before anything is started or written.

Examples
--------
>>> RunPolicy(well_timeout=600).well_timeout
600.0
>>> ClusterSpec(n_workers=0)
Traceback (most recent call last):
...
hcs_dask.options.OptionError: n_workers (--workers) must be a whole number >= 1, got 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["ClusterSpec", "HPC_KINDS", "MIN_WORKER_MEMORY", "OptionError", "RunPolicy", "split_options"]

#: The smallest per-worker memory limit of an embedded cluster. A worker process with
#: distributed, NumPy and zarr imported takes about 150 MiB before any well; below this
#: the nanny would restart it as soon as it starts, again and again.
MIN_WORKER_MEMORY = 256 * 2**20

#: The batch systems ``cluster=`` reaches through dask-jobqueue (:mod:`hcs_dask.hpc`); here, where
#: the command line can read them without importing Dask.
HPC_KINDS = ("slurm", "pbs", "lsf", "sge")


class OptionError(ValueError):
    """A run option that is malformed or contradicts another; nothing was started or written."""


def _whole(name: str, flag: str, value: Any, *, minimum: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f"{name} ({flag}) must be a whole number >= {minimum}, got {value!r}")
    return value


def _seconds(name: str, flag: str, value: Any, *, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise OptionError(f"{name} ({flag}) must be a number of seconds > 0, got {value!r}")
    return float(value)


def parse_memory_limit(value: Any) -> int | None:
    """Bytes per worker for a ``memory_limit`` as the embedded cluster takes it; None is no limit.

    Accepts ``"auto"`` (total memory shared by the workers, resolved by Dask), ``None`` or
    ``0`` (no limit), bytes as an int, a fraction of the machine's memory as a float
    ``<= 1``, or a size string such as ``"4GB"``. Returns -1 for ``"auto"``.

    Raises
    ------
    OptionError
        For anything else, or a limit below :data:`MIN_WORKER_MEMORY`.
    """
    from dask.utils import format_bytes, parse_bytes

    flag = "memory_limit (--memory-limit)"
    if value is None or value == "auto":
        return -1 if value == "auto" else None
    if isinstance(value, bool):
        raise OptionError(f"{flag} must be a size such as '4GB', 'auto' or None, got {value!r}")
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise OptionError(f"{flag}: a float is a fraction of the machine's memory, 0 < f <= 1; got {value!r}")
        import psutil

        limit = int(value * psutil.virtual_memory().total)
    elif isinstance(value, int):
        limit = value
    elif isinstance(value, str):
        text = value.strip()
        if text.lower() in ("none", "0"):
            return None
        try:
            limit = parse_bytes(text)
        except (ValueError, TypeError):
            raise OptionError(f"{flag}={value!r} is not a size; use e.g. '4GB', '512MiB' or 'auto'") from None
    else:
        raise OptionError(f"{flag} must be a size such as '4GB', 'auto' or None, got {value!r}")
    if limit == 0:
        return None
    if limit < MIN_WORKER_MEMORY:
        raise OptionError(
            f"{flag}={value!r} ({format_bytes(limit)}) is too small to start a worker: a worker process "
            f"needs about 150 MiB before any well; give at least {format_bytes(MIN_WORKER_MEMORY)}"
        )
    return limit


@dataclass(frozen=True)
class ClusterSpec:
    """Where a plate runs.

    Parameters
    ----------
    client : distributed.Client, optional
        Use this client (its cluster stays open after the run).
    scheduler : str, optional
        An existing scheduler's address (``tcp://host:8786``) or scheduler file.
    n_workers : int, optional
        Workers of the embedded cluster (default: one per core, or one per GPU).
    threads_per_worker : int
        Threads of each embedded worker (default 1).
    memory_limit : str, int, float or None
        Memory per embedded worker (``"auto"``, ``"4GB"``, bytes, a fraction); past it
        the nanny restarts the worker. At least :data:`MIN_WORKER_MEMORY`.
    cluster : {"local", "cuda"}
        The embedded cluster's kind.
    cluster_options : mapping
        Passed to :func:`hcs_dask.cluster.connect` (RMM options, ``resources``, ...).

    Raises
    ------
    OptionError
        For a malformed value or a contradiction (``client`` with ``scheduler``).
    """

    client: Any = field(default=None, compare=False, repr=False)
    scheduler: str | None = None
    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | int | float | None = "auto"
    cluster: str = "local"
    cluster_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _whole("n_workers", "--workers", self.n_workers, minimum=1, optional=True)
        _whole("threads_per_worker", "--threads-per-worker", self.threads_per_worker, minimum=1)
        if self.client is not None and self.scheduler is not None:
            raise OptionError("give either client= or scheduler= (--scheduler), not both")
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or not self.scheduler.strip()):
            raise OptionError(f"scheduler (--scheduler) must be an address or a scheduler file, got {self.scheduler!r}")
        if self.embedded:
            parse_memory_limit(self.memory_limit)
        object.__setattr__(self, "cluster_options", MappingProxyType(dict(self.cluster_options or {})))

    @property
    def embedded(self) -> bool:
        """Whether the run starts (and closes) a cluster of its own."""
        return self.client is None and self.scheduler is None


@dataclass(frozen=True)
class RunPolicy:
    """How a plate runs.

    Parameters
    ----------
    well_timeout : float, optional
        Seconds a well may run; past it the well ends ``timeout`` and its worker
        process is ended by its nanny (or, on this machine, by the operating system).
    worker_death_retries : int
        How often a well whose worker died *because of that well* runs again (default 1).
    failure_retries : int
        How often a well that raised runs again (default 0: exceptions are deterministic).
    stall_timeout : float
        Seconds without a finished well after which the run logs what runs where.
    manifest : bool
        Keep the per-well manifest in the store (needed for ``resume``).
    fsync : bool
        Flush every file of a well to disk before the well counts as ``ok`` (default
        True). ``False`` is for scratch outputs: a killed process still leaves a
        consistent store, but after a power cut or an OS crash a well recorded ``ok``
        may have lost data.
    overwrite : bool
        Replace an existing output.
    resume : bool
        Run only the wells of an earlier run into the same output that are not ``ok``.
    resources : mapping, optional
        Abstract resources each well task asks for (``{"GPU": 1}``, ``{"LICENCE": 1}``):
        a well then runs only on workers offering them, as many at once as they offer.
        Default: ``{"GPU": 1}`` for pipelines with GPU steps, none otherwise.
    max_failures : int, optional
        When the first this many wells to end all failed in the same step, no further
        wells start (they are recorded ``cancelled``; a resume runs them). Default 5;
        ``None`` never stops early.
    skip_incomplete : bool
        Run the wells that have every image and record the others ``skipped``, instead
        of refusing a plate with gaps.
    accept_changed_pipeline : bool
        With ``resume``: accept a pipeline that differs from the earlier run's. The ``ok``
        wells stay; each well's record names the pipeline fingerprint that produced it.
    table_format : {"csv", "parquet"}
        The format of the measurement table beside the store (Parquet needs pyarrow).
        The tables inside the store are ngio tables of its ``json`` backend either way.

    Raises
    ------
    OptionError
        For a malformed value, or ``overwrite`` together with ``resume``.
    """

    well_timeout: float | None = None
    worker_death_retries: int = 1
    failure_retries: int = 0
    stall_timeout: float = 300.0
    manifest: bool = True
    fsync: bool = True
    overwrite: bool = False
    resume: bool = False
    resources: Mapping[str, float] | None = None
    max_failures: int | None = 5
    skip_incomplete: bool = False
    accept_changed_pipeline: bool = False
    table_format: str = "csv"

    def __post_init__(self) -> None:
        object.__setattr__(self, "well_timeout",
                           _seconds("well_timeout", "--well-timeout", self.well_timeout, optional=True))
        object.__setattr__(self, "stall_timeout",
                           _seconds("stall_timeout", "--stall-timeout", self.stall_timeout, optional=False))
        _whole("worker_death_retries", "--worker-death-retries", self.worker_death_retries, minimum=0)
        _whole("failure_retries", "failure_retries", self.failure_retries, minimum=0)
        _whole("max_failures", "--max-failures", self.max_failures, minimum=1, optional=True)
        for name in ("manifest", "fsync", "overwrite", "resume", "skip_incomplete", "accept_changed_pipeline"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.overwrite and self.resume:
            raise OptionError("overwrite (--overwrite) and resume (--resume) contradict each other: "
                              "resume continues the output, overwrite replaces it")
        if self.resources is not None:
            if not isinstance(self.resources, Mapping) or not self.resources or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                    for k, v in self.resources.items()):
                raise OptionError(f"resources must map resource names to amounts > 0, e.g. {{'GPU': 1}}; "
                                  f"got {self.resources!r}")
            object.__setattr__(self, "resources", MappingProxyType(dict(self.resources)))
        if self.resume and not self.manifest:
            raise OptionError("resume (--resume) needs the manifest of the earlier run; manifest=False has none")
        if self.accept_changed_pipeline and not self.resume:
            raise OptionError("accept_changed_pipeline (--accept-changed-pipeline) applies to a resume; "
                              "add resume=True (--resume)")
        if self.table_format not in ("csv", "parquet"):
            raise OptionError(f"table_format (--table-format) must be 'csv' or 'parquet', got {self.table_format!r}")
        if self.table_format == "parquet":
            import importlib.util

            if importlib.util.find_spec("pyarrow") is None:
                raise OptionError("table_format='parquet' (--table-format parquet) needs pyarrow: "
                                  "pip install 'hcs-dask[parquet]'")


def split_options(options: Mapping[str, Any]) -> tuple[ClusterSpec, RunPolicy]:
    """Sort keyword options into a :class:`ClusterSpec` and a :class:`RunPolicy`.

    Raises
    ------
    TypeError
        For an option neither of them has, naming it.
    OptionError
        For a bad value.
    """
    where = {f.name for f in fields(ClusterSpec)}
    how = {f.name for f in fields(RunPolicy)}
    unknown = sorted(set(options) - where - how)
    if unknown:
        raise TypeError(f"unknown run option(s) {', '.join(unknown)}; the options are "
                        f"{', '.join(sorted(where | how))}")
    spec = ClusterSpec(**{k: v for k, v in options.items() if k in where})
    policy = RunPolicy(**{k: v for k, v in options.items() if k in how})
    return spec, policy
