"""A well's commit point: its fields count from the moment its group lists them.

A well group lists no images until its task has written and flushed them all. After any
crash, a half-written well is present on disk but referenced by nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from hcs_dask.store._files import fsync_paths, metadata_files, publish, stage_file, write_file

__all__ = ["commit_well", "reset_well", "well_document"]


@lru_cache(maxsize=64)
def well_document(fields: tuple[int, ...]) -> bytes:
    """A well's ``zarr.json`` listing these fields; wells mostly list the same ones, so it is cached.

    Examples
    --------
    >>> json.loads(well_document((0, 1)))["attributes"]["ome"]["well"]["images"]
    [{'path': '0'}, {'path': '1'}]
    """
    from hcs_dask.store._ngff import well_attributes  # ome-zarr-models (pydantic) where it is used

    return metadata_files(lambda group: group.attrs.put({"ome": well_attributes(fields)}))["zarr.json"]


def _listed_images(folder: Path) -> list:
    document = json.loads((folder / "zarr.json").read_bytes())
    return document.get("attributes", {}).get("ome", {}).get("well", {}).get("images", [])


def reset_well(output: str | Path, row: str, column: int) -> None:
    """Before a well (re)runs: unlist its images and remove fields left by an earlier attempt.

    An unlisting is flushed (file and folder) before any field is removed, so that no crash
    leaves a well that lists fields which are gone.
    """
    folder = Path(output) / row / str(column)
    if _listed_images(folder):
        write_file(folder / "zarr.json", well_document(()), atomic=True, durable=True)
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)


def commit_well(output: str | Path, row: str, column: int, fields: Sequence[int], *, durable: bool = True) -> None:
    """List a well's fields in its metadata: the point from which the well's data count.

    With ``durable``, every file and folder below the well is flushed to disk first, and the
    well's folder after the rename of its new ``zarr.json``, so that a listed field is complete
    even after a power cut, not only after a process kill. The listing itself is an atomic
    rename, so a reader sees the old list or the new one.
    """
    folder = Path(output) / row / str(column)
    listing = folder / "zarr.json"
    if not durable:
        write_file(listing, well_document(tuple(fields)), atomic=True)
        return
    paths: list[str | Path] = []
    for directory, _, files in os.walk(folder):
        if directory != str(folder):  # the well's own folder is flushed after the rename
            paths.append(directory)
        paths.extend(os.path.join(directory, name) for name in files)
    # The new listing is staged first and flushed with the fields, all at once; only then renamed.
    staged = stage_file(listing, well_document(tuple(fields)))
    fsync_paths([*paths, staged])
    publish(staged, listing, durable=True)
