"""Writing OME-Zarr: hcs_dask's well writes against a bare zarr write of the same arrays.

For each case, the same in-memory arrays (from a synthetic plate, so that they compress like
images) are written as N wells of F fields each, in this process, with no Dask:

* ``hcs_dask``: what a well task does after its steps: ``reset_well``, one ``FieldWriter`` per
  field (group, pyramid levels, multiscales/omero metadata, pixels), ``commit_well`` (flush
  every file, list the fields in the well's metadata);
* ``hcs_dask, no fsync``: the same with ``commit_well(durable=False)``, to show the flush's share;
* ``bare zarr``: ``zarr.create_group(attributes=…)`` + ``create_array`` + ``array[...] = …``
  per level: the same levels, chunks and shards (``level_chunks``), dtype, codecs and metadata.

Variants alternate, ``--repeats`` times (best is the figure). Printed: ms per well, MB/s of
pixels (all levels, uncompressed), the throughput ratio bare/hcs_dask, the files a well and a
field create, and how fast one whole well (every field's full-resolution level) reads back.
PASS/FAIL against the target; exits 0 either way.

    python bench/io.py            # 3 cases (48, 48, 12 wells), 3 repeats (about 5 min on 2 cores)
    python bench/io.py --quick    # smoke run: 2 small cases, 8 wells, 1 repeat
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from _common import (
    MB,
    PlateSpec,
    anchor_site,
    best,
    count_files,
    field_attributes,
    note,
    LoadMonitor,
    synthetic_plate,
    table,
    verdict,
    workdir_from,
    write_field_bare,
)

from hcs_dask import open_plate
from hcs_dask.plate import Plate, Well
from hcs_dask.store import FieldLayout, FieldWriter, commit_well, create_plate_layout, pyramid_levels, reset_well

# Target (issue 6).
RATIO_TARGET = 0.9


def source_blocks(work: Path, *, sites: int, size: int, projected: bool) -> list[np.ndarray]:
    """One well's field arrays, ``(c, z, y, x)``: raw uint16 stacks, or the anchor pipeline's
    float32 projections (``z`` of 1)."""
    root, _ = synthetic_plate(work, PlateSpec(1, sites, 2, 3, size))
    plate = open_plate(root)
    by_site: dict[int, dict[int, list[tuple[int, str]]]] = {}
    for key, relative in plate.wells[0].files:
        by_site.setdefault(key.site, {}).setdefault(key.channel, []).append((key.z, relative))
    blocks = []
    for site in sorted(by_site):
        images = [[tifffile.imread(Path(root) / rel) for _, rel in sorted(by_site[site][c])]
                  for c in sorted(by_site[site])]
        if projected:
            blocks.append(anchor_site(images)[0][:, None])
        else:
            blocks.append(np.stack([np.stack(planes) for planes in images]))
    return blocks


def well_plate(wells: int, fields: int) -> Plate:
    """A plate index with ``wells`` wells (no files behind it) for the layout writers."""
    from hcs_dask.plate import ImageKey, row_name

    rows, columns = next((r, c) for r, c in ((8, 12), (16, 24), (32, 48)) if wells <= r * c)
    made = []
    for i in range(wells):
        name = f"{row_name(i // columns)}{i % columns + 1:02d}"
        made.append(Well(name, tuple((ImageKey(name, s + 1, 1, 1, 1), f"{name}_{s}.tif") for s in range(fields))))
    return Plate(name="io", root="/nonexistent", format="imagexpress", wells=tuple(made), shape=(1, 1),
                 dtype="uint16", plate_rows=rows, plate_columns=columns)


def layout_of(block: np.ndarray) -> FieldLayout:
    return FieldLayout(axes=("c", "z", "y", "x"), shape=block.shape, dtype=str(block.dtype),
                       channel_names=("w1", "w2"), pixel_size_um=(0.65, 0.65),
                       z_step_um=2.0 if block.shape[1] > 1 else None, levels=pyramid_levels(block.shape[-2:]))


def write_hcs(output: Path, plate: Plate, blocks: list[np.ndarray], *, durable: bool) -> float:
    create_plate_layout(output, plate, overwrite=True)
    start = time.perf_counter()
    for well in plate.wells:
        reset_well(output, well.row, well.column)
        for index, block in enumerate(blocks):
            writer = FieldWriter(output, f"{well.row}/{well.column}/{index}", layout_of(block))
            writer.write((slice(None), slice(None)), block)
        commit_well(output, well.row, well.column, list(range(len(blocks))), durable=durable)
    return time.perf_counter() - start


def write_bare(output: Path, plate: Plate, blocks: list[np.ndarray]) -> float:
    create_plate_layout(output, plate, overwrite=True)
    store = zarr.storage.LocalStore(output)
    axes = ("c", "z", "y", "x")
    start = time.perf_counter()
    for well in plate.wells:
        for index, block in enumerate(blocks):
            path = f"{well.row}/{well.column}/{index}"
            layout = layout_of(block)
            attributes = field_attributes(path, axes=axes, levels=layout.levels, channel_names=layout.channel_names,
                                          pixel_size_um=layout.pixel_size_um, z_step_um=layout.z_step_um)
            write_field_bare(store, path, block, attributes, axes)
    return time.perf_counter() - start


def read_well(output: Path, well: Well, fields: int) -> tuple[float, int]:
    """Seconds to read every field's full-resolution level of one well, and the bytes read."""
    store = zarr.storage.LocalStore(output, read_only=True)
    start = time.perf_counter()
    total = 0
    for index in range(fields):
        array = zarr.open_array(store, path=f"{well.row}/{well.column}/{index}/0", mode="r")
        total += array[...].nbytes
    return time.perf_counter() - start, total


