"""The ``hcs-dask`` command.

Exit codes: 0 every well ok; 1 some wells did not succeed (the summary is still
written); 2 invalid input, reported before any task runs and with nothing written.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import click

# Only what the options' help needs is imported here, so that `hcs-dask --help` starts at
# once; a command imports what it uses (Dask, zarr, the readers) when it runs.
from hcs_dask.options import HPC_KINDS

if TYPE_CHECKING:
    from hcs_dask.results import PlateResult

__all__ = ["entry", "main"]


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "the input is wrong": exit code 2, nothing written."""
    from hcs_dask.compile import CompileError
    from hcs_dask.formats import PlateError
    from hcs_dask.options import OptionError
    from hcs_dask.pipeline import PipelineError
    from hcs_dask.store import OutputError

    return (OptionError, PlateError, PipelineError, CompileError, OutputError)


class _SyntheticFormats(click.Choice):
    """The synthetic plate formats as a ``click.Choice``, listed by the writer only when click asks."""

    def __init__(self) -> None:
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        from hcs_dask.formats._synthetic_layouts import LAYOUTS  # the readers import NumPy and tifffile

        return tuple(LAYOUTS)

    @choices.setter
    def choices(self, value: object) -> None:
        """``click.Choice.__init__`` sets an empty list; the writer's list is the one used."""


def _fail_input(error: Exception) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(2)


def _report(result: PlateResult, summary: str | None) -> None:
    counts = ", ".join(f"{n} {status}" for status, n in result.counts().items())
    click.echo(f"plate {result.plate}: {len(result.wells)} wells: {counts} ({result.seconds:.1f} s)")
    if result.mixed:
        click.echo(f"  {result.mixed_text()}")
    if result.stopped:
        click.echo(f"  stopped early: {result.stopped}", err=True)
    for failure in result.failures():
        where = f" in step {failure.step!r}" if failure.step else ""
        what = f"{failure.error_type}: {failure.error}" if failure.error_type else (failure.error or failure.cause)
        click.echo(f"  {failure.well}: {failure.status}{where}: {what}", err=True)
    click.echo(f"output: {result.output}")
    if result.measurements_path:
        click.echo(f"measurements: {result.measurements_path}")
    if result.tables:
        click.echo(f"tables in the store: {', '.join(result.tables)}")
    if summary:
        result.write_summary(summary)
        click.echo(f"summary: {summary}")


def _prestart_workers() -> None:
    """Start the embedded workers' fork server before this process imports distributed.

    Then freeze what the imports made (``gc.freeze``): this process keeps those objects to its
    end, and a full collection walking them (about 55 ms, 0.65 s into a 96-well ``run``, while
    its cluster started and its layout was written) is spared.
    """
    import gc

    from hcs_dask._forkserver import prestart

    try:
        prestart()
    except ValueError as error:  # a bad hcs-dask.worker-start in the Dask config
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    gc.freeze()


def _run(graph: str, plate_path: str, output: str, *, device: str, summary: str | None,
         wells: str | None = None, **options: object) -> PlateResult:
    from hcs_dask.cluster import ClusterError
    from hcs_dask.driver import run_plate
    from hcs_dask.options import split_options
    from hcs_dask.pipeline import load_pipeline

    try:
        split_options(options)  # every option checked before the plate is even opened
        graph_options = {"device": device} if device != "cpu" else {}
        pipeline = load_pipeline(graph, **graph_options)
        if wells:
            from hcs_dask.formats import open_plate
            from hcs_dask.options import OptionError

            plate = open_plate(plate_path)
            try:
                plate = plate.select([w.strip() for w in wells.split(",") if w.strip()])
            except (KeyError, ValueError) as error:
                raise OptionError(f"--wells {wells}: {error.args[0]}") from None
            result = run_plate(plate, pipeline, output, **options)
        else:  # the plate is opened by run_plate, while the cluster starts
            result = run_plate(plate_path, pipeline, output, **options)
    except _input_errors() as error:
        _fail_input(error)
    except ClusterError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    _report(result, summary)
    return result


