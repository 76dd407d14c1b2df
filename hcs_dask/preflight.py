"""Checks of a running cluster before the first well: workers, versions, GPUs, the output path.

:func:`check_cluster_ready` runs on the client once the cluster is reached and before
anything is written. Each problem it finds is a :class:`PreflightError` (a
:class:`~hcs_dask.cluster.ClusterError`, so the command line exits 2) with a sentence
that names it. What it learns about the cluster (the scheduler's settings that change
how worker deaths reach the client, the workers' threads, GPU slots and nannies) comes
back as :class:`ClusterFacts`, so that the run can adapt or say what it assumes.
"""

from __future__ import annotations

import math
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from hcs_dask.cluster import ClusterError

if TYPE_CHECKING:
    from distributed import Client, Scheduler, Worker

    from hcs_dask.pipeline import Pipeline

__all__ = [
    "ClusterFacts",
    "GpuResourceError",
    "NoWorkersError",
    "OutputNotWritableError",
    "PreflightError",
    "VersionMismatchError",
    "WorkerFacts",
    "check_cluster_ready",
    "check_versions",
    "probe_output",
]

#: Seconds :func:`check_cluster_ready` waits for the first worker by default.
DEFAULT_WORKER_WAIT = 5.0


class PreflightError(ClusterError):
    """A cluster that was reached but cannot run this plate; nothing was written."""


class NoWorkersError(PreflightError):
    """No worker joined the scheduler within the wait."""


class VersionMismatchError(PreflightError):
    """Client, scheduler and workers run package versions that cannot work together."""


class GpuResourceError(PreflightError):
    """A pipeline with GPU steps on a cluster whose workers offer no ``GPU`` resource."""


class OutputNotWritableError(PreflightError):
    """A worker cannot see or write the output's folder."""


# (package, leading version fields that must agree, must be on the scheduler too). The
# scheduler unpickles the task graph (WellPlan, Pipeline, run_well by reference), so it
# needs hcs-dask and the serialisation stack; only the workers read and write images.
_VERSION_RULES: tuple[tuple[str, int, bool], ...] = (
    ("python", 2, True),  # cloudpickle ships bytecode: it loads only on the same minor
    ("dask", 3, True),  # the graph and task spec classes change between releases
    ("distributed", 3, True),  # the scheduler/worker/client protocol is not versioned
    ("cloudpickle", 2, True),  # by-value functions are rebuilt by cloudpickle's private helpers
    ("msgpack", 1, True),  # every message is msgpack
    ("numpy", 1, False),  # numpy 2 pickles name numpy._core, which numpy 1 cannot load
    ("zarr", 1, False),  # the workers write zarr v3 groups and arrays
    ("hcs-dask", 3, True),  # the workers run their own installed run_well
)
_PACKAGES = tuple(name for name, _, _ in _VERSION_RULES if name != "python")


@dataclass(frozen=True)
class WorkerFacts:
    """One worker as the scheduler and the worker itself describe it."""

    address: str
    host: str
    threads: int
    gpu_slots: float
    nanny: bool
    cleanup_plugin: bool


