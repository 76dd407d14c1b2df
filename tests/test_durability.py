"""Durable commits: the renames that make a well ``ok`` reach the disk, a layout is all or nothing,
and the manifest is a zarr hierarchy that readers open without a warning."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import hcs_dask.store._files
import hcs_dask.store.layout
from hcs_dask import load_pipeline, open_plate, run_plate
from hcs_dask.plate import ImageKey, Plate, Well, row_name
from hcs_dask.store import FieldLayout, FieldWriter, Manifest, commit_well, create_plate_layout, reset_well

LAYOUT = FieldLayout(axes=("c", "z", "y", "x"), shape=(1, 2, 96, 80), dtype="uint16",
                     channel_names=("DAPI",), pixel_size_um=(0.65, 0.65), z_step_um=2.0, levels=2)
RUN_INFO = {"plate": "P1", "plate_fingerprint": "p", "pipeline": "test", "pipeline_fingerprint": "f"}


def plate_of(rows: int, columns: int) -> Plate:
    """A plate index of ``rows × columns`` wells, one site each (no files behind it)."""
    names = [f"{row_name(r)}{c:02d}" for r in range(rows) for c in range(1, columns + 1)]
    wells = tuple(Well(name, ((ImageKey(name, 1, 1, 1, 1), f"{name}.tif"),)) for name in names)
    return Plate(name="P1", root="/nowhere", format="imagexpress", wells=wells, shape=(96, 80), dtype="uint16",
                 plate_rows=rows, plate_columns=columns)


def _identity(path: Path) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


@pytest.fixture
def disk_events(monkeypatch):
    """The real ``os.fsync``/``os.replace``/``os.rename`` calls, in order: ``(kind, what)``."""
    events: list[tuple[str, object]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        status = os.fstat(fd)
        kind = "fsync folder" if stat.S_ISDIR(status.st_mode) else "fsync file"
        real_fsync(fd)
        events.append((kind, (status.st_dev, status.st_ino)))

    def replace(src, dst, **kwargs):
        real_replace(src, dst, **kwargs)
        events.append(("rename", str(dst)))

    def rename(src, dst, **kwargs):
        real_rename(src, dst, **kwargs)
        events.append(("rename", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events


def _after_rename(events, target: Path) -> list[tuple[str, object]]:
    """The events after the last rename onto ``target``, up to the next rename."""
    index = max(i for i, event in enumerate(events) if event == ("rename", str(target)))
    following = []
    for event in events[index + 1:]:
        if event[0] == "rename":
            break
        following.append(event)
    return following


def test_the_renames_that_make_a_well_ok_are_followed_by_a_folder_fsync(tmp_path, disk_events):
    output = create_plate_layout(tmp_path / "p.ome.zarr", plate_of(2, 2), run_info=RUN_INFO)
    well = output / "A" / "1"
    manifest = Manifest(output)
    manifest.write_well({"well": "A01", "status": "running"})
    FieldWriter(output, "A/1/0", LAYOUT).write((slice(None), slice(None)), np.ones(LAYOUT.shape, "uint16"))
    del disk_events[:]
    commit_well(output, "A", 1, [0])
    manifest.write_well({"well": "A01", "status": "ok"})

    commit_index = disk_events.index(("rename", str(well / "zarr.json")))
    flushed_before = {what for kind, what in disk_events[:commit_index] if kind.startswith("fsync")}
    below = [p for p in (well / "0").rglob("*")] + [well / "0"]
    assert {_identity(p) for p in below} <= flushed_before  # every field file and folder, before the listing
    assert _identity(well / "zarr.json") in flushed_before  # the new listing itself (a rename keeps the inode)
    assert ("fsync folder", _identity(well)) in _after_rename(disk_events, well / "zarr.json")
    record = output / "hcs_dask" / "wells" / "A01"
    record_index = max(i for i, e in enumerate(disk_events) if e == ("rename", str(record / "zarr.json")))
    assert ("fsync file", _identity(record / "zarr.json")) in disk_events[commit_index:record_index]
    after_record = _after_rename(disk_events, record / "zarr.json")
    assert ("fsync folder", _identity(record)) in after_record
    assert ("fsync folder", _identity(record.parent)) in after_record  # wells/ lists the record's folder

    del disk_events[:]
    manifest.write_well({"well": "A02", "status": "running"})  # not an outcome: not worth a flush
    assert not [event for event in disk_events if event[0].startswith("fsync")]
    reset_well(output, "A", 1)  # the unlisting reaches the disk before the fields go
    assert ("fsync folder", _identity(well)) in _after_rename(disk_events, well / "zarr.json")


def test_a_batch_of_flushes_ends_every_share_before_it_raises_the_first_error(tmp_path, disk_events):
    paths = [tmp_path / f"f{i}" for i in range(20)]
    for path in paths:
        path.write_bytes(b"x")
    items = [tmp_path / "gone", *paths, tmp_path / "gone too"]
    with pytest.raises(FileNotFoundError, match=r"gone'$"):  # the first item's error, not the last one's
        hcs_dask.store._files.fsync_paths(items)
    # The calling thread's share stopped at its failing first item; the others flushed all
    # theirs (one of them failing last), and every one had ended when the error was raised.
    shares = hcs_dask.store._files._FLUSHERS
    stopped = items[0::shares]
    assert {what for kind, what in disk_events} == {_identity(p) for p in paths if p not in stopped}


def test_the_layout_is_flushed_before_its_rename_and_its_parent_after(tmp_path, disk_events):
    output = create_plate_layout(tmp_path / "p.ome.zarr", plate_of(2, 3), run_info=RUN_INFO)

    rename = disk_events.index(("rename", str(output)))
    flushed_before = {what for kind, what in disk_events[:rename] if kind.startswith("fsync")}
    written = [output, *output.rglob("*")]
    # A folder and its zarr.json each: the plate, 2 rows, 6 wells, the manifest and its wells/.
    assert len(written) == 2 * (1 + 2 + 6 + 2)
    assert {_identity(p) for p in written} <= flushed_before  # identities survive the rename
    assert ("fsync folder", _identity(tmp_path)) in _after_rename(disk_events, output)


CHILD = r"""
import os, sys, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import hcs_dask.store._files as files
from hcs_dask.store import create_plate_layout
from test_durability import RUN_INFO, plate_of