# ------------------------------------------------------- scale-out options of `run`
#: The options that _scale_out_options adds to `run`, as its parameters are named.
SCALE_OUT_PARAMETERS = ("jobs", "cluster_option", "tls_ca_file", "tls_cert", "tls_key")


def _scale_out_options(command):
    """--jobs and --cluster-option for --cluster slurm|pbs|lsf|sge; the TLS files for any scheduler."""
    options = [
        click.option("--jobs", type=int, default=None,
                     help="--cluster slurm|pbs|lsf|sge: batch jobs of Dask workers to keep running [1]."),
        click.option("--cluster-option", multiple=True, metavar="KEY=VALUE",
                     help="--cluster slurm|pbs|lsf|sge: a dask-jobqueue option (walltime=01:00:00, cores=8, "
                          "memory=32GB, queue=gpu, ...), over the Dask config's jobqueue.<kind>.*; repeatable."),
        click.option("--tls-ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="CA certificate of a tls:// scheduler (as dask worker --tls-ca-file)."),
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Certificate this client presents to a tls:// scheduler."),
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Private key of --tls-cert (omit when the certificate file holds it)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@contextmanager
def _scaled_out(cluster: str, options: dict) -> Iterator[dict]:
    """Pop the scale-out options from ``options``; yield the cluster options they add.

    Within the block the TLS files are the Dask config's, and a SIGTERM unwinds (so a
    batch system's jobs are cancelled). A bad combination exits 2 before anything runs.
    """
    import dask

    from hcs_dask.cluster import ClusterError
    from hcs_dask.hpc import parse_cluster_options, sigterm_raises

    jobs, items, ca_file, cert, key = (options.pop(name) for name in SCALE_OUT_PARAMETERS)
    extra: dict = {}
    try:
        if cluster in HPC_KINDS:
            extra = {**parse_cluster_options(items), "jobs": 1 if jobs is None else jobs}
        elif jobs is not None or items:
            raise ClusterError(f"--jobs and --cluster-option apply to --cluster {'|'.join(HPC_KINDS)}, "
                               f"not --cluster {cluster}")
        if (ca_file or cert or key) and not (ca_file and cert):  # distributed's TLS always presents a certificate
            raise ClusterError("TLS needs --tls-ca-file and --tls-cert (and --tls-key unless the certificate "
                               "file holds the key)")
    except ClusterError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    tls = {}
    if ca_file:
        cert_key = key or cert
        tls = {"distributed.comm.tls.ca-file": ca_file}
        for role in ("client", "scheduler", "worker"):  # a batch system's scheduler and workers too
            tls |= {f"distributed.comm.tls.{role}.cert": cert, f"distributed.comm.tls.{role}.key": cert_key}
    with dask.config.set(tls), sigterm_raises():
        yield extra


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hcs-dask")
def main() -> None:
    """Plate-scale image processing for high-content screening, one Dask task per well."""


@main.command()
@click.argument("graph")
@click.argument("plate", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="The OME-Zarr plate to write (.ome.zarr).")
@click.option("--workers", type=int, default=None, help="Workers of the embedded cluster [one per core].")
@click.option("--threads-per-worker", type=int, default=1, show_default=True)
@click.option("--scheduler", default=None, help="Address or scheduler file of an existing Dask cluster.")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Passed to the graph's make_pipeline(device=...).")
@click.option("--summary", type=click.Path(), default=None, help="Write a JSON summary of every well here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--resume", is_flag=True,
              help="Re-run only the wells of an earlier run into OUTPUT whose status is not ok.")
@click.option("--well-timeout", type=float, default=None,
              help="Seconds a well may run; past it the well is 'timeout' and its worker is restarted.")
@click.option("--memory-limit", default="auto", show_default=True,
              help="Memory per worker of the embedded cluster (e.g. 4GB); a well past it ends 'worker_died'.")
@click.option("--worker-death-retries", type=int, default=1, show_default=True,
              help="How often a well whose worker died is tried again.")
@click.option("--stall-timeout", type=float, default=300, show_default=True,
              help="Seconds without progress after which the run reports which wells are stuck where.")
@click.option("--no-fsync", is_flag=True,
              help="Scratch outputs: do not flush each well's files to disk before it counts ok. A killed run "
                   "still leaves a consistent store; a power cut or OS crash may lose wells recorded ok.")
@click.option("--cluster", type=click.Choice(["local", "cuda", *HPC_KINDS]), default="local",
              show_default=True,
              help="The embedded cluster: 'local' (one worker per core) or 'cuda' (dask-cuda: one worker "
                   "per GPU, offering the GPU resource that --device gpu steps ask for); or a batch system "
                   "through dask-jobqueue (see --jobs, --cluster-option; pip install 'hcs-dask[hpc]').")
@click.option("--rmm-pool-size", default=None,
              help="--cluster cuda: an RMM pool per GPU worker: bytes, a size such as 8GB, or a fraction "
                   "of the device's memory such as 0.5.")
@click.option("--rmm-maximum-pool-size", default=None,
              help="--cluster cuda: the most the RMM pool (or the async allocator) may hold.")
@click.option("--rmm-async", is_flag=True,
              help="--cluster cuda: RMM's asynchronous allocator (cudaMallocAsync) instead of a pool.")
@click.option("--rmm-release-threshold", default=None,
              help="--cluster cuda --rmm-async: memory the allocator keeps; freed memory above it goes "
                   "back to the driver at each well's cleanup.")
@click.option("--rmm-managed-memory", is_flag=True, help="--cluster cuda: RMM allocates managed (unified) memory.")
@click.option("--rmm-for-cupy", is_flag=True,
              help="--cluster cuda: RMM becomes CuPy's allocator on every worker; CuPy's memory is then "
                   "cleaned through RMM.")
@click.option("--rmm-reinitialize-pool", is_flag=True,
              help="--cluster cuda --rmm-pool-size: re-create the pool after every well, giving back what "
                   "it grew by.")
@click.option("--wells", default=None, help="Run only these wells, e.g. A01,B03.")
@click.option("--skip-incomplete", is_flag=True,
              help="Run the wells that have every image; record the others 'skipped' (else a plate with gaps "
                   "is refused).")
@click.option("--accept-changed-pipeline", is_flag=True,
              help="With --resume: accept a pipeline that differs from the earlier run's; the plate then holds "
                   "wells of both, and each well's record names its pipeline.")
@click.option("--max-failures", type=int, default=5, show_default=True,
              help="Stop starting wells when the first N to end all failed in the same step (0: never stop).")
@click.option("--table-format", type=click.Choice(["csv", "parquet"]), default="csv", show_default=True,
              help="The format of the measurement table beside the store.")
@_scale_out_options
def run(graph: str, plate: str, output: str, workers: int | None, threads_per_worker: int,
        scheduler: str | None, device: str, summary: str | None, overwrite: bool, resume: bool,
        well_timeout: float | None, memory_limit: str, worker_death_retries: int, stall_timeout: float,
        no_fsync: bool, cluster: str, wells: str | None, skip_incomplete: bool, accept_changed_pipeline: bool,
        max_failures: int, table_format: str, **rmm_options: object) -> None:
    """Run GRAPH (a pipeline file, or a bundled graph's name) on the PLATE folder."""
    if scheduler is None and cluster == "local":
        _prestart_workers()
    with _scaled_out(cluster, rmm_options) as scale_out:
        # Only the RMM options given: flags left off are no options at all.
        given = {name: value for name, value in rmm_options.items() if value not in (None, False)}
        result = _run(graph, plate, output, device=device, summary=summary, wells=wells, n_workers=workers,
                      threads_per_worker=threads_per_worker, scheduler=scheduler, overwrite=overwrite,
                      resume=resume, well_timeout=well_timeout, memory_limit=memory_limit,
                      worker_death_retries=worker_death_retries, stall_timeout=stall_timeout,
                      fsync=not no_fsync, cluster=cluster, cluster_options={**given, **scale_out},
                      skip_incomplete=skip_incomplete, accept_changed_pipeline=accept_changed_pipeline,
                      max_failures=max_failures or None, table_format=table_format)
    sys.exit(0 if result.ok else 1)


@main.command()
@click.argument("directory", type=click.Path())
@click.option("--format", "plate_format", type=_SyntheticFormats(), default="imagexpress",
              show_default=True, help="The vendor layout to write, with its metadata files.")
@click.option("--wells", type=int, default=4, show_default=True)
@click.option("--sites", type=int, default=2, show_default=True)
@click.option("--channels", type=int, default=2, show_default=True)
@click.option("--z", "z", type=int, default=3, show_default=True)
@click.option("--timepoints", type=int, default=1, show_default=True)
@click.option("--size", type=int, default=256, show_default=True, help="Image edge in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mixed-depth", is_flag=True,
              help="ImageXpress: channels of different depth, as MetaXpress exports mix them (the last channel "
                   "in ZStep_1 only, the one before it only as a projection, the others z-stacks with "
                   "projections and _thumb previews). Needs --channels 3 or more and --z 2 or more.")
def synth(directory: str, plate_format: str, wells: int, sites: int, channels: int, z: int, timepoints: int,
          size: int, seed: int, mixed_depth: bool) -> None:
    """Write a synthetic plate (images, vendor metadata files, ground_truth.csv) to DIRECTORY."""
    start = time.perf_counter()
    try:
        from hcs_dask.formats import write_synthetic_plate

        path = write_synthetic_plate(directory, wells=wells, sites=sites, channels=channels, z=z,
                                     timepoints=timepoints, size=size, seed=seed, format=plate_format,
                                     mixed_depth=mixed_depth)
    except (FileExistsError, ValueError) as error:
        _fail_input(error)
    n = sum(1 for p in path.rglob("*") if p.suffix.lower() in (".tif", ".tiff"))
    click.echo(f"wrote {n} {plate_format} images ({wells} wells) to {path} in {time.perf_counter() - start:.1f} s")


@main.command()
@click.option("--directory", type=click.Path(), default="hcs-demo", show_default=True,
              help="Where the synthetic plate and its results go.")
@click.option("--wells", type=int, default=8, show_default=True)
@click.option("--workers", type=int, default=None, help="Workers of the embedded cluster [one per core].")
def demo(directory: str, wells: int, workers: int | None) -> None:
    """Synthesise a small plate, run the nuclei-count graph on an embedded LocalCluster, and save its plate map."""
    _prestart_workers()
    root = Path(directory)
    plate_dir = root / "plate"
    if not plate_dir.exists():
        click.echo(f"synthesising a {wells}-well plate in {plate_dir} ...")
        from hcs_dask.formats import write_synthetic_plate

        write_synthetic_plate(plate_dir, wells=wells, sites=2, channels=2, z=3, size=256, seed=0)
    result = _run("nuclei_count", str(plate_dir), str(root / "nuclei_count.ome.zarr"), device="cpu",
                  summary=str(root / "summary.json"), n_workers=workers, overwrite=True)
    try:
        figure = result.plot_plate("nuclei_count")
    except KeyError:  # no well measured anything: the map of their statuses says why
        figure = result.plot_plate("status")
    figure.savefig(root / "plate_map.png", dpi=100)
    click.echo(f"plate map: {root / 'plate_map.png'}")
    sys.exit(0 if result.ok else 1)


@main.command()
@click.argument("plate", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect(plate: str, as_json: bool) -> None:
    """Print PLATE's format, dimensions, channels, pixel size, and missing wells, sites or images.

    Exit 0 for a plate that can run, 1 when wells lack images their siblings have,
    2 when it cannot be opened (the message names the file and the problem). For an output
    store written by hcs_dask: its wells' status (exit 1 when a well is not ok).
    """
    from hcs_dask.formats import PlateError, PlateWarning, open_plate
    from hcs_dask.store import Manifest

    if (Path(plate) / Manifest.FOLDER / "zarr.json").is_file():
        _inspect_store(plate, as_json)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PlateWarning)
        try:
            opened = open_plate(plate)
        except PlateError as error:
            _fail_input(error)
    for warning in caught:
        if issubclass(warning.category, PlateWarning):
            click.echo(f"warning: {warning.message}", err=True)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    info = opened.describe()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        _print_description(info)
    if info["gaps"]:
        sys.exit(1)


def _inspect_store(output: str, as_json: bool) -> None:
    """The status of the runs recorded in an output store (exit 1 if a well is not ok)."""
    from hcs_dask.results import PlateResult
    from hcs_dask.store import OutputError

    try:
        result = PlateResult.load(output)
    except OutputError as error:
        _fail_input(error)
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.summary().items() if k != "wells"}
                              | {"failures": [r.summary() for r in result.failures()]}, indent=2, default=str))
    else:
        _report(result, None)
    if not result.ok:
        sys.exit(1)