@dataclass(frozen=True)
class ClusterFacts:
    """What :func:`check_cluster_ready` found about a cluster that passed every check.

    Attributes
    ----------
    scheduler : str
        The scheduler's address.
    allowed_failures : int or None
        The scheduler's ``distributed.scheduler.allowed-failures``: how many worker deaths
        a task survives (the scheduler reruns it) before the client sees ``KilledWorker``.
        None where the scheduler could not be asked.
    worker_saturation : float or None
        The scheduler's ``distributed.scheduler.worker-saturation``: with a finite value
        the scheduler sends a worker about ``threads × saturation`` wells at a time and
        queues the rest itself; ``inf`` sends every well to a worker at once. None where
        the scheduler could not be asked.
    workers : tuple of WorkerFacts
        Every worker when the checks ran.
    probed_hosts : tuple of str
        The distinct hosts whose workers created and removed a file in the output's folder.
    """

    scheduler: str
    allowed_failures: int | None
    worker_saturation: float | None
    workers: tuple[WorkerFacts, ...]
    probed_hosts: tuple[str, ...] = ()

    @property
    def n_workers(self) -> int:
        return len(self.workers)

    @property
    def threads(self) -> int:
        """Threads of all workers together: the wells that can run at once."""
        return sum(worker.threads for worker in self.workers)

    @property
    def gpu_slots(self) -> float:
        """``GPU`` resource of all workers together."""
        return sum(worker.gpu_slots for worker in self.workers)

    @property
    def all_nannies(self) -> bool:
        """Whether every worker runs under a nanny (restarted when it dies; killable from outside)."""
        return all(worker.nanny for worker in self.workers)

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(sorted({worker.host for worker in self.workers}))

    def assumes(self) -> str:
        """One sentence: the cluster as the run found it, and what that means for worker deaths.

        Examples
        --------
        >>> facts = ClusterFacts("tcp://127.0.0.1:8786", 3, 1.1,
        ...     (WorkerFacts("tcp://127.0.0.1:4001", "127.0.0.1", 2, 0, True, True),))
        >>> print(facts.assumes())  # doctest: +NORMALIZE_WHITESPACE
        assumes 1 worker (2 threads, no GPU slot) on 1 host, every worker with a nanny and
        the cleanup plugin; a worker's death reaches the run when the worker leaves, and its
        wells wait for the run instead of being rerun by the scheduler (allowed-failures 3);
        no well waits queued on a worker whatever worker-saturation says (1.1)
        """
        workers = self.n_workers
        gpu = f"{self.gpu_slots:g} GPU slot{'s' * (self.gpu_slots != 1)}" if self.gpu_slots else "no GPU slot"
        parts = [f"assumes {workers} worker{'s' * (workers != 1)} ({self.threads} thread"
                 f"{'s' * (self.threads != 1)}, {gpu}) on {len(self.hosts)} host{'s' * (len(self.hosts) != 1)}"]
        nannies = sum(worker.nanny for worker in self.workers)
        plugins = sum(worker.cleanup_plugin for worker in self.workers)
        if nannies == plugins == workers:
            parts.append("every worker with a nanny and the cleanup plugin")
        else:
            parts.append(f"{nannies} of {workers} with a nanny (a worker without one is neither restarted "
                         f"nor stoppable from outside), {plugins} of {workers} with the cleanup plugin "
                         "preloaded (the run registers it on the rest)")
        sentence = f"{parts[0]}, {parts[1]}"
        # The run places every well on a free slot itself, restricted to that worker
        # (hcs_dask.driver): these settings change how it learns of a death, not who pays.
        if self.allowed_failures is None:
            sentence += "; the scheduler's allowed-failures is unknown"
        elif self.allowed_failures == 0:
            sentence += "; a worker's death reaches the run at once as KilledWorker (allowed-failures 0)"
        else:
            sentence += (f"; a worker's death reaches the run when the worker leaves, and its wells wait "
                         f"for the run instead of being rerun by the scheduler (allowed-failures "
                         f"{self.allowed_failures})")
        if self.worker_saturation is None:
            sentence += "; worker-saturation is unknown"
        else:
            sentence += (f"; no well waits queued on a worker whatever worker-saturation says "
                         f"({self.worker_saturation:g})")
        return sentence