output, hook, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
lock, calls = threading.Lock(), {"write": 0, "rename": 0}

def hang_at(kind, n):
    with lock:
        calls[kind] += 1
        if calls[kind] != n:
            return calls[kind] > n
        marker.touch()
    return True

if hook == "mid-writes":
    real_write = files.write_file
    def write_file(*args, **kwargs):
        if hang_at("write", 800):
            time.sleep(600)
        real_write(*args, **kwargs)
    files.write_file = write_file
else:
    real_rename, nth = os.rename, {"before the first rename": 1, "between the renames": 2}[hook]
    def rename(*args, **kwargs):
        if hang_at("rename", nth):
            time.sleep(600)
        real_rename(*args, **kwargs)
    os.rename = rename
create_plate_layout(output, plate_of(32, 48), overwrite=True, run_info=RUN_INFO)
"""


def _kill_mid_layout(output: Path, hook: str, tmp_path: Path) -> int:
    """Run a 1536-well layout in a child, SIGKILLed where ``hook`` says; returns its pid."""
    marker = tmp_path / "hook-reached"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(output), hook, str(marker), str(Path(__file__).parent)])
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, f"the layout child exited ({child.returncode}) before {hook}"
            assert time.monotonic() < deadline, f"the layout child never reached {hook}"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return child.pid


def _old_store(output: Path) -> np.ndarray:
    """A 4-well store with one committed field in A01 and its ``ok`` record; returns the field."""
    create_plate_layout(output, plate_of(2, 2), run_info=RUN_INFO)
    data = np.arange(np.prod(LAYOUT.shape), dtype="uint16").reshape(LAYOUT.shape)
    FieldWriter(output, "A/1/0", LAYOUT).write((slice(None), slice(None)), data)
    commit_well(output, "A", 1, [0])
    Manifest(output).write_well({"well": "A01", "status": "ok"})
    return data


def _assert_is_old_store(path: Path, data: np.ndarray) -> None:
    import ome_zarr_models

    assert type(ome_zarr_models.open_ome_zarr(path)).__name__ == "HCS"
    _assert_complete(path, plate_of(2, 2))
    np.testing.assert_array_equal(zarr.open_array(path / "A" / "1" / "0" / "0", mode="r")[:], data)
    assert Manifest(path).read_well("A01")["status"] == "ok"


def _assert_complete(path: Path, plate: Plate) -> None:
    """Every well the plate metadata lists is there, and the manifest too."""
    listed = json.loads((path / "zarr.json").read_bytes())["attributes"]["ome"]["plate"]["wells"]
    assert [w["path"] for w in listed] == [f"{w.row}/{w.column}" for w in plate.wells]
    assert all((path / w["path"] / "zarr.json").is_file() for w in listed)
    assert Manifest(path).read_run()["pipeline_fingerprint"] == RUN_INFO["pipeline_fingerprint"]


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["mid-writes", "before the first rename"])
def test_a_layout_killed_midway_leaves_no_store(tmp_path, hook):
    output = tmp_path / "new.ome.zarr"
    pid = _kill_mid_layout(output, hook, tmp_path)

    assert not output.exists()  # so nothing can validate and lie about its wells
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [f".new.ome.zarr.layout-{pid}"]
    create_plate_layout(output, plate_of(32, 48), overwrite=True, run_info=RUN_INFO)
    _assert_complete(output, plate_of(32, 48))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the dead child's folder is gone


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["mid-writes", "before the first rename", "between the renames"])
def test_overwrite_keeps_the_old_store_until_the_new_layout_is_complete(tmp_path, hook):
    output = tmp_path / "old.ome.zarr"
    data = _old_store(output)
    pid = _kill_mid_layout(output, hook, tmp_path)

    if hook == "between the renames":
        # The new layout was complete and flushed; the old store waits beside it, whole.
        assert not output.exists()
        _assert_is_old_store(tmp_path / f".old.ome.zarr.replaced-{pid}", data)
    else:
        _assert_is_old_store(output, data)
    create_plate_layout(output, plate_of(32, 48), overwrite=True, run_info=RUN_INFO)
    _assert_complete(output, plate_of(32, 48))
    assert not (output / "A" / "1" / "0").exists()
    assert Manifest(output).read_wells() == {}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_store_replaced_in_the_background_is_gone_once_waited_for(tmp_path, monkeypatch):
    from hcs_dask.store import prepare_plate_layout

    output = tmp_path / "old.ome.zarr"
    _old_store(output)
    release, removing = __import__("threading").Event(), []
    real_rmtree = hcs_dask.store.layout.shutil.rmtree

    def slow_rmtree(path, *args, **kwargs):  # the removal waits, so the new store is seen beside it
        removing.append(Path(path))
        release.wait(30)
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(hcs_dask.store.layout.shutil, "rmtree", slow_rmtree)
    layout = prepare_plate_layout(output, plate_of(32, 48), overwrite=True, run_info=RUN_INFO)
    assert layout.publish(background=True) == output
    _assert_complete(output, plate_of(32, 48))  # the new store is in place while the old one goes
    assert removing == [tmp_path / f".old.ome.zarr.replaced-{os.getpid()}"]
    release.set()
    layout.wait()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_run_that_overwrites_a_store_ends_with_the_old_one_removed(tmp_path):
    from hcs_dask.formats import write_synthetic_plate

    plate = write_synthetic_plate(tmp_path / "plate", wells=2, sites=1, channels=1, z=1, size=32, seed=0)
    output = tmp_path / "out.ome.zarr"
    _old_store(output)
    result = run_plate(open_plate(plate), load_pipeline("nuclei_count"), output, n_workers=1, overwrite=True,
                       progress=False)
    assert result.ok
    assert sorted(Manifest(output).read_wells()) == ["A01", "A02"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_layout_that_fails_midway_leaves_the_old_store_and_no_trace(tmp_path, monkeypatch):
    output = tmp_path / "old.ome.zarr"
    data = _old_store(output)
    real_write, calls = hcs_dask.store._files.write_file, []

    def write_file(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 20:
            raise OSError(28, "No space left on device", str(path))
        real_write(path, *args, **kwargs)

    monkeypatch.setattr(hcs_dask.store._files, "write_file", write_file)
    with pytest.raises(OSError, match="No space left"):
        create_plate_layout(output, plate_of(8, 12), overwrite=True, run_info=RUN_INFO)
    _assert_is_old_store(output, data)
    assert [p.name for p in tmp_path.iterdir()] == ["old.ome.zarr"]


def test_a_run_s_store_opens_in_zarr_and_ome_zarr_readers_without_a_warning(synthetic_plate, tmp_path, client):
    # Warnings are errors in this suite: any "not recognized as a component" fails here.
    import ome_zarr_models
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    plate = open_plate(synthetic_plate)
    output = tmp_path / "out.ome.zarr"
    result = run_plate(plate, load_pipeline("max_projection"), output, client=client)
    assert result.counts() == {"ok": 4}

    root = zarr.open_group(output, mode="r")
    assert sorted(name for name, _ in root.members()) == sorted({w.row for w in plate.wells} | {"hcs_dask", "tables"})
    deep = dict(root.members(max_depth=None))
    assert {name for name in deep if name.startswith("hcs_dask/wells/")} == {
        f"hcs_dask/wells/{w.name}" for w in plate.wells}
    first = plate.wells[0].name
    assert deep[f"hcs_dask/wells/{first}"].attrs["hcs_dask"]["status"] == "ok"
    assert deep["hcs_dask"].attrs["hcs_dask"]["pipeline"] == "max_projection"
    assert type(ome_zarr_models.open_ome_zarr(output)).__name__ == "HCS"
    nodes = list(Reader(parse_url(str(output)))())
    assert nodes and nodes[0].data
    assert {w: r["status"] for w, r in Manifest(output).read_wells().items()} == {w.name: "ok" for w in plate.wells}
