"""Wells on a batch system: SLURM, PBS, LSF or SGE jobs through dask-jobqueue (the ``[hpc]`` extra).

:func:`hpc_client` starts a scheduler in this process and submits ``jobs`` batch jobs,
each running Dask workers with the cleanup plugin preloaded and a ``--lifetime`` that
retires them before the job's walltime. A job that ends (walltime, ``scancel``, a node
lost) is replaced by a new one. Every job is cancelled when the context ends, whether
by success, an exception, Ctrl-C, or (with :func:`sigterm_raises`) a SIGTERM.

The usual dask-jobqueue configuration applies (``jobqueue.slurm.*`` in the Dask config
or ``DASK_JOBQUEUE__SLURM__*`` variables); keyword options override it. Nothing here
imports dask-jobqueue until a cluster is asked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import dask
import yaml

from hcs_dask.cluster import ClusterError, ClusterOptionError
from hcs_dask.options import HPC_KINDS

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "HPC_INSTALL_HINT",
    "HPC_KINDS",
    "check_hpc_options",
    "hpc_client",
    "parse_cluster_options",
    "sigterm_raises",
    "walltime_seconds",
    "worker_lifetime",
]

logger = logging.getLogger(__name__)

#: The batch systems, as ``--cluster`` names them.
_CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "lsf": "LSFCluster", "sge": "SGECluster"}
_SYSTEM_NAMES = {"slurm": "SLURM", "pbs": "PBS", "lsf": "LSF", "sge": "SGE"}

#: What to install for ``cluster="slurm"`` and the other batch systems.
HPC_INSTALL_HINT = "pip install 'hcs-dask[hpc]'"

#: Options that hcs_dask reads itself and does not pass to dask-jobqueue.
_OWN_OPTIONS = ("jobs", "start_timeout")
#: dask-jobqueue keywords that hcs_dask sets, or that dask-jobqueue wants elsewhere.
_REFUSED = {
    "n_workers": "the number of jobs is --jobs (jobs=N); workers per job are the `processes` option",
    "dashboard_address": "pass it in scheduler_options, e.g. scheduler_options={'dashboard_address': ':8787'}",
    "host": "pass it in scheduler_options, e.g. scheduler_options={'host': 'login-node'}",
    "asynchronous": "hcs_dask drives the cluster synchronously",
    "loop": "hcs_dask drives the cluster from its own event loop",
    "job_cls": "the job class follows from --cluster",
}
#: The scheduler this module starts handles deaths as the embedded one does (see cluster.py).
_SCHEDULER_CONFIG = {
    "distributed.scheduler.allowed-failures": 0,
    "distributed.scheduler.worker-saturation": 1.0,
}
#: Job-script line that starts the nanny's workers without MALLOC_TRIM_THRESHOLD_ (see docs/CLUSTERS.md).
MALLOC_TRIM_PROLOGUE = "export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=\"{'MALLOC_TRIM_THRESHOLD_': None}\""
#: How long :func:`hpc_client` waits for the first worker of the submitted jobs, by default.
DEFAULT_START_TIMEOUT = 600.0


# -------------------------------------------------------------------- options
def parse_cluster_options(items: Iterable[str]) -> dict[str, Any]:
    """``["walltime=01:00:00", "cores=4", "job-extra-directives=[--gres=gpu:1]"]`` → keyword options.

    Keys have ``-`` turned into ``_``; values are read as YAML (numbers, booleans,
    lists, mappings), except that a value with a ``:`` stays a string when YAML would
    make a number of it (``01:00:00`` is a walltime, not YAML's sexagesimal 3600).

    Raises
    ------
    ClusterOptionError
        An item without ``=``, an empty key, a value that is not YAML, or a key given twice.

    Examples
    --------
    >>> parse_cluster_options(["walltime=01:00:00", "cores=4", "memory=8GB", "job-extra-directives=[--exclusive]"])
    {'walltime': '01:00:00', 'cores': 4, 'memory': '8GB', 'job_extra_directives': ['--exclusive']}
    """
    options: dict[str, Any] = {}
    for item in items:
        key, equals, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or not key:
            raise ClusterOptionError(f"--cluster-option {item!r}: expected KEY=VALUE, e.g. walltime=01:00:00")
        if key in options:
            raise ClusterOptionError(f"--cluster-option {key} is given twice")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise ClusterOptionError(f"--cluster-option {item!r}: the value is not YAML: {error}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and ":" in text:
            value = text.strip()
        options[key] = value
    return options


def _cluster_class(kind: str) -> Any:
    # dask_jobqueue.runner (0.9.0, dask/dask-jobqueue#696) sets at import a SIGINT handler that exits with
    # status 0; Ctrl-C must stay a KeyboardInterrupt (a failed run, jobs cancelled on the way out).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        import dask_jobqueue
    except ImportError as error:
        raise ClusterError(f"--cluster {kind} needs dask-jobqueue ({HPC_INSTALL_HINT}): {error}") from None
    finally:
        if main_thread and previous is not None and signal.getsignal(signal.SIGINT) is not previous:
            signal.signal(signal.SIGINT, previous)
    return getattr(dask_jobqueue, _CLASSES[kind])


def _accepted_options(cls: Any) -> set[str]:
    """Keyword options that a dask-jobqueue cluster class and its job class take."""
    names: set[str] = set()
    for owner in (cls, cls.job_cls):
        for klass in owner.__mro__:
            if "__init__" in vars(klass) and klass.__module__.startswith("dask_jobqueue"):
                names.update(name for name, parameter in inspect.signature(klass.__init__).parameters.items()
                             if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY))
    return names - {"self", "scheduler"}


def check_hpc_options(
    kind: str,
    *,
    jobs: Any = 1,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: Any = "auto",
    start_timeout: Any = DEFAULT_START_TIMEOUT,
    **options: Any,
) -> None:
    """Raise now what :func:`hpc_client` with these arguments would refuse; submits nothing.

    Parameters
    ----------
    kind : {"slurm", "pbs", "lsf", "sge"}
    jobs : int, default 1
        Batch jobs to keep running.
    n_workers, threads_per_worker, memory_limit
        The embedded cluster's options; with a batch system only their defaults
        (None, 1, ``"auto"``) are accepted: dask-jobqueue's ``processes``, ``cores``
        and ``memory`` (per job) size the workers.
    start_timeout : float, default 600
        Seconds to wait for the first worker of the submitted jobs.
    **options
        dask-jobqueue keyword options (``cores``, ``memory``, ``walltime``, ``queue``, ...).

    Raises
    ------
    ClusterOptionError
        An unknown kind, a bad ``jobs`` or ``start_timeout``, an embedded-cluster or RMM
        option, an option the cluster class does not take, or a walltime that cannot be read.
    ClusterError
        dask-jobqueue is not installed, or the batch system's submit command is not on PATH.
    """
    if kind not in HPC_KINDS:
        raise ClusterOptionError(f"unknown batch system {kind!r}; use one of {', '.join(HPC_KINDS)}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ClusterOptionError(f"--jobs must be a whole number of batch jobs, at least 1, got {jobs!r}")
    if isinstance(start_timeout, bool) or not isinstance(start_timeout, (int, float)) or not start_timeout > 0:
        raise ClusterOptionError(f"start_timeout must be a positive number of seconds, got {start_timeout!r}")
    embedded = [f"{name}={value!r}" for name, value, default in (
        ("n_workers", n_workers, None), ("threads_per_worker", threads_per_worker, 1),
        ("memory_limit", memory_limit, "auto")) if value != default]
    embedded += [f"{name}={value!r}" for name, value in options.items()
                 if name.startswith("rmm_") and value not in (None, False)]
    if embedded:
        raise ClusterOptionError(
            f"{', '.join(embedded)} configure(s) an embedded cluster; with --cluster {kind} the workers are sized "
            "by dask-jobqueue's `cores`, `processes` and `memory` per job (--cluster-option or jobqueue."
            f"{kind}.* in the Dask config)")
    options = {name: value for name, value in options.items() if not name.startswith("rmm_")}
    if importlib.util.find_spec("dask_jobqueue") is None:
        raise ClusterError(f"--cluster {kind} needs dask-jobqueue, which is not installed ({HPC_INSTALL_HINT})")
    cls = _cluster_class(kind)
    accepted = _accepted_options(cls)
    for name in options:
        if name in _REFUSED:
            raise ClusterOptionError(f"--cluster-option {name}: {_REFUSED[name]}")
        if name not in accepted:
            raise ClusterOptionError(
                f"--cluster-option {name}: {cls.__name__} takes no such option; it takes "
                f"{', '.join(sorted(accepted - set(_REFUSED)))}")
    walltime = options.get("walltime", dask.config.get(f"jobqueue.{kind}.walltime", None))
    walltime_seconds(kind, walltime)
    submit = cls.job_cls.submit_command
    if shutil.which(submit.split()[0]) is None:
        raise ClusterError(
            f"--cluster {kind}: `{submit}` is not on PATH; run hcs-dask where {_SYSTEM_NAMES[kind]} jobs can be "
            "submitted (a login node of the cluster)")


# ------------------------------------------------------------------- walltime
def walltime_seconds(kind: str, walltime: Any) -> float | None:
    """Seconds of a walltime in the batch system's notation; None when there is none.

    SLURM: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``. PBS and SGE:
    ``H:M:S`` or seconds. LSF: ``M`` or ``H:M``. A number is taken as the batch
    system would take it (minutes for SLURM and LSF, seconds for PBS and SGE).

    Raises
    ------
    ClusterOptionError
        A walltime that does not follow the notation.

    Examples
    --------
    >>> walltime_seconds("slurm", "1-02:00:00"), walltime_seconds("pbs", "00:30:00"), walltime_seconds("lsf", "01:30")
    (93600.0, 1800.0, 5400.0)
    """
    if walltime is None or walltime == "":
        return None
    text = str(walltime).strip()
    bad = ClusterOptionError(f"walltime {walltime!r} is not a {_SYSTEM_NAMES.get(kind, kind)} time "
                             f"({_WALLTIME_FORMS.get(kind, 'H:M:S')})")
    days: int | None = None
    if kind == "slurm" and "-" in text:
        day_text, _, text = text.partition("-")
        if not day_text.isdigit():
            raise bad
        days = int(day_text)
    parts = text.split(":")
    if not all(part.isdigit() for part in parts) or len(parts) > 3:
        raise bad
    numbers = [int(part) for part in parts]
    minutes_first = kind in ("slurm", "lsf")
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours_minutes_seconds = [*numbers, 0, 0][:3]
        return float(days * 86400 + hours_minutes_seconds[0] * 3600 + hours_minutes_seconds[1] * 60
                     + hours_minutes_seconds[2])
    if len(numbers) == 1:
        return float(numbers[0] * (60 if minutes_first else 1))
    if len(numbers) == 2:
        if kind == "lsf":
            return float(numbers[0] * 3600 + numbers[1] * 60)
        if kind == "slurm":
            return float(numbers[0] * 60 + numbers[1])
        raise bad
    if kind == "lsf":
        raise bad
    return float(numbers[0] * 3600 + numbers[1] * 60 + numbers[2])


_WALLTIME_FORMS = {"slurm": "M, M:S, H:M:S, D-H, D-H:M or D-H:M:S", "pbs": "H:M:S or seconds",
                   "sge": "H:M:S or seconds", "lsf": "M or H:M"}


def worker_lifetime(walltime: float | None) -> tuple[float, float] | None:
    """``(lifetime, stagger)`` seconds for workers in jobs of this walltime; None without one.

    A worker retires between ``lifetime - stagger`` and ``lifetime + stagger`` after it
    starts. The margin before the walltime is 10 % of it, at least a minute and at most
    ten, never more than half the walltime; the stagger is a quarter of the margin, so
    the workers of several jobs do not all retire at once.

    Examples
    --------
    >>> worker_lifetime(1800.0)
    (1620.0, 45.0)
    """
    if walltime is None:
        return None
    margin = min(max(0.1 * walltime, 60.0), 600.0, 0.5 * walltime)
    return walltime - margin, margin / 4


def _has_argument(arguments: list[str], flag: str, value: str | None = None) -> bool:
    for index, argument in enumerate(arguments):
        if argument == flag and (value is None or arguments[index + 1:index + 2] == [value]):
            return True
        if argument.startswith(flag + "=") and (value is None or argument == f"{flag}={value}"):
            return True
    return False


def _job_options(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """The keyword options of the cluster class: the user's, plus the preload, lifetime and prologue."""
    options = dict(options)
    arguments = list(options.get("worker_extra_args") or dask.config.get(f"jobqueue.{kind}.worker-extra-args") or [])
    if not _has_argument(arguments, "--preload", "hcs_dask.plugin"):
        arguments += ["--preload", "hcs_dask.plugin"]
    lifetime = worker_lifetime(walltime_seconds(kind, options.get("walltime", dask.config.get(
        f"jobqueue.{kind}.walltime", None))))
    if lifetime is not None and not _has_argument(arguments, "--lifetime"):
        arguments += ["--lifetime", f"{lifetime[0]:.0f}s", "--lifetime-stagger", f"{lifetime[1]:.0f}s"]
    options["worker_extra_args"] = arguments
    prologue = list(options.get("job_script_prologue") or dask.config.get(
        f"jobqueue.{kind}.job-script-prologue") or [])
    if not any("MALLOC_TRIM_THRESHOLD_" in line for line in prologue):
        prologue.insert(0, MALLOC_TRIM_PROLOGUE)
    options["job_script_prologue"] = prologue
    if "security" not in options and dask.config.get("distributed.comm.tls.ca-file", None):
        from distributed import Security

        options["security"] = Security()  # the Dask config's TLS files, for the scheduler and the workers
    return options


# -------------------------------------------------------------------- cluster
@contextmanager
def hpc_client(
    kind: str,
    *,
    jobs: int = 1,
    start_timeout: float = DEFAULT_START_TIMEOUT,
    **options: Any,
) -> Iterator[Client]:
    """Yield a ``distributed.Client`` of ``jobs`` batch jobs of Dask workers; cancel them on exit.

    The scheduler runs in this process with ``allowed-failures`` 0 and
    ``worker-saturation`` 1.0, as the embedded cluster's does. Each job's workers
    preload :mod:`hcs_dask.plugin` and get ``--lifetime``/``--lifetime-stagger`` from
    the walltime (:func:`worker_lifetime`) unless ``worker_extra_args`` already has a
    ``--lifetime``; the job script starts their nanny without ``MALLOC_TRIM_THRESHOLD_``
    unless its prologue mentions that variable. With TLS files in the Dask config
    (``distributed.comm.tls.*``) and no ``security`` option, scheduler and workers use them.

    Parameters
    ----------
    kind : {"slurm", "pbs", "lsf", "sge"}
    jobs : int, default 1
        Batch jobs to keep running: a job whose workers are gone is replaced.
    start_timeout : float, default 600
        Seconds to wait for the first worker (jobs may wait in the queue).
    **options
        Keyword options of ``dask_jobqueue.SLURMCluster`` (``PBSCluster``, ...), over
        the Dask config's ``jobqueue.<kind>.*``.

    Yields
    ------
    distributed.Client

    Raises
    ------
    ClusterOptionError, ClusterError
        See :func:`check_hpc_options`; also a submission that the batch system refuses,
        or no worker within ``start_timeout``.

    Examples
    --------
    >>> with hpc_client("slurm", jobs=4, cores=8, memory="32GB", walltime="02:00:00") as client:  # doctest: +SKIP
    ...     run_plate(plate, pipeline, "out.ome.zarr", client=client)
    """
    from distributed import Client

    check_hpc_options(kind, jobs=jobs, start_timeout=start_timeout, **options)
    cls = _cluster_class(kind)
    name = _SYSTEM_NAMES[kind]
    with dask.config.set(_SCHEDULER_CONFIG):
        try:
            cluster = cls(**_job_options(kind, options))
        except (ValueError, TypeError) as error:
            raise ClusterOptionError(f"{cls.__name__}: {error}") from error
    keeper: _JobKeeper | None = None
    client: Client | None = None
    try:
        cluster.scale(jobs=jobs)
        cluster.sync(cluster._correct_state)  # waits for the submissions that scale() started
        for job in _failed_submissions(cluster):
            # dask-jobqueue only logged why; submitting again says it (or succeeds this time).
            try:
                cluster.sync(job.start)
            except Exception as error:  # RuntimeError with the submit command's output
                _mark_failed(job)
                raise ClusterError(f"{name} refused the job submission: {error}") from None
        client = Client(cluster)
        ids = ", ".join(str(job.job_id) for job in cluster.workers.values())
        logger.info("submitted %d %s job(s) (%s); waiting for the first worker", jobs, name, ids)
        try:
            client.wait_for_workers(1, timeout=start_timeout)
        except TimeoutError:
            raise ClusterError(
                f"no worker of the {jobs} {name} job(s) ({ids}) connected within {start_timeout:g} s; they may wait "
                "in the queue (raise start_timeout) or fail at start (see the jobs' output, the log_directory "
                "option; is hcs-dask installed for the jobs' python?)") from None
        keeper = _JobKeeper(cluster, name)
        keeper.start()
        yield client
    finally:
        if keeper is not None:
            keeper.stop()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        for job in _failed_submissions(cluster):
            _mark_failed(job)  # never submitted: nothing to cancel (and closing asserts it started)
        cluster.close()  # cancels every job (scancel, qdel, bkill)


def _failed_submissions(cluster: Any) -> list[Any]:
    """The cluster's jobs whose submission failed (they never left ``Status.created``)."""
    from distributed.core import Status

    return [job for job in list(cluster.workers.values()) if job.status == Status.created]


def _mark_failed(job: Any) -> None:
    from distributed.core import Status

    job.status = Status.failed


class _JobKeeper:
    """Replace the jobs whose workers are gone (walltime, --lifetime, scancel, a lost node).

    dask-jobqueue's cluster keeps a lost job in its plan, so nothing would start another
    one. A job of one worker is forgotten by the cluster itself once its worker has been
    gone for ``distributed.deploy.lost-worker-timeout``; a job of several workers
    (``processes`` > 1), which the cluster never forgets, once none of them has been
    connected for longer than that. The keeper then submits a new job under the same name.
    """

    INTERVAL_MS = 2000
    #: Seconds between attempts to submit a replacement that the batch system refused.
    RETRY_SECONDS = 30

    def __init__(self, cluster: Any, system: str) -> None:
        from dask.utils import parse_timedelta

        self.cluster = cluster
        self.system = system
        self.grace = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout")) + 1.0
        self.last_seen: dict[int, float] = {}
        self.replaced = 0
        self.retry_after = 0.0
        self._callback: Any = None
        self._checking = False

    def start(self) -> None:
        from tornado.ioloop import PeriodicCallback

        self._callback = PeriodicCallback(self._check, self.INTERVAL_MS)
        done = threading.Event()

        def start_on_loop() -> None:
            self._callback.start()
            done.set()

        self.cluster.loop.add_callback(start_on_loop)
        done.wait(10)

    def stop(self) -> None:
        if self._callback is not None:
            self.cluster.loop.add_callback(self._callback.stop)

    async def _check(self) -> None:
        from distributed.core import Status

        cluster = self.cluster
        if self._checking or cluster.status != Status.running:
            return
        self._checking = True
        try:
            connected = {str(info.get("name")) for info in cluster.scheduler_info.get("workers", {}).values()}
            now = time.monotonic()
            lost = []
            for job_name, spec in list(cluster.worker_spec.items()):
                job = cluster.workers.get(job_name)
                if job is None:
                    continue
                if "group" not in spec:
                    continue  # the cluster forgets it by itself; doing it here too would race with that
                names = {f"{job_name}{suffix}" for suffix in spec["group"]}
                if names & connected:
                    self.last_seen[id(job)] = now
                elif id(job) in self.last_seen and now - self.last_seen[id(job)] > self.grace:
                    lost.append(job_name)
            for job_name in lost:
                job = cluster.workers.pop(job_name)
                self.last_seen.pop(id(job), None)
                with contextlib.suppress(Exception):
                    await job.close()
            missing = set(cluster.worker_spec) - set(cluster.workers)
            if missing and now >= self.retry_after:
                self.replaced += len(missing)
                logger.warning("%s job(s) %s ended; submitting %d replacement(s)", self.system,
                               ", ".join(sorted(map(str, missing))), len(missing))
                await cluster._correct_state()
                refused = _failed_submissions(cluster)
                for job in refused:  # dask-jobqueue logged why; try again later
                    _mark_failed(job)
                for job_name, job in list(cluster.workers.items()):
                    if job in refused:
                        del cluster.workers[job_name]
                if refused:
                    self.retry_after = now + self.RETRY_SECONDS
                    logger.warning("%s refused %d replacement job(s); trying again in %d s", self.system,
                                   len(refused), self.RETRY_SECONDS)
            alive = {id(job) for job in cluster.workers.values()}
            for key in set(self.last_seen) - alive:
                del self.last_seen[key]
        except Exception:  # a failed resubmission is retried at the next check
            logger.exception("replacing lost %s jobs failed", self.system)
        finally:
            self._checking = False


# --------------------------------------------------------------------- SIGTERM
@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn the first SIGTERM into ``SystemExit(143)`` in the main thread, so ``finally`` clauses run.

    A batch system or ``kill`` ends the client with SIGTERM; without a handler Python
    dies at once and the jobs it submitted keep running until their walltime. Later
    SIGTERMs are ignored while the first one unwinds (closing a cluster takes seconds).
    Outside the main thread it does nothing. The previous handler is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