def check_cluster_ready(
    client: Client,
    *,
    pipeline: Pipeline,
    output: str | Path,
    wait: float = DEFAULT_WORKER_WAIT,
) -> ClusterFacts:
    """Check that ``client``'s cluster can run ``pipeline`` into ``output``; raise what cannot.

    In this order, each check only once the ones before it passed:

    1. at least one worker joins within ``wait`` seconds;
    2. client, scheduler and workers run versions that work together
       (:func:`check_versions`);
    3. a pipeline with GPU steps finds workers that offer the ``GPU`` resource;
    4. one worker per distinct (host, user) sees the client's file system at the output
       and can create and remove a file there (:func:`probe_output`).

    Nothing stays behind: the probe's files are removed, the output is not created.

    Parameters
    ----------
    client : distributed.Client
        A synchronous client of the cluster.
    pipeline : Pipeline
        The pipeline of the run (only :meth:`~hcs_dask.Pipeline.uses_gpu` is asked).
    output : str or Path
        The ``.ome.zarr`` plate the run will write.
    wait : float, default 5.0
        Seconds to wait for the first worker.

    Returns
    -------
    ClusterFacts

    Raises
    ------
    ValueError
        ``wait`` is not a positive number of seconds.
    NoWorkersError, VersionMismatchError, GpuResourceError, OutputNotWritableError
        (all :class:`PreflightError`, a :class:`~hcs_dask.cluster.ClusterError`) with a
        sentence naming the problem.

    Examples
    --------
    >>> facts = check_cluster_ready(client, pipeline=pipeline, output="out.ome.zarr")  # doctest: +SKIP
    >>> facts.assumes()  # doctest: +SKIP
    'assumes 2 workers (2 threads, no GPU slot) on 1 host, ...'
    """
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 < wait < math.inf:
        raise ValueError(f"wait must be a positive number of seconds, got {wait!r}")
    address = client.scheduler.address
    try:
        client.wait_for_workers(1, timeout=wait)
    except TimeoutError:
        raise NoWorkersError(
            f"no worker joined the scheduler at {address} within {wait:g} s; start workers with "
            f"`dask worker {address} --preload hcs_dask.plugin` (or check why the started ones did not connect)"
        ) from None
    check_versions(client.get_versions(packages=list(_PACKAGES)))
    allowed_failures, worker_saturation = _scheduler_settings(client)
    info = client.scheduler_info(n_workers=-1)["workers"]
    identities = client.run(_identity, on_error="return")
    workers = tuple(
        WorkerFacts(
            address=worker_address,
            host=str(worker.get("host", "")),
            threads=int(worker.get("nthreads", 0)),
            gpu_slots=float(worker.get("resources", {}).get("GPU", 0)),
            nanny=bool(worker.get("nanny")),
            cleanup_plugin=bool(_plain(identities.get(worker_address), {}).get("plugin", False)),
        )
        for worker_address, worker in sorted(info.items())
    )
    if pipeline.uses_gpu() and not any(worker.gpu_slots for worker in workers):
        steps = ", ".join(step.name for step in pipeline.steps if step.array_type != "numpy")
        raise GpuResourceError(
            f"pipeline {pipeline.name!r} has GPU steps ({steps}) but none of the {len(workers)} worker(s) at "
            f"{address} offers the GPU resource; start the workers with `dask cuda worker {address} "
            "--resources GPU=1 --preload hcs_dask.plugin`, or run on an embedded GPU cluster with "
            "--cluster cuda (run_plate(cluster='cuda'))"
        )
    hosts = probe_output(client, output, identities=identities)
    return ClusterFacts(scheduler=address, allowed_failures=allowed_failures,
                        worker_saturation=worker_saturation, workers=workers, probed_hosts=hosts)