def pixel_bytes(blocks: list[np.ndarray]) -> int:
    total = 0
    for block in blocks:
        for level in range(pyramid_levels(block.shape[-2:])):
            total += block.nbytes // 4**level
    return total


def bench_case(label: str, blocks: list[np.ndarray], work: Path, wells: int, repeats: int) -> dict[str, Any]:
    plate = well_plate(wells, len(blocks))
    out = work / "out"
    out.mkdir(exist_ok=True)
    variants = {
        "hcs_dask": lambda path: write_hcs(path, plate, blocks, durable=True),
        "hcs_dask, no fsync": lambda path: write_hcs(path, plate, blocks, durable=False),
        "bare zarr": lambda path: write_bare(path, plate, blocks),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    # Warm-up: imports, codec pipelines, the first directory creations.
    for name, write in variants.items():
        write(out / f"{label}-warmup.ome.zarr")
    for repeat in range(repeats):
        names = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in names:
            path = out / f"{label}-{name.replace(' ', '_').replace(',', '')}.ome.zarr"
            times[name].append(variants[name](path))
    hcs_path = out / f"{label}-hcs_dask.ome.zarr"
    first = plate.wells[0]
    well_files = count_files(hcs_path / first.row / str(first.column))
    field_files = count_files(hcs_path / first.row / str(first.column) / "0")
    reads = [read_well(hcs_path, first, len(blocks)) for _ in range(5)]
    read_s, read_bytes = min(reads)
    size = pixel_bytes(blocks)
    figures = {name: best(values) for name, values in times.items()}
    shutil.rmtree(out, ignore_errors=True)
    return {"label": label, "wells": wells, "fields": len(blocks), "shape": blocks[0].shape, "dtype": blocks[0].dtype,
            "levels": pyramid_levels(blocks[0].shape[-2:]), "times": times, "best": figures, "bytes": size,
            "well_files": well_files, "field_files": field_files, "read_s": read_s, "read_bytes": read_bytes,
            "ratio": figures["bare zarr"] / figures["hcs_dask"],
            "ratio_nosync": figures["bare zarr"] / figures["hcs_dask, no fsync"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 small cases, 8 wells, 1 repeat")
    parser.add_argument("--wells", type=int, default=None,
                        help="wells per case, at most 1536 (default 48; 8 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each variant (default 3; 1 with --quick)")
    parser.add_argument("--workdir", help="keep the source plates here and reuse them (default: a temp folder)")
    args = parser.parse_args(argv)
    wells = args.wells or (8 if args.quick else 48)
    repeats = args.repeats or (1 if args.quick else 3)
    results = []
    with LoadMonitor() as load, workdir_from(args.workdir) as work:
        size = 128 if args.quick else 256
        # (label, source options, wells): the 1024-px field is 16× the pixels, so a quarter of the wells.
        cases = [
            (f"projected float32 ({size} px)", dict(sites=4, size=size, projected=True), wells),
            (f"raw uint16 stack ({size} px)", dict(sites=4, size=size, projected=False), wells),
        ]
        if not args.quick:
            cases.append(("raw uint16 stack (1024 px)", dict(sites=1, size=1024, projected=False), max(1, wells // 4)))
        for label, options, case_wells in cases:
            blocks = source_blocks(work, **options)
            print(f"  {label}: {case_wells} wells …", flush=True)
            results.append(bench_case(label.split(" (")[0].replace(" ", "-"), blocks, work, case_wells, repeats))
            results[-1]["label"] = label

    table(["case", "wells", "fields", "field (c,z,y,x)", "dtype", "levels", "variant", "runs (s)", "ms/well", "MB/s"],
          [[r["label"], r["wells"], r["fields"], "×".join(map(str, r["shape"])), str(r["dtype"]), r["levels"], name,
            ", ".join(f"{v:.2f}" for v in r["times"][name]), r["best"][name] / r["wells"] * 1e3,
            r["bytes"] * r["wells"] / r["best"][name] / MB]
           for r in results for name in r["best"]],
          title="well writes; MB/s of pixels, all levels, uncompressed")
    table(["case", "bare/hcs_dask", "bare/hcs_dask (no fsync)", "files per well", "files per field",
           "read one well ms", "read MB/s"],
          [[r["label"], r["ratio"], r["ratio_nosync"], r["well_files"], r["field_files"], r["read_s"] * 1e3,
            r["read_bytes"] / r["read_s"] / MB] for r in results],
          title="ratios (≥ 1 means hcs_dask is as fast as bare zarr), files, and reading one well back "
                "(every field's level 0, page cache warm)")
    print("files per field = the field group's zarr.json + per level (zarr.json + one chunk or shard); "
          "files per well add the well's zarr.json")
    load.report()
    print()
    for r in results:
        verdict(r["ratio"] >= RATIO_TARGET,
                f"{r['label']}: hcs_dask writes at {r['ratio']:.2f}× the bare zarr speed (≥ {RATIO_TARGET})")
    load.warn_if_busy()
    if args.quick:
        note("--quick: fewer wells and smaller images; indicative only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
