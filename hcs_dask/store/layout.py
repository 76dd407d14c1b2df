"""The plate's layout: the output path checked, and the plate, row and well groups written once.

The layout is built in a hidden sibling folder, flushed to disk, and renamed into place, so a
crash mid-layout leaves no plate at all rather than one that lists wells it lacks. With
``overwrite``, the old store is moved aside just before that rename and removed after it.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import threading
from pathlib import Path

from hcs_dask.plate import Plate
from hcs_dask.store._files import fsync_path, fsync_paths, metadata_files, write_files
from hcs_dask.store.commit import well_document
from hcs_dask.store.manifest import Manifest

logger = logging.getLogger(__name__)

__all__ = ["OutputError", "PreparedLayout", "check_output", "create_plate_layout", "measurements_path",
           "prepare_plate_layout"]


class OutputError(ValueError):
    """An output path that cannot be used (exists without overwrite, not a directory, …)."""


def measurements_path(output: str | Path) -> Path:
    """Where the measurement table of a plate store goes: ``X.ome.zarr`` → ``X.measurements.csv``.

    Examples
    --------
    >>> measurements_path("/data/P1.ome.zarr").name
    'P1.measurements.csv'
    """
    output = Path(output)
    stem = output.name.removesuffix(".zarr").removesuffix(".ome")
    return output.with_name(f"{stem}.measurements.csv")


def check_output(output: str | Path, *, overwrite: bool) -> Path:
    """Validate the output path before anything is written; returns it absolute.

    Raises
    ------
    OutputError
        The path exists (without ``overwrite``) or is not a directory, or its parent is missing.
    """
    output = Path(output).absolute()
    if output.exists() and not overwrite:
        raise OutputError(f"{output}: output already exists; pass --overwrite (overwrite=True) to replace it")
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a directory")
    if not output.parent.exists():
        raise OutputError(f"{output.parent}: parent folder of the output does not exist")
    return output


#: Hidden siblings of an output ``X``: ``.X.layout-<pid>`` (a layout being built) and
#: ``.X.replaced-<pid>`` (the store it replaces, until the new one is in place).
_SIBLING_KINDS = ("layout", "replaced")


def _sibling(output: Path, kind: str, pid: int) -> Path:
    return output.with_name(f".{output.name}.{kind}-{pid}")


def create_plate_layout(output: str | Path, plate: Plate, *, overwrite: bool = False,
                        run_info: dict | None = None) -> Path:
    """Write the plate, row and well groups (and the manifest) once, on the client.

    :func:`prepare_plate_layout`, then :meth:`PreparedLayout.publish`.

    The field groups below each well are the well task's to write. Every well starts with
    the same document (no images), so it is made once and copied. Everything is written into
    a hidden sibling folder, flushed to disk (files and folders) and renamed to ``output``, and
    the parent folder is flushed after the rename: a crash leaves either no store or all of it.
    With ``overwrite``, an existing store stays in place until the new layout is complete.

    Parameters
    ----------
    output
        The store to create (``X.ome.zarr``).
    plate
        The plate whose wells are laid out.
    overwrite
        Replace an existing store. Without it an existing path is an error.
    run_info
        Start the run's manifest (:class:`~hcs_dask.store.manifest.Manifest`) with this
        information (the fingerprints a resume compares). ``None``: no manifest.

    Returns
    -------
    Path
        ``output``, absolute.

    Raises
    ------
    OutputError
        From :func:`check_output`, before anything is written.
    """
    return prepare_plate_layout(output, plate, overwrite=overwrite, run_info=run_info).publish()


class PreparedLayout:
    """A plate layout written and flushed in a hidden sibling of its output, not yet in place.

    :meth:`publish` renames it into place (replacing an existing store where ``overwrite``);
    :meth:`discard` removes it, leaving the output as it was.
    """

    def __init__(self, output: Path, building: Path, overwrite: bool) -> None:
        self.output = output
        self.building = building
        self.overwrite = overwrite
        self._removing: threading.Thread | None = None

    def publish(self, *, background: bool = False) -> Path:
        """Rename the layout to its output (atomically; the parent folder flushed after); returns it.

        The store it replaces is renamed aside first, then removed: here, or with ``background``
        on a thread of its own, which :meth:`wait` joins (a 96-well store of 4 fields a well is
        2,000 files: 0.65 s here; a 1536-well one, seconds more before the first well). A process
        killed meanwhile leaves the renamed store, which the next publish of this output removes.
        """
        output, building = self.output, self.building
        replaced = _sibling(output, "replaced", os.getpid()) if output.exists() else None
        if replaced is not None and not self.overwrite:
            self.discard()
            check_output(output, overwrite=False)  # raises: it appeared since the layout was prepared
        try:
            if replaced is not None:
                if replaced.exists():
                    shutil.rmtree(replaced)
                os.rename(output, replaced)
            try:
                os.rename(building, output)
            except BaseException:
                if replaced is not None:
                    os.rename(replaced, output)
                raise
        except BaseException:
            self.discard()
            raise
        fsync_path(output.parent)
        if replaced is not None:
            if background:
                self._removing = threading.Thread(target=_remove_replaced, args=(replaced,), daemon=True,
                                                  name="hcs-dask-remove-replaced")
                self._removing.start()
            else:
                shutil.rmtree(replaced)
        _remove_leftovers(output)
        return output

    def wait(self) -> None:
        """Return once the store that :meth:`publish` replaced in the background is removed."""
        if self._removing is not None:
            self._removing.join()

    def discard(self) -> None:
        """Remove the prepared layout; the output is left as it was."""
        shutil.rmtree(self.building, ignore_errors=True)


def prepare_plate_layout(output: str | Path, plate: Plate, *, overwrite: bool = False,
                         run_info: dict | None = None) -> PreparedLayout:
    """Write and flush a plate's layout (as :func:`create_plate_layout`) in a hidden sibling of ``output``.

    Nothing is visible at ``output`` until :meth:`PreparedLayout.publish`, so a layout can be
    prepared while a cluster starts and dropped (:meth:`PreparedLayout.discard`) if it does not.

    Raises
    ------
    OutputError
        From :func:`check_output`, before anything is written.
    """
    from hcs_dask.store._ngff import plate_attributes  # ome-zarr-models (pydantic) where it is used

    output = check_output(output, overwrite=overwrite)
    rows = sorted({w.row for w in plate.wells}, key=plate.row_names().index)
    columns = sorted({str(w.column) for w in plate.wells}, key=int)
    attributes = plate_attributes(rows, columns, [(w.row, str(w.column)) for w in plate.wells],
                                  name=plate.name, field_count=len(plate.sites))
    files = metadata_files(lambda group: group.attrs.put({"ome": attributes}))
    row_document = metadata_files(lambda group: None)["zarr.json"]
    files.update((f"{row}/zarr.json", row_document) for row in rows)
    # A well lists no images until its task has written them all (see commit_well).
    files.update((f"{w.row}/{w.column}/zarr.json", well_document(())) for w in plate.wells)
    if run_info is not None:
        files.update(Manifest.layout_files(run_info))

    building = _sibling(output, "layout", os.getpid())
    if building.exists():
        shutil.rmtree(building)
    folders = {building}
    for key in files:
        folder = (building / key).parent
        while folder not in folders:
            folders.add(folder)
            folder = folder.parent
    try:
        for folder in sorted(folders, key=lambda path: len(path.parts)):
            folder.mkdir()
        write_files({building / key: data for key, data in files.items()}, durable=True)
        fsync_paths(folders)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return PreparedLayout(output, building, overwrite)


def _remove_replaced(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as error:
        logger.warning("%s: the store this run replaced could not be removed: %s", path, error)


def _remove_leftovers(output: Path) -> None:
    """Remove the hidden siblings that killed processes left behind for this output."""
    for kind in _SIBLING_KINDS:
        for path in output.parent.glob(f".{glob.escape(output.name)}.{kind}-*"):
            pid = path.name.rpartition("-")[2]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