# -------------------------------------------------------------------- versions
def check_versions(versions: Mapping[str, Any]) -> None:
    """Raise :class:`VersionMismatchError` where client, scheduler and workers cannot work together.

    Compared: Python (major.minor), dask and distributed (exact), cloudpickle
    (major.minor), msgpack, numpy and zarr (major), and hcs-dask (exact; it must be
    installed on the scheduler and every worker). numpy and zarr are compared between
    the client and the workers only.

    Parameters
    ----------
    versions : mapping
        As returned by ``client.get_versions(packages=["cloudpickle", "msgpack", "numpy",
        "zarr", "hcs-dask"])``: ``{"client": ..., "scheduler": ..., "workers": {address: ...}}``,
        each with a ``"packages"`` mapping of name to version string (None when missing).

    Raises
    ------
    VersionMismatchError
        Naming every package that differs and where each version is.

    Examples
    --------
    >>> side = {"packages": {"python": "3.11.7.final.0", "dask": "2026.8.0", "hcs-dask": "0.1.0"}}
    >>> check_versions({"client": side, "scheduler": side, "workers": {"tcp://w:1": side}})
    >>> worker = {"packages": {**side["packages"], "python": "3.12.1.final.0", "hcs-dask": None}}
    >>> try:
    ...     check_versions({"client": side, "scheduler": side, "workers": {"tcp://w:1": worker}})
    ... except VersionMismatchError as error:
    ...     print(error)  # doctest: +NORMALIZE_WHITESPACE
    package versions differ in a way that breaks the run: python 3.11 on the client and the
    scheduler, but 3.12 on worker tcp://w:1; hcs-dask 0.1.0 on the client and the scheduler,
    but not installed on worker tcp://w:1. Install the client's versions on the scheduler and
    every worker
    """
    sides: dict[str, Mapping[str, Any]] = {"the client": _packages(versions.get("client"))}
    scheduler = _packages(versions.get("scheduler"))
    workers = {str(address): _packages(info) for address, info in sorted((versions.get("workers") or {}).items())}
    problems = []
    for package, fields, on_scheduler in _VERSION_RULES:
        present = dict(sides)
        if on_scheduler:
            present["the scheduler"] = scheduler
        present.update({f"worker {address}": packages for address, packages in workers.items()})
        seen: dict[str, list[str]] = {}
        for where, packages in present.items():
            if package not in packages and package != "hcs-dask":
                continue  # not asked for (an older client's get_versions): nothing to compare
            version = packages.get(package)
            if version is None and package not in ("hcs-dask", "python") and where == "the client":
                continue  # optional on the client; its absence does not break the workers
            seen.setdefault(_leading(version, fields), []).append(where)
        if len(seen) > 1:
            groups = [f"{'not installed' if version == '' else version} on {_places(places)}"
                      for version, places in seen.items()]
            problems.append(f"{package} {groups[0]}, but " + ", and ".join(groups[1:]))
    if problems:
        raise VersionMismatchError(
            "package versions differ in a way that breaks the run: " + "; ".join(problems)
            + ". Install the client's versions on the scheduler and every worker"
        )


def _packages(side: Any) -> Mapping[str, Any]:
    if isinstance(side, Mapping):
        packages = side.get("packages")
        if isinstance(packages, Mapping):
            return packages
    return {}


def _leading(version: Any, fields: int) -> str:
    """``"3.11.7.final.0"`` → ``"3.11"`` (fields=2); a missing package → ``""``."""
    if version is None:
        return ""
    return ".".join(str(version).split(".")[:fields])


def _places(places: list[str]) -> str:
    """``["the client", "worker a", "worker b"]`` → ``"the client and 2 workers (a, b)"``."""
    named = [place for place in places if not place.startswith("worker ")]
    workers = [place.removeprefix("worker ") for place in places if place.startswith("worker ")]
    if len(workers) == 1:
        named.append(f"worker {workers[0]}")
    elif workers:
        shown = ", ".join(workers[:3]) + (f", {len(workers) - 3} more" if len(workers) > 3 else "")
        named.append(f"{len(workers)} workers ({shown})")
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


# ----------------------------------------------------------- scheduler settings
def _scheduler_settings(client: Client) -> tuple[int | None, float | None]:
    try:
        allowed, saturation = client.run_on_scheduler(_read_scheduler_settings)
    except Exception:  # a scheduler that refuses to run functions (distributed.scheduler.pickle off)
        return None, None
    return allowed, saturation


def _read_scheduler_settings(dask_scheduler: Scheduler) -> tuple[int, float]:
    return int(dask_scheduler.allowed_failures), float(dask_scheduler.WORKER_SATURATION)


