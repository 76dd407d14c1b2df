"""Start-up: ``import hcs_dask`` and ``hcs-dask --help`` import no Dask, zarr, ome-zarr, pandas or
matplotlib; the public names still resolve; the user's MALLOC_TRIM_THRESHOLD_ is read at package
import, before any nanny of the process can write it.

Each check runs in a fresh interpreter, where ``sys.modules`` shows what an import pulled in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import hcs_dask

HEAVY = ("dask", "distributed", "zarr", "ome_zarr", "ome_zarr_models", "pydantic", "pandas", "matplotlib", "scipy", "tifffile", "numpy")


def _fresh(code: str, **environ: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"} | environ
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_hcs_dask_imports_none_of_the_heavy_libraries():
    loaded = _fresh(f"import json, sys; import hcs_dask; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert loaded == []


def test_help_imports_none_of_the_heavy_libraries():
    code = (f"import json, sys\nfrom hcs_dask.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert _fresh(code) == []


@pytest.mark.parametrize("name", hcs_dask.__all__)
def test_every_public_name_resolves(name):
    value = getattr(hcs_dask, name)
    assert getattr(value, "__name__", name) == name
    assert name in dir(hcs_dask)


def test_submodules_and_unknown_names():
    assert hcs_dask.cluster.__name__ == "hcs_dask.cluster"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        hcs_dask.not_a_name  # noqa: B018


@pytest.mark.parametrize("user_value", [None, "131072"], ids=["unset", "user-set"])
def test_malloc_trim_setting_is_read_at_package_import(user_value):
    # A nanny started after `import hcs_dask` writes the variable into os.environ; the
    # reading must still say what the user had, however late hcs_dask.cluster is imported.
    code = ("import json, os\nimport hcs_dask\nos.environ['MALLOC_TRIM_THRESHOLD_'] = '65536'\n"
            "import hcs_dask.cluster\nprint(json.dumps(hcs_dask.cluster._USER_SET_MALLOC_TRIM))")
    environ = {} if user_value is None else {"MALLOC_TRIM_THRESHOLD_": user_value}
    assert _fresh(code, **environ) is (user_value is not None)


@pytest.mark.parametrize(("argv", "code", "stream", "text"), [
    (["--version"], 0, "stdout", "version"),
    (["no-such-command"], 2, "stderr", "No such command"),
    (["run", "max_projection", "/no/such/plate", "-o", "/no/such/out.ome.zarr"], 2, "stderr", "error: /no/such/plate does not exist"),
])
def test_the_console_script_exits_with_the_commands_code_after_atexit_and_flushed_output(argv, code, stream, text):
    """``hcs-dask`` (``cli.entry``) skips only the interpreter's teardown: the exit code is click's, the
    ``atexit`` functions run, and what was written into a pipe arrives whole."""
    program = ("import atexit, sys\natexit.register(lambda: print('atexit ran', file=sys.stderr))\n"
               f"sys.argv = ['hcs-dask', *{argv!r}]\nfrom hcs_dask.cli import entry\nentry()\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert text in getattr(done, stream), (done.stdout, done.stderr)
    assert done.stderr.rstrip().endswith("atexit ran"), done.stderr


def test_the_console_script_leaves_the_exit_to_python_while_another_thread_runs():
    program = ("import sys, threading, time\n"
               "threading.Thread(target=lambda: (time.sleep(1), print('thread finished')), daemon=False).start()\n"
               "sys.argv = ['hcs-dask', '--version']\nfrom hcs_dask.cli import entry\nentry()\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "thread finished"


def _fresh_run(plate: Path, output: Path, *, inside: str = "", report: str) -> dict:
    """A ``max_projection`` run of ``plate`` on a 1-worker embedded cluster in a fresh interpreter:
    ``inside`` runs while the cluster is up, ``report`` (an expression) is printed as JSON after."""
    return _fresh(
        "import json, sys, zarr\n"
        "from hcs_dask import open_plate, run_plate\n"
        "from hcs_dask.cluster import connect\n"
        "from hcs_dask.pipeline import load_pipeline\n"
        "with connect(n_workers=1) as client:\n"
        f"    result = run_plate(open_plate({str(plate)!r}), load_pipeline('max_projection'), {str(output)!r},\n"
        "                       client=client)\n"
        f"{inside}"
        f"print(json.dumps({report}))\n"
    )


def test_a_run_builds_its_ngff_metadata_without_ome_zarr(synthetic_plate, tmp_path):
    # The store's documents come from ome-zarr-models (hcs_dask.store._ngff): ome-zarr would
    # import Dask's arrays and scikit-image, about 1 s, in the client and in every worker's server.
    loaded = "sorted(m for m in ('ome_zarr', 'ome_zarr_models') if m in sys.modules)"
    report = _fresh_run(synthetic_plate, tmp_path / "out.ome.zarr",
                        inside=f"    workers = list(client.run(lambda: {loaded}).values())\n",
                        report=f"{{'ok': result.counts().get('ok'), 'client': {loaded}, 'workers': workers}}")
    assert report == {"ok": 4, "client": ["ome_zarr_models"], "workers": [["ome_zarr_models"]]}


def test_a_run_whose_wells_measure_nothing_never_imports_pandas(synthetic_plate, tmp_path):
    # Its only table, the wells' status, is written without pandas: 0.6-0.8 s of the client's CPU,
    # which on 2 cores the workers would have lost.
    status = tmp_path / "out.ome.zarr" / "tables" / "well_status" / "table"
    report = _fresh_run(synthetic_plate, tmp_path / "out.ome.zarr",
                        report=f"{{'tables': result.tables, 'pandas': 'pandas' in sys.modules, "
                               f"'statuses': zarr.open_group({str(status)!r}, mode='r').attrs['status']}}")
    assert report == {"tables": ["well_status"], "pandas": False, "statuses": ["ok"] * 4}


def test_the_console_script_skips_the_teardown_after_a_run_that_flushed_files(synthetic_plate, tmp_path):
    # The store's flushes leave idle, non-daemon pool threads behind; they must not force
    # Python's own exit (0.65 s of module teardown after a 96-well run on 2 cores).
    # threading._register_atexit callbacks run only in that teardown, not in atexit's. The
    # workers, forked from a fork of this process, have the callback too and end through it.
    out = tmp_path / "out.ome.zarr"
    program = ("import os, sys, threading\n"
               "client = os.getpid()\n"
               "threading._register_atexit(lambda: os.getpid() == client and print('python teardown', file=sys.stderr))\n"
               f"sys.argv = ['hcs-dask', 'run', 'max_projection', {str(synthetic_plate)!r}, '-o', {str(out)!r},\n"
               "            '--workers', '1']\n"
               "from hcs_dask.cli import entry\nentry()\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "4 ok" in done.stdout, done.stdout
    assert "python teardown" not in done.stderr


def test_the_store_flushers_end_and_start_again(tmp_path):
    from hcs_dask.store._files import fsync_paths, stop_flushers

    def flushers() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("hcs-dask-fsync")]

    (tmp_path / "a").write_bytes(b"a")
    fsync_paths([tmp_path / "a", tmp_path])
    assert flushers()
    stop_flushers()
    assert flushers() == []
    fsync_paths([tmp_path / "a", tmp_path])  # a later flush starts new threads
    assert flushers()