def _print_description(info: dict) -> None:
    click.echo(f"plate {info['name']} ({info['format']}) at {info['root']}")
    click.echo(f"  {info['wells']} wells × {info['sites']} sites × {len(info['channels'])} channels × "
               f"{info['z']} z × {info['timepoints']} timepoints = {info['images']} images")
    pixel = " × ".join(f"{v:g}" for v in info["pixel_size_um"]) + " µm" if info["pixel_size_um"] else "unknown"
    z_step = f", z step {info['z_step_um']:g} µm" if info["z_step_um"] else ""
    click.echo(f"  image {info['shape'][0]}×{info['shape'][1]} {info['dtype'] or '(headers not read)'}, pixel size "
               f"{pixel}{z_step}, plate {info['plate_geometry'][0]}×{info['plate_geometry'][1]}")
    for channel in info["channels"]:
        depth = ("projection only (one image per site)" if channel["projection"]
                 else f"{channel['z']} plane{'s' if channel['z'] != 1 else ''}")
        click.echo(f"  channel {channel['channel']}: {channel['name']}, {depth}")
    if not info["uniform_depth"]:
        click.echo("  channels differ in depth: each channel keeps its own planes (an acquisition, not missing images)")
    if info["field_positions"]:
        click.echo(f"  field positions: known for {info['field_positions']} field(s)")
    for line in info["gaps"] or ["no gaps: every well has every image"]:
        click.echo(f"  {line}")
    for line in info["declared_missing"] + info["notes"]:
        click.echo(f"  {line}")


def entry() -> None:
    """The ``hcs-dask`` console script: :func:`main`, then an exit without the interpreter's teardown.

    Once the command has returned (its cluster closed, its files written and flushed), the
    ``atexit`` functions run and the output streams are flushed as at any exit; then the process
    ends with the command's exit code through :func:`os._exit`, without freeing the modules one
    by one (Dask, zarr and pandas take 0.65 s to tear down on a 2-core machine, after a 96-well
    ``hcs-dask run``). The store's idle flusher threads are ended first. Where any other thread
    but a daemon one is still alive, or the exit status is not a number, the exit is Python's own.
    """
    import atexit
    import os
    import threading

    try:
        main()
    except SystemExit as done:
        code = done.code
    else:  # click ends with SystemExit; a return is a success all the same
        code = 0
    files = sys.modules.get("hcs_dask.store._files")
    if files is not None:  # the store's idle flusher threads, which are not daemon ones
        files.stop_flushers()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others or not (code is None or isinstance(code, int)):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    entry()
