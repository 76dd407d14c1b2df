"""The write path of a field: written whole, each level is its ``zarr.json`` plus one file (a chunk
where the level is small, else a shard), with the bytes zarr itself writes; regions (sequential
combinations) still merge into it; the number of levels and the chunking follow the image size."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import zarr

from hcs_dask.store import FieldLayout, FieldWriter, downsample, pyramid_levels, write_fields


def _layout(shape: tuple[int, ...], dtype: str) -> FieldLayout:
    return FieldLayout(axes=("c", "z", "y", "x"), shape=shape, dtype=dtype, channel_names=("a", "b")[: shape[0]],
                       pixel_size_um=(0.65, 0.65), z_step_um=None, levels=pyramid_levels(shape[-2:]))


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("shape", "dtype"), [((2, 1, 128, 128), "float32"), ((2, 3, 300, 200), "uint16"),
                                              ((1, 1, 600, 520), "float32")],
                         ids=["one-level", "shard-past-the-edge", "three-levels"])
def test_a_whole_field_is_what_zarr_writes_one_file_per_level(tmp_path, shape, dtype):
    data = (np.random.default_rng(0).random(shape) * 1000).astype(dtype)
    layout = _layout(shape, dtype)
    ours, theirs = tmp_path / "ours", tmp_path / "zarr"
    FieldWriter(ours, "A/1/0", layout).write((slice(None), slice(None)), data)
    reference = FieldWriter(theirs, "A/1/0", layout)
    reference.create()
    level = data
    for index, array in enumerate(reference._arrays):  # zarr's own write of each level
        level = downsample(level) if index else level
        array[...] = level[..., : array.shape[-2], : array.shape[-1]]
    group = "A/1/0/zarr.json"  # ours holds the channels' windows, written after the data
    assert {k: v for k, v in _files(ours).items() if k != group} == {k: v for k, v in _files(theirs).items() if k != group}
    channels = zarr.open_group(ours / "A/1/0", mode="r").attrs["ome"]["omero"]["channels"]
    assert [(c["window"]["start"], c["window"]["end"]) for c in channels] == \
        [(data[i].min().item(), data[i].max().item()) for i in range(shape[0])]
    files = [p for p in (ours / "A/1/0").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(files) == layout.levels
    assert np.array_equal(zarr.open_group(ours / "A/1/0", mode="r")["0"][...], data)


def test_regions_of_a_field_and_several_fields_in_one_call(tmp_path):
    layout = FieldLayout(axes=("t", "c", "z", "y", "x"), shape=(3, 2, 1, 64, 64), dtype="uint16",
                         channel_names=("a", "b"), pixel_size_um=None, z_step_um=None, levels=1)
    data = np.arange(3 * 2 * 64 * 64, dtype="uint16").reshape(3, 2, 1, 64, 64)
    timepoints = FieldWriter(tmp_path, "A/1/0", layout)
    for t in range(3):  # one sequential combination at a time
        timepoints.write((slice(t, t + 1), slice(None), slice(None)), data[t : t + 1])
    whole = _layout((2, 1, 64, 64), "uint16")
    others = [FieldWriter(tmp_path, f"A/1/{i}", whole) for i in (1, 2)]
    write_fields([(writer, (slice(None), slice(None)), data[0] + i) for i, writer in enumerate(others)])
    assert np.array_equal(zarr.open_group(tmp_path / "A/1/0", mode="r")["0"][...], data)
    for i in (0, 1):
        assert np.array_equal(zarr.open_group(tmp_path / f"A/1/{i + 1}", mode="r")["0"][...], data[0] + i)


@pytest.mark.parametrize(("shape", "dtype", "chunks", "shards"), [
    ((2, 1, 128, 128), "float32", [(2, 1, 128, 128)], [None]),
    ((4, 2, 256, 256), "uint16", [(4, 2, 256, 256)], [None]),  # 1 MiB: one chunk still
    ((4, 3, 256, 256), "float32", [(1, 1, 256, 256)], [(4, 3, 256, 256)]),  # 3 MiB: plane chunks in a shard
    ((1, 1, 600, 520), "uint16", [(1, 1, 256, 256), (1, 1, 256, 256), (1, 1, 150, 130)],
     [(1, 1, 768, 768), (1, 1, 512, 512), None]),
], ids=["small", "one-mebibyte", "three-mebibytes", "pyramid"])
def test_a_small_level_is_one_chunk_and_a_larger_one_a_shard_of_plane_tiles(tmp_path, shape, dtype, chunks, shards):
    layout = _layout(shape, dtype)
    FieldWriter(tmp_path, "A/1/0", layout).write((slice(None), slice(None)), np.ones(shape, dtype))
    group = zarr.open_group(tmp_path / "A/1/0", mode="r")
    arrays = [group[str(level)] for level in range(layout.levels)]
    assert [a.chunks for a in arrays] == chunks and [a.shards for a in arrays] == shards
    assert all(a[...].all() for a in arrays)


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (1, 1, 300, 64)], ids=["chunk", "shard"])
def test_a_field_of_fill_values_writes_no_file_and_reads_back(tmp_path, shape):
    layout = _layout(shape, "uint16")
    FieldWriter(tmp_path, "A/1/0", layout).write((slice(None), slice(None)), np.zeros(shape, "uint16"))
    assert {p.name for p in (tmp_path / "A/1/0").rglob("*") if p.is_file()} == {"zarr.json"}  # documents only
    assert not zarr.open_group(tmp_path / "A/1/0", mode="r")["0"][...].any()


@pytest.mark.parametrize(("edges", "levels"), [((64, 64), 1), ((256, 256), 1), ((257, 100), 2), ((1080, 1080), 4),
                                               ((2160, 2560), 5), ((40, 4000), 1)])
def test_levels_follow_the_image_size(edges, levels):
    assert pyramid_levels(edges) == levels


def test_a_cluster_that_cannot_be_reached_leaves_no_layout_behind(tmp_path, synthetic_source):
    # The layout is prepared while the cluster starts; it must vanish, hidden sibling included.
    import dask

    from hcs_dask import run_plate
    from hcs_dask.cluster import ClusterError

    output = tmp_path / "out.ome.zarr"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), pytest.raises(ClusterError):
        run_plate(synthetic_source, "max_projection", output, scheduler="tcp://127.0.0.1:9", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_prepared_layout_is_hidden_until_published_and_discard_leaves_the_old_store(tmp_path, synthetic_source):
    from hcs_dask import open_plate
    from hcs_dask.store import create_plate_layout, prepare_plate_layout

    plate = open_plate(synthetic_source)
    output = create_plate_layout(tmp_path / "out.ome.zarr", plate)
    before = _files(output)
    prepared = prepare_plate_layout(output, plate, overwrite=True, run_info={"plate": plate.name})
    assert _files(output) == before and prepared.building.is_dir()
    prepared.discard()
    assert _files(output) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.ome.zarr"]
    prepare_plate_layout(output, plate, overwrite=True, run_info={"plate": plate.name}).publish()
    assert (output / "hcs_dask" / "zarr.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ome.zarr"]
