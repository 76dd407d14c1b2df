"""hcs_dask.hpc without a batch system: options, walltimes, the job script, signals, and refusals that write nothing.

The jobs themselves run in tests/test_slurm.py, on a real SLURM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import dask
import pytest
from click.testing import CliRunner

from hcs_dask.cli import main
from hcs_dask.cluster import ClusterError, ClusterOptionError, check_cluster
from hcs_dask.hpc import (
    MALLOC_TRIM_PROLOGUE,
    _job_options,
    check_hpc_options,
    parse_cluster_options,
    sigterm_raises,
    walltime_seconds,
    worker_lifetime,
)

pytest.importorskip("dask_jobqueue")


def test_cluster_options_are_yaml_but_times_stay_strings():
    options = parse_cluster_options(["walltime=1-00:00:00", "cores=8", "memory=32GB", "nanny=false",
                                     "job-extra-directives=[--gres=gpu:1, --exclusive]", "queue=",
                                     "scheduler_options={host: 127.0.0.1}", "start_timeout=90.5"])
    assert options == {"walltime": "1-00:00:00", "cores": 8, "memory": "32GB", "nanny": False,
                       "job_extra_directives": ["--gres=gpu:1", "--exclusive"], "queue": "",
                       "scheduler_options": {"host": "127.0.0.1"}, "start_timeout": 90.5}
    assert parse_cluster_options(["walltime=01:00:00"]) == {"walltime": "01:00:00"}  # not YAML's 3600
    for bad, words in (["cores"], "expected KEY=VALUE"), (["=3"], "expected KEY=VALUE"), \
            (["cores=1", "cores=2"], "given twice"), (["a=[1"], "not YAML"):
        with pytest.raises(ClusterOptionError, match=words):
            parse_cluster_options(bad)


@pytest.mark.parametrize(("kind", "text", "seconds"), [
    ("slurm", "30", 1800), ("slurm", "30:15", 1815), ("slurm", "02:00:00", 7200), ("slurm", "1-12", 129600),
    ("slurm", "1-00:30", 88200), ("slurm", "0-01:00", 3600), ("slurm", "2-00:00:10", 172810),
    ("pbs", "00:30:00", 1800), ("pbs", 3600, 3600),
    ("sge", "12:00:00", 43200), ("lsf", "00:30", 1800), ("lsf", "90", 5400),
])
def test_walltimes_in_each_notation(kind, text, seconds):
    assert walltime_seconds(kind, text) == seconds


@pytest.mark.parametrize(("kind", "text"), [("slurm", "1h"), ("pbs", "30:00"), ("lsf", "01:00:00"),
                                            ("slurm", "x-01:00"), ("sge", "1:2:3:4")])
def test_walltimes_that_are_no_walltimes(kind, text):
    with pytest.raises(ClusterOptionError, match=f"walltime {text!r} is not a"):
        walltime_seconds(kind, text)


def test_lifetime_leaves_a_margin_before_the_walltime():
    assert worker_lifetime(None) is None
    for walltime in (60.0, 120.0, 1800.0, 7200.0, 86400.0):
        lifetime, stagger = worker_lifetime(walltime)
        assert 0 < lifetime - stagger and lifetime + stagger < walltime
    assert worker_lifetime(86400.0) == (85800.0, 150.0)  # the margin stops at ten minutes


def test_job_options_add_the_preload_the_lifetime_and_the_worker_environment():
    options = _job_options("slurm", {"cores": 1, "memory": "1GB", "walltime": "01:00:00"})
    assert options["worker_extra_args"] == ["--preload", "hcs_dask.plugin", "--lifetime", "3240s",
                                            "--lifetime-stagger", "90s"]
    assert options["job_script_prologue"] == [MALLOC_TRIM_PROLOGUE]
    assert "security" not in options
    # What the user already gave is kept, and nothing is added twice.
    mine = _job_options("slurm", {"worker_extra_args": ["--preload=hcs_dask.plugin", "--lifetime", "50m"],
                                  "job_script_prologue": ["export MALLOC_TRIM_THRESHOLD_=0"]})
    assert mine["worker_extra_args"] == ["--preload=hcs_dask.plugin", "--lifetime", "50m"]
    assert mine["job_script_prologue"] == ["export MALLOC_TRIM_THRESHOLD_=0"]
    with dask.config.set({"jobqueue.pbs.walltime": None, "distributed.comm.tls.ca-file": "ca.pem"}):
        pbs = _job_options("pbs", {})
    assert "--lifetime" not in pbs["worker_extra_args"] and pbs["security"].tls_ca_file == "ca.pem"


def test_the_job_script(tmp_path):
    from dask_jobqueue import SLURMCluster

    options = _job_options("slurm", {"cores": 1, "memory": "1GB", "walltime": "00:30:00",
                                     "scheduler_options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}})
    with SLURMCluster(**options) as cluster:
        script = cluster.job_script()
    assert MALLOC_TRIM_PROLOGUE in script.splitlines()
    assert "--preload hcs_dask.plugin --lifetime 1620s --lifetime-stagger 45s" in script
    assert "#SBATCH -t 00:30:00" in script


def test_refused_options_name_what_to_use_instead():
    cases = [
        ({"jobs": 0}, ClusterOptionError, "--jobs must be a whole number of batch jobs, at least 1"),
        ({"jobs": 2, "n_workers": 4}, ClusterOptionError, "n_workers=4 configure\\(s\\) an embedded cluster"),
        ({"threads_per_worker": 4}, ClusterOptionError, "sized by dask-jobqueue's `cores`, `processes` and `memory`"),
        ({"memory_limit": "4GB"}, ClusterOptionError, "memory_limit='4GB' configure"),
        ({"rmm_pool_size": "1GB"}, ClusterOptionError, "rmm_pool_size='1GB' configure"),
        ({"queue_name": "gpu"}, ClusterOptionError, "SLURMCluster takes no such option; it takes .*walltime"),
        ({"host": "login-node"}, ClusterOptionError, "pass it in scheduler_options"),
        ({"walltime": "2h"}, ClusterOptionError, "walltime '2h' is not a SLURM time"),
        ({"start_timeout": -1}, ClusterOptionError, "start_timeout must be a positive number"),
    ]
    for options, error, words in cases:
        with pytest.raises(error, match=words):
            check_hpc_options("slurm", **options)
    with pytest.raises(ClusterOptionError, match="unknown cluster kind 'torque'; use 'local', 'cuda' or a batch "
                                                 "system \\(slurm, pbs, lsf, sge\\)"):
        check_cluster("torque")


def test_a_batch_system_whose_submit_command_is_absent(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, qsub or bsub here
    for kind, command in (("slurm", "sbatch"), ("pbs", "qsub"), ("lsf", "bsub"), ("sge", "qsub")):
        with pytest.raises(ClusterError, match=f"`{command}.*` is not on PATH; run hcs-dask where"):
            check_cluster(kind, jobs=1)


@pytest.mark.parametrize(("args", "words"), [
    (["--jobs", "2"], "--jobs and --cluster-option apply to --cluster slurm|pbs|lsf|sge, not --cluster local"),
    (["--cluster", "slurm", "--cluster-option", "walltime"], "--cluster-option 'walltime': expected KEY=VALUE"),
    (["--cluster", "slurm", "--cluster-option", "partition=gpu"], "SLURMCluster takes no such option"),
    (["--cluster", "pbs", "--jobs", "0"], "--jobs must be a whole number"),
    (["--cluster", "sge", "--workers", "3"], "n_workers=3 configure"),
])
def test_bad_batch_options_exit_2_and_write_nothing(synthetic_plate, tmp_path, args, words):
    output = tmp_path / "out.ome.zarr"
    result = CliRunner().invoke(main, ["run", "nuclei_count", str(synthetic_plate), "-o", str(output), *args])
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert not output.exists()


def test_sigterm_becomes_system_exit_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as raised:
        with sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert raised.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_loading_dask_jobqueue_keeps_ctrl_c_a_keyboard_interrupt():
    # In a fresh interpreter: dask-jobqueue 0.9.0 installs, at import, a SIGINT handler that exits 0.
    code = ("import signal; before = signal.getsignal(signal.SIGINT); "
            "from hcs_dask.hpc import _cluster_class; _cluster_class('slurm'); "
            "assert signal.getsignal(signal.SIGINT) is before, signal.getsignal(signal.SIGINT)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