# ------------------------------------------------------------------ the workers
def _identity(dask_worker: Worker) -> dict[str, Any]:
    """Who a worker is, as far as writing files goes; and whether the cleanup plugin runs there."""
    from hcs_dask.plugin import CleanupPlugin

    return {
        "host": socket.gethostname(),
        "uid": os.getuid() if hasattr(os, "getuid") else None,
        "gids": sorted({os.getgid(), *os.getgroups()}) if hasattr(os, "getgid") else None,
        "plugin": CleanupPlugin.name in dask_worker.plugins,
    }


def _plain(value: Any, default: Any) -> Any:
    return default if isinstance(value, BaseException) or value is None else value


def probe_output(client: Client, output: str | Path, *, identities: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """Have one worker per distinct (host, user, groups) create and remove a file where the output goes.

    The folder probed is ``output`` when it exists (a resumed or overwritten run),
    else its parent. The client first writes a marker file with a random token
    there; a worker that cannot read the token does not share the client's file system.
    The marker and every probe file are removed again.

    Parameters
    ----------
    client : distributed.Client
    output : str or Path
        The ``.ome.zarr`` plate the run will write.
    identities : mapping, optional
        ``{worker address: identity}`` already gathered by :func:`check_cluster_ready`.

    Returns
    -------
    tuple of str
        The hosts probed.

    Raises
    ------
    OutputNotWritableError
        Naming the folder, the workers and what went wrong (not there, another file
        system, permission denied).
    """
    target = Path(output).absolute()
    folder = target if target.is_dir() else target.parent
    if not folder.is_dir():
        raise OutputNotWritableError(f"{folder}: the output's folder does not exist on this machine")
    if identities is None:
        identities = client.run(_identity, on_error="return")
    chosen: dict[tuple, str] = {}
    for address, identity in sorted(identities.items()):
        identity = _plain(identity, {"host": address})
        chosen.setdefault((identity.get("host"), identity.get("uid"), tuple(identity.get("gids") or ())), address)
    token = uuid.uuid4().hex
    marker = folder / f".hcs-dask-probe-{token}"
    try:
        marker.write_text(token)
    except OSError as error:
        raise OutputNotWritableError(f"{folder}: this process cannot write the output's folder: "
                                     f"{error.strerror or error}") from None
    try:
        answers = client.run(_probe_folder, str(folder), marker.name, token, workers=list(chosen.values()),
                             on_error="return")
    finally:
        marker.unlink(missing_ok=True)
    problems = []
    for address in chosen.values():
        answer = answers.get(address, "did not answer")
        if isinstance(answer, BaseException):
            answer = f"{type(answer).__name__}: {answer}"
        if answer is not None:
            identity = _plain(identities.get(address), {})
            problems.append(f"worker {address} (host {identity.get('host', '?')}, uid {identity.get('uid', '?')}) "
                            f"{answer}")
    if problems:
        raise OutputNotWritableError(
            f"the output's folder {folder} is not writable from every worker: " + "; ".join(problems)
            + ". Put the output on a file system that every worker shares and may write"
        )
    return tuple(sorted({str(_plain(identities.get(address), {}).get("host", address)) for address in chosen.values()}))


def _probe_folder(folder: str, marker: str, token: str) -> str | None:
    """On a worker: None if ``folder`` is the client's and writable here, else what is wrong."""
    path = Path(folder)
    if not path.is_dir():
        return f"does not see {folder} (no such folder on its host)"
    try:
        seen = (path / marker).read_text()
    except OSError as error:
        return (f"sees {folder} but not the client's probe file in it ({error.strerror or error}): "
                "not the client's file system")
    if seen != token:
        return f"sees another file in {folder} than the client wrote: not the client's file system"
    probe = path / f".hcs-dask-probe-{uuid.uuid4().hex}"
    try:
        descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except OSError as error:
        return f"cannot create a file in {folder}: {error.strerror or error}"
    try:
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        return f"created a file in {folder} but cannot remove it: {error.strerror or error}"
    return None
