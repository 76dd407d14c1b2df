"""The run's record inside the store, as zarr groups that every zarr reader accepts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hcs_dask.store._files import group_document, write_file

__all__ = ["Manifest"]

#: The attribute that holds hcs_dask's record in each manifest group.
_KEY = "hcs_dask"


class Manifest:
    """The run's record: the group ``hcs_dask/`` of the plate, and one group per well below it.

    ``hcs_dask/zarr.json`` holds, in its attributes, the plate's and the pipeline's
    fingerprints (written once, with the plate layout), so that a resume with a different
    plate or pipeline is refused. ``hcs_dask/wells/<well>/zarr.json`` holds that well's record,
    written by the well's task (``running``, then its outcome) or by the client when the task
    could not (worker death, timeout). Every file is a zarr group document, so zarr lists
    the manifest as groups instead of warning about unknown objects. No two wells ever write
    the same file, and every write is an atomic rename. ``durable=False`` (a run with
    ``fsync=False``) flushes no record to disk.
    """

    FOLDER = "hcs_dask"

    def __init__(self, output: str | Path, *, durable: bool = True) -> None:
        self.output = Path(output)
        self.folder = self.output / self.FOLDER
        self.durable = durable

    @classmethod
    def layout_files(cls, run_info: dict) -> dict[str, bytes]:
        """The manifest's files for a new store, keyed by path inside it; written by the layout.

        Examples
        --------
        >>> sorted(Manifest.layout_files({"plate": "P1"}))
        ['hcs_dask/wells/zarr.json', 'hcs_dask/zarr.json']
        """
        return {f"{cls.FOLDER}/zarr.json": group_document({_KEY: {**run_info, "created": time.time()}}),
                f"{cls.FOLDER}/wells/zarr.json": group_document({})}

    def read_run(self) -> dict | None:
        """The run information given to the layout, or ``None`` where the store has no manifest."""
        return _record(self.folder / "zarr.json")

    def write_well(self, record: dict) -> None:
        """Replace the record of ``record["well"]``; outcomes are flushed to disk (where ``durable``), ``running`` is not.

        A well's group is made by its first record. An outcome's rename is followed by an
        fsync of the well's group folder and of ``wells/`` (which lists that folder).
        """
        folder = self.folder / "wells" / record["well"]
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{folder.parent}: no manifest in this store; its layout was written "
                                    "without one (create_plate_layout's run_info)") from error
        # A "running" record lost to a power cut reads as "not started": both mean the
        # well runs again on resume, so only outcomes are worth an fsync.
        durable = self.durable and record.get("status") != "running"
        write_file(folder / "zarr.json", group_document({_KEY: record}), atomic=True, durable=durable,
                   flush_folders=[folder.parent])

    def read_well(self, well: str) -> dict | None:
        """The well's record, or ``None`` where it has none yet."""
        return _record(self.folder / "wells" / well / "zarr.json")

    def read_wells(self) -> dict[str, dict]:
        """Every well's record, by well name; wells without a record are left out."""
        records = {}
        for path in (self.folder / "wells").glob("*/zarr.json"):
            record = _record(path)
            if record is not None:
                records[path.parent.name] = record
        return records


def _record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes()).get("attributes", {}).get(_KEY)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None  # a torn write cannot happen (atomic rename); be lenient anyway
