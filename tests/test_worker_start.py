"""How embedded workers start (``hcs_dask._forkserver``): forked from one server process that has
their modules imported, with this process's environment as it is when each cluster starts.

Real LocalClusters (processes); the parent of a worker process says how it was started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dask
import psutil
import pytest

from hcs_dask import _forkserver
from hcs_dask.cluster import connect


def _parents(client) -> set[int]:
    return set(client.run(os.getppid).values())


def _is_fork_server(pid: int) -> bool:
    return "multiprocessing.forkserver" in " ".join(psutil.Process(pid).cmdline())


def test_workers_fork_from_a_server_that_has_their_modules():
    with connect(n_workers=2, threads_per_worker=1) as client:
        [parent] = _parents(client)  # both workers: one server
        loaded = client.run(lambda: [m for m in _forkserver.WORKER_MODULES if m in sys.modules])
    assert parent != os.getpid() and _is_fork_server(parent)
    assert psutil.Process(parent).ppid() == os.getpid()  # the server is this process's child
    assert all(modules == list(_forkserver.WORKER_MODULES) for modules in loaded.values())


def _profile_intervals_ms(client) -> set[float]:
    return set(client.run(lambda dask_worker: dask_worker.periodic_callbacks["profile"].callback_time).values())


def test_embedded_workers_profile_every_100_ms_unless_the_user_chose_an_interval():
    # distributed's 10 ms sampling holds the GIL on the worker's event loop while a well runs.
    with connect(n_workers=1, threads_per_worker=1) as client:
        assert _profile_intervals_ms(client) == {100}
    with dask.config.set({"distributed.worker.profile.interval": "20ms"}), \
            connect(n_workers=1, threads_per_worker=1) as client:
        assert _profile_intervals_ms(client) == {20}


def _tick_intervals_ms(client) -> set[float]:
    def tick(dask_worker=None, dask_scheduler=None):
        return (dask_worker or dask_scheduler).periodic_callbacks["tick"].callback_time

    # The workers, their nannies (``dask_worker`` is the nanny there) and the scheduler.
    return {*client.run(tick).values(), *client.run(tick, nanny=True).values(), client.run_on_scheduler(tick)}


def test_embedded_servers_tick_every_200_ms_unless_the_user_chose_an_interval():
    # distributed's 20 ms tick was most of an idle cluster's CPU; it only measures event loop delays.
    with connect(n_workers=2, threads_per_worker=1) as client:
        assert _tick_intervals_ms(client) == {200}
    with dask.config.set({"distributed.admin.tick.interval": "50ms"}), \
            connect(n_workers=1, threads_per_worker=1) as client:
        assert _tick_intervals_ms(client) == {50}


def test_a_users_own_cluster_beside_an_embedded_one_starts_as_dask_starts_it(monkeypatch):
    # The start method is process-wide Dask config: an embedded cluster that is running must not
    # make the user's LocalCluster fork from hcs_dask's server (whose environment is not theirs).
    from distributed import Client, LocalCluster

    with connect(n_workers=1, threads_per_worker=1) as embedded:
        [server] = _parents(embedded)
        monkeypatch.setenv("HCS_DASK_TEST_VARIABLE", "mine")
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                          host="127.0.0.1") as plain, Client(plain) as client:
            assert _parents(client) == {os.getpid()}
            assert _variable(client, "HCS_DASK_TEST_VARIABLE") == {"mine"}
        # a worker restarted by its nanny is spawned too, with the client's environment
        embedded.restart()
        assert _parents(embedded) == {os.getpid()} != {server}
        assert _variable(embedded, "HCS_DASK_TEST_VARIABLE") == {"mine"}


def _gc_state() -> tuple[int, int]:
    import gc

    return gc.get_freeze_count(), len(gc.get_objects())


@pytest.mark.parametrize("start", ["forkserver", "spawn"])
def test_embedded_workers_freeze_the_objects_they_start_with(start):
    # Frozen, the modules' objects are out of every later collection's walk: a well's full
    # collection walks what the wells made, not the tens of thousands of objects of the imports.
    with dask.config.set({"hcs-dask.worker-start": start}), connect(n_workers=1, threads_per_worker=1) as client:
        [(frozen, walked)] = client.run(_gc_state).values()
    assert frozen > 20_000 and walked < frozen


def test_spawn_in_the_dask_config_starts_fresh_interpreters():
    with dask.config.set({"hcs-dask.worker-start": "spawn"}), connect(n_workers=1, threads_per_worker=1) as client:
        assert _parents(client) == {os.getpid()}  # the nanny, in this process, spawned it


def test_a_bad_start_method_names_the_setting():
    with dask.config.set({"hcs-dask.worker-start": "fork"}), \
            pytest.raises(ValueError, match="hcs-dask.worker-start is 'fork'.*forkserver, spawn"):
        with connect(n_workers=1, threads_per_worker=1):
            pass


def _variable(client, name: str) -> set:
    return set(client.run(os.getenv, name).values())


def test_workers_see_the_environment_as_it_is_when_their_cluster_starts(monkeypatch, tmp_path):
    # Whether the server is started again or kept (another cluster of this test session may be
    # using it), every cluster's workers see the environment and folder of its start.
    monkeypatch.setenv("HCS_DASK_TEST_VARIABLE", "first")
    with connect(n_workers=1, threads_per_worker=1) as client:
        assert _variable(client, "HCS_DASK_TEST_VARIABLE") == {"first"}
    monkeypatch.setenv("HCS_DASK_TEST_VARIABLE", "second")
    monkeypatch.chdir(tmp_path)
    with connect(n_workers=1, threads_per_worker=1) as client:
        assert _variable(client, "HCS_DASK_TEST_VARIABLE") == {"second"}
        assert set(client.run(os.getcwd).values()) == {str(tmp_path)}
    monkeypatch.delenv("HCS_DASK_TEST_VARIABLE")
    with connect(n_workers=1, threads_per_worker=1) as client:
        assert _variable(client, "HCS_DASK_TEST_VARIABLE") == {None}


def test_an_unused_server_starts_again_when_the_environment_changed():
    # In a fresh interpreter, where no other cluster uses the server.
    code = (
        "import json, os\n"
        "from hcs_dask.cluster import connect\n"
        "def parents():\n"
        "    with connect(n_workers=1, threads_per_worker=1) as client:\n"
        "        return sorted(set(client.run(os.getppid).values()))\n"
        "first = parents()\n"
        "same = parents()\n"
        "os.environ['HCS_DASK_TEST_VARIABLE'] = 'changed'\n"
        "changed = parents()\n"
        "del os.environ['HCS_DASK_TEST_VARIABLE']\n"
        "removed = parents()\n"
        "import psutil\n"
        "print(json.dumps({'first': first, 'same': same, 'changed': changed, 'removed': removed,\n"
        "                  'first_alive': psutil.pid_exists(first[0])}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_TRIM_THRESHOLD_", "HCS_DASK_TEST_VARIABLE")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["same"] == seen["first"]  # nothing changed: the same server
    assert seen["changed"] != seen["first"] and seen["removed"] != seen["changed"]
    assert not seen["first_alive"]  # the old server was stopped, not left behind


def test_a_cluster_beside_a_running_one_hands_its_workers_what_changed(monkeypatch, tmp_path):
    monkeypatch.setenv("HCS_DASK_TEST_REMOVED", "here")
    monkeypatch.delenv("HCS_DASK_TEST_ADDED", raising=False)
    with connect(n_workers=1, threads_per_worker=1) as first:
        [server] = _parents(first)
        monkeypatch.setenv("HCS_DASK_TEST_ADDED", "later")
        monkeypatch.delenv("HCS_DASK_TEST_REMOVED")
        other = tmp_path / "elsewhere"
        other.mkdir()
        monkeypatch.chdir(other)
        with connect(n_workers=1, threads_per_worker=1) as second:  # the server is in use: kept
            assert _parents(second) == {server}
            assert set(second.run(os.getcwd).values()) == {str(other)}
            assert _variable(second, "HCS_DASK_TEST_ADDED") == {"later"}
            assert _variable(second, "HCS_DASK_TEST_REMOVED") == {None}
            assert _variable(second, "HCS_DASK_UNSET_ENVIRON") == {None}
            # a worker its nanny restarts gets the same
            second.restart()
            assert _variable(second, "HCS_DASK_TEST_ADDED") == {"later"}
            assert _variable(second, "HCS_DASK_TEST_REMOVED") == {None}
        assert _variable(first, "HCS_DASK_TEST_REMOVED") == {"here"}
        assert _variable(first, "HCS_DASK_TEST_ADDED") == {None}


def test_workers_have_the_nannys_start_environment():
    with connect(n_workers=1, threads_per_worker=1) as client:
        values = client.run(lambda: {name: os.environ.get(name) for name in
                                     ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    [environ] = values.values()
    expected = dask.config.get("distributed.nanny.pre-spawn-environ")
    assert environ == {name: os.environ.get(name, str(expected[name])) for name in environ}


def _fresh_interpreter(program: str, *, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # Buffered output, as a command writing into a pipe has it (where PYTHONUNBUFFERED is unset).
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_TRIM_THRESHOLD_", "PYTHONUNBUFFERED")}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env={**env, **(environ or {})}, timeout=180)
    assert done.returncode == 0, done.stderr
    return done


#: Run in a fresh interpreter after its own set-up lines: starts the server as the command line
#: does, then an embedded cluster, and prints what the server and the worker were.
_COMMAND_LINES_START = (
    "import json, multiprocessing.forkserver, os, sys, psutil\n"
    "from hcs_dask import _forkserver\n"
    "_forkserver.prestart()\n"
    "server = multiprocessing.forkserver._forkserver._forkserver_pid\n"
    "fork = psutil.Process(server).cmdline() == psutil.Process().cmdline()\n"
    "{between}"
    "from hcs_dask.cluster import connect\n"
    "with connect(n_workers=1, threads_per_worker=1) as client:\n"
    "    parents = sorted(set(client.run(os.getppid).values()))\n"
    "    [seen] = client.run(lambda: ([m for m in _forkserver.WORKER_MODULES if m in sys.modules],\n"
    "                                 {{n: os.environ.get(n) for n in ('OPENBLAS_NUM_THREADS', 'HCS_DASK_LATE')}})).values()\n"
    "print(json.dumps({{'server': server, 'fork': fork, 'parents': parents, 'modules': seen[0], 'environ': seen[1],\n"
    "                  'server_alive': psutil.pid_exists(server)}}))\n"
)


def _command_lines_start(before: str = "", between: str = "") -> dict:
    done = _fresh_interpreter(before + _COMMAND_LINES_START.format(between=between))
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_command_lines_server_is_a_fork_of_it_and_the_one_its_cluster_uses():
    # prestart guesses the nanny's environment before distributed is imported, from distributed's
    # config file; a wrong guess would start the server again once distributed is in.
    seen = _command_lines_start()
    assert seen["fork"] is True  # a fork of the command's process: its cmdline
    assert seen["parents"] == [seen["server"]]
    assert seen["modules"] == list(_forkserver.WORKER_MODULES)
    expected = dask.config.get("distributed.nanny.pre-spawn-environ")["OPENBLAS_NUM_THREADS"]
    assert seen["environ"]["OPENBLAS_NUM_THREADS"] == os.environ.get("OPENBLAS_NUM_THREADS", str(expected))


def test_a_process_with_another_thread_starts_a_fresh_server():
    # A fork copies only the thread that forks: where another runs, the server is spawned.
    seen = _command_lines_start(before="import threading, time\n"
                                       "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    assert seen["fork"] is False
    assert seen["parents"] == [seen["server"]]
    assert seen["modules"] == list(_forkserver.WORKER_MODULES)


def test_numpy_imported_before_the_workers_environment_starts_a_fresh_server():
    # NumPy read its BLAS thread count from the environment before prestart wrote the workers' one.
    seen = _command_lines_start(before="import numpy\n")
    assert seen["fork"] is False
    assert seen["parents"] == [seen["server"]]


def test_an_environment_changed_after_the_command_lines_start_replaces_its_forked_server():
    seen = _command_lines_start(between="os.environ['HCS_DASK_LATE'] = 'set'\n")
    assert seen["fork"] is True
    assert seen["parents"] != [seen["server"]] and not seen["server_alive"]  # stopped, a fresh one started
    assert seen["environ"]["HCS_DASK_LATE"] == "set"


def test_the_command_lines_server_ends_at_once_and_writes_nothing_twice(tmp_path):
    # Text the command had buffered when it forked must not come out again from the server or
    # a worker; the server must not run the interpreter's teardown (it would hold the command's
    # output pipes open). The probe's finalizer runs only in a teardown of a forked process.
    (tmp_path / "teardown_probe.py").write_text(
        "import os\n"
        "PID = os.getpid()\n"
        "class Probe:\n"
        "    def __del__(self):\n"
        "        if os.getpid() != PID:\n"
        "            os.write(2, b'forked teardown\\n')\n"
        "probe = Probe()\n")
    program = (
        "import sys, teardown_probe\n"
        "sys.stdout.write('written once\\n')\n"  # a pipe: buffered, not yet written
        "from hcs_dask import _forkserver\n"
        "_forkserver.prestart()\n"
        "from hcs_dask.cluster import connect\n"
        "with connect(n_workers=1) as client:\n"
        "    print(*client.run(lambda: 'teardown_probe' in sys.modules).values())\n"
    )
    done = _fresh_interpreter(program, environ={
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.getenv("PYTHONPATH")]))})
    assert done.stdout.split("\n")[:2] == ["written once", "True"]  # the worker is a fork of the command
    assert done.stdout.count("written once") == 1
    assert "forked teardown" not in done.stderr


def test_the_command_line_refuses_a_bad_start_method(tmp_path):
    env = {**os.environ, "DASK_HCS_DASK__WORKER_START": "threads"}
    done = subprocess.run([sys.executable, "-m", "hcs_dask.cli", "demo", "--directory", str(tmp_path / "demo")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "hcs-dask.worker-start is 'threads'" in done.stderr
    assert not (tmp_path / "demo").exists()


def test_the_fork_server_ends_without_the_interpreters_teardown(tmp_path):
    # The server ends when its client has gone; a teardown of its modules (0.5-0.6 s on 2 cores)
    # would hold the client's stdout and stderr open that long. A module preloaded into the server
    # keeps an object whose finalizer runs only in that teardown, when the modules are freed.
    (tmp_path / "teardown_probe.py").write_text(
        "import os\n"
        "class Probe:\n"
        "    def __del__(self):\n"
        "        os.write(2, b'server teardown\\n')\n"
        "probe = Probe()\n")
    program = (
        "from hcs_dask import _forkserver\n"
        "_forkserver.WORKER_MODULES = ('teardown_probe', *_forkserver.WORKER_MODULES)\n"
        "from hcs_dask.cluster import connect\n"
        "with connect(n_workers=1) as client:\n"
        "    print(*client.run(lambda: __import__('sys').modules.__contains__('teardown_probe')).values())\n"
    )
    # The server imports its preload with its own sys.path (Python 3.11 ignores the client's there).
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.getenv("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300, env=environ)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]
    assert "server teardown" not in done.stderr


def test_only_the_server_itself_exits_early():
    assert not _forkserver._in_the_server()  # this process is no fork server
    assert _forkserver._exit_without_teardown(os.getpid() + 1) is None  # a fork of the server: no exit


def test_a_wells_first_run_imports_nothing_its_worker_did_not_have(tmp_path):
    # WORKER_MODULES is what a worker has before its first task: a well of the built-in
    # normalise-and-project steps (np.percentile reaches numpy.ma through np.unique) must import
    # nothing more, or every worker's first well pays for it.
    import cloudpickle

    from hcs_dask import compile_plate, open_plate, write_synthetic_plate
    from hcs_dask.pipeline import Pipeline, Step
    from hcs_dask.steps import max_projection, percentile_normalize

    plate = write_synthetic_plate(tmp_path / "plate", wells=1, sites=2, channels=2, z=3, size=64, seed=5)
    pipeline = Pipeline([Step(percentile_normalize, stack="z"), Step(max_projection, stack="z")])
    graph = compile_plate(open_plate(plate), pipeline, tmp_path / "out.ome.zarr")
    (tmp_path / "task.pkl").write_bytes(cloudpickle.dumps((graph.plans[0], cloudpickle.dumps(graph.pipeline))))
    done = _fresh_interpreter(
        "import importlib, json, pickle, sys\n"
        "from hcs_dask import _forkserver\n"
        "for name in _forkserver.WORKER_MODULES:\n"
        "    importlib.import_module(name)\n"
        "before = set(sys.modules)\n"
        f"plan, blob = pickle.loads(open({str(tmp_path / 'task.pkl')!r}, 'rb').read())\n"
        "from hcs_dask.guard import run_well\n"
        "result = run_well(plan, blob)\n"
        "print(json.dumps({'status': result.status, 'error': result.error,\n"
        "                  'imported': sorted(set(sys.modules) - before)}))\n")
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["status"] == "ok", seen["error"]
    assert seen["imported"] == []


def test_a_pipeline_files_own_forkserver_process_in_the_command_line_shares_its_server(tmp_path):
    # The command line's fork server is multiprocessing's own: a pipeline file that starts a
    # forkserver process at import (a library's worker pool, say) gets it from that server, and
    # the run's workers still start, run and end as without it.
    from hcs_dask import write_synthetic_plate

    plate = write_synthetic_plate(tmp_path / "plate", wells=2, sites=1, channels=1, z=2, size=32, seed=7)
    seen = tmp_path / "seen.json"
    (tmp_path / "own_pool.py").write_text(textwrap.dedent(f"""\
        import json, multiprocessing, multiprocessing.forkserver, os, pathlib, psutil
        from hcs_dask.pipeline import load_pipeline

        context = multiprocessing.get_context("forkserver")
        child = context.Process(target=exec, args=(
            "import os, pathlib; pathlib.Path({str(seen) + '.child'!r}).write_text(str(os.getppid()))",))
        child.start()
        child.join(60)
        server = multiprocessing.forkserver._forkserver._forkserver_pid
        pathlib.Path({str(seen)!r}).write_text(json.dumps({{
            "exitcode": child.exitcode, "command": os.getpid(), "server": server,
            "fork": psutil.Process(server).cmdline() == psutil.Process().cmdline()}}))
        pipeline = load_pipeline("max_projection")
        """))
    done = subprocess.run([sys.executable, "-m", "hcs_dask.cli", "run", str(tmp_path / "own_pool.py"), str(plate),
                           "-o", str(tmp_path / "out.ome.zarr"), "--workers", "1", "--summary",
                           str(tmp_path / "summary.json")],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    facts = json.loads(seen.read_text())
    assert facts["exitcode"] == 0 and facts["fork"] is True
    # The child is a fork of the command line's server, started before the pipeline file was read.
    assert int(Path(f"{seen}.child").read_text()) == facts["server"] != facts["command"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counts"] == {"ok": 2}, summary


def test_the_command_line_freezes_the_objects_of_its_imports():
    done = _fresh_interpreter(
        "import gc, json, sys\n"
        "from hcs_dask import cli\n"
        "cli._prestart_workers()\n"
        "print(json.dumps([gc.get_freeze_count(), 'distributed' in sys.modules]))\n")
    frozen, imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported and frozen > 20_000
