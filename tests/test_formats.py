"""Plate readers and the synthetic plate writer, on real files in ``tmp_path``."""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hcs_dask.formats import PlateError, open_plate, write_synthetic_plate
from hcs_dask.formats.imagexpress import is_imagexpress, read_imagexpress
from hcs_dask.plate import ImageKey, Plate

DATA = Path(__file__).parent / "data"
GUID = "A1B2C3D4-1111-2222-3333-444455556666"
# A GUID that starts with a digit: glued onto "w2" it reads "w23F2A…".
DIGIT_GUID = "3F2A9C10-1111-2222-3333-444455556666"


def touch(folder: Path, *names: str) -> None:
    """Empty files: enough for an index read without headers."""
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def write_tiff(path: Path, shape: tuple[int, int] = (16, 16), dtype: str = "uint16", **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.zeros(shape, dtype), metadata=None, **kwargs)


def keys(plate: Plate) -> set[tuple[str, int, int, int, int]]:
    return {(k.well, k.site, k.channel, k.z, k.timepoint) for well in plate for k in well.keys}


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------ synthetic plate
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic") / "plate"
    return write_synthetic_plate(folder, wells=3, sites=2, channels=3, z=3, timepoints=2, size=64, seed=7)


def test_synthetic_plate_round_trips(synthetic: Path) -> None:
    plate = open_plate(synthetic)
    assert plate.format == "imagexpress"
    assert plate.name == "Synthetic"
    assert plate.root == str(synthetic)
    assert [w.name for w in plate] == ["A01", "A02", "A03"]
    assert plate.sites == (1, 2)
    assert plate.channels == (1, 2, 3)
    assert plate.zs == (1, 2, 3)
    assert plate.timepoints == (1, 2)
    assert plate.n_images == 3 * 2 * 3 * 3 * 2
    assert plate.channel_names == ((1, "DAPI"), (2, "FITC"), (3, "TRITC"))
    assert plate.pixel_size_um == pytest.approx((0.65, 0.65))
    assert plate.z_step_um == pytest.approx(2.0)
    assert plate.shape == (64, 64)
    assert plate.dtype == "uint16"
    assert (plate.plate_rows, plate.plate_columns) == (8, 12)
    assert plate.gaps() == []
    assert plate.declared_missing == ()
    assert plate.notes == ()
    for well in plate:
        for key, path in well.files:
            assert (synthetic / path).is_file()
            folder = f"TimePoint_{key.timepoint}/ZStep_{key.z}/"
            assert path.startswith(f"{folder}Synthetic_{key.well}_s{key.site}_w{key.channel}")
    assert pickle.loads(pickle.dumps(plate)) == plate


def test_synthetic_ground_truth(synthetic: Path) -> None:
    with open(synthetic / "ground_truth.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["well", "site", "timepoint", "nuclei"]
    assert {(r["well"], int(r["site"]), int(r["timepoint"])) for r in rows} == {
        (w, s, t) for w in ("A01", "A02", "A03") for s in (1, 2) for t in (1, 2)
    }
    counts = {(r["well"], r["site"]): [] for r in rows}
    for r in rows:
        counts[(r["well"], r["site"])].append(int(r["nuclei"]))
    # Cells drift between timepoints but never leave the frame.
    assert all(len(set(c)) == 1 and c[0] >= 1 for c in counts.values())


def test_synthetic_planes_are_in_focus_in_the_middle(synthetic: Path) -> None:
    plate = open_plate(synthetic)
    well = plate.well("A01")
    planes = [tifffile.imread(synthetic / well.path_of(ImageKey("A01", 1, 1, z, 1))) for z in (1, 2, 3)]
    peaks = [float(np.percentile(p, 99.5)) for p in planes]
    assert peaks[1] > peaks[0] and peaks[1] > peaks[2]
    # Well inside the dtype range, above a positive background.
    assert max(int(p.max()) for p in planes) < 65535 // 4
    assert min(int(p.min()) for p in planes) > 0
    nuclei, cytoplasm = (tifffile.imread(synthetic / well.path_of(ImageKey("A01", 1, c, 2, 1))) for c in (1, 2))
    # The cytoplasm is larger and dimmer than the nuclei.
    background = np.median(planes[1][:4, :4])
    assert (cytoplasm > background + 150).sum() > (nuclei > background + 150).sum()
    assert np.percentile(cytoplasm, 99.5) < np.percentile(nuclei, 99.5)


def test_synthetic_plate_is_deterministic(tmp_path: Path) -> None:
    kwargs = dict(wells=2, sites=1, channels=2, z=2, size=48)
    first = all_files(write_synthetic_plate(tmp_path / "a", seed=3, **kwargs))
    again = all_files(write_synthetic_plate(tmp_path / "b", seed=3, **kwargs))
    other = all_files(write_synthetic_plate(tmp_path / "c", seed=4, **kwargs))
    assert first == again
    assert first.keys() != other.keys()  # the GUIDs follow the seed
    first_pixels = [v for k, v in sorted(first.items()) if k.endswith(".tif")]
    other_pixels = [v for k, v in sorted(other.items()) if k.endswith(".tif")]
    assert first_pixels != other_pixels


def test_synthetic_plate_geometry_and_dtypes(tmp_path: Path) -> None:
    big = open_plate(write_synthetic_plate(tmp_path / "big", wells=97, sites=1, channels=1, z=1, size=32))
    assert (big.plate_rows, big.plate_columns) == (16, 24)
    assert [w.name for w in big][-2:] == ["D24", "E01"]
    assert big.zs == (1,) and "ZStep" not in big.wells[0].files[0][1]
    for dtype in ("uint8", "float32"):
        plate = open_plate(write_synthetic_plate(tmp_path / dtype, wells=1, sites=1, channels=1, z=1, size=32,
                                                 dtype=dtype, prefix=""))
        assert plate.dtype == dtype
        assert plate.name == dtype  # no prefix: the folder names the plate
        image = tifffile.imread(Path(plate.root) / plate.wells[0].files[0][1])
        limit = 255 if dtype == "uint8" else 1.0
        assert 0 < float(image.max()) < limit


def test_synthetic_plate_validates_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="wells"):
        write_synthetic_plate(tmp_path / "x", wells=0)
    with pytest.raises(ValueError, match="dtype"):
        write_synthetic_plate(tmp_path / "x", dtype="int64")
    with pytest.raises(ValueError, match="prefix"):
        write_synthetic_plate(tmp_path / "x", prefix="a b")
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="full"):
        write_synthetic_plate(tmp_path / "full", wells=1)
    assert os.listdir(tmp_path / "full") == ["keep.txt"]


# ------------------------------------------------------------- name variants
NAME_VARIANTS = [
    pytest.param(["B03_s1_w1.tif", "B03_s1_w2.tif"], {("B03", 1, 1, 1, 1), ("B03", 1, 2, 1, 1)}, id="no-prefix"),
    pytest.param(["P_B03_s001_w1.tif", "P_B03_s012_w1.tif"], {("B03", 1, 1, 1, 1), ("B03", 12, 1, 1, 1)},
                 id="zero-padded-sites"),
    pytest.param(["P_B03_s1.tif", "P_B03_s2.tif"], {("B03", 1, 1, 1, 1), ("B03", 2, 1, 1, 1)}, id="no-channel"),
    pytest.param(["P_B03_w1.tif", "P_B03_w2.tif"], {("B03", 1, 1, 1, 1), ("B03", 1, 2, 1, 1)}, id="no-site"),
    pytest.param(["P_B03.tif"], {("B03", 1, 1, 1, 1)}, id="well-only"),
    pytest.param([f"P_B03_s1_w1{GUID}.tif", f"P_B03_s1_w2{DIGIT_GUID}.tif", "P_B03_s1_w3A1B2C3D4.tif"],
                 {("B03", 1, 1, 1, 1), ("B03", 1, 2, 1, 1), ("B03", 1, 3, 1, 1)}, id="guids"),
    pytest.param([f"P_B03_s1_w1{GUID.replace('-', '')}.tif", "P_B03_s1_w12.tif"],
                 {("B03", 1, 1, 1, 1), ("B03", 1, 12, 1, 1)}, id="guid-without-dashes"),
    pytest.param(["P_B03_s1_w1.TIF", "P_B03_s2_w1.tiff"], {("B03", 1, 1, 1, 1), ("B03", 2, 1, 1, 1)},
                 id="extensions"),
    pytest.param(["P_B3_s1_w1.tif", "P_C12_s1_w1.tif"], {("B03", 1, 1, 1, 1), ("C12", 1, 1, 1, 1)},
                 id="unpadded-wells"),
    pytest.param(["My_Plate-2023_06_C04_s2_w3.tif"], {("C04", 2, 3, 1, 1)}, id="prefix-with-underscores"),
    pytest.param(["Run_A1_B03_s1_w1.tif"], {("B03", 1, 1, 1, 1)}, id="well-like-prefix"),
    pytest.param(["P_A01_s1_w1_z2_t3.tif", f"P_A01_s1_w1_z1_t3{GUID}.tif", "P_A01_t2_s1_w2.tif"],
                 {("A01", 1, 1, 2, 3), ("A01", 1, 1, 1, 3), ("A01", 1, 2, 1, 2)}, id="z-and-t-in-names"),
    pytest.param(["P_AF48_s1_w1.tif", "P_A01_s1_w1.tif"], {("AF48", 1, 1, 1, 1), ("A01", 1, 1, 1, 1)},
                 id="1536-wells"),
]


@pytest.mark.parametrize(("names", "expected"), NAME_VARIANTS)
def test_name_variants(tmp_path: Path, names: list[str], expected: set[tuple]) -> None:
    touch(tmp_path, *names)
    plate = open_plate(tmp_path, read_headers=False)
    assert keys(plate) == expected
    assert plate.shape == (0, 0) and plate.dtype == ""


def test_wells_and_files_are_sorted(tmp_path: Path) -> None:
    touch(tmp_path, "P_B02_s2_w1.tif", "P_AA01_s1_w1.tif", "P_B02_s1_w2.tif", "P_A10_s1_w1.tif",
          "P_B02_s1_w1.tif", "P_A09_s1_w1.tif")
    plate = open_plate(tmp_path, read_headers=False)
    assert [w.name for w in plate] == ["A09", "A10", "B02", "AA01"]
    assert [p for _, p in plate.well("B02").files] == ["P_B02_s1_w1.tif", "P_B02_s1_w2.tif", "P_B02_s2_w1.tif"]
    assert (plate.plate_rows, plate.plate_columns) == (32, 48)
    assert plate.name == "P"


def test_thumbs_are_skipped(tmp_path: Path) -> None:
    touch(tmp_path, "P_A01_s1_w1.tif", f"P_A01_s1_w1_thumb{GUID}.tif", "P_A01_s1_w2_thumb.tif", "overview.tif")
    plate = open_plate(tmp_path, read_headers=False)
    assert keys(plate) == {("A01", 1, 1, 1, 1)}
    assert any("2 _thumb" in note for note in plate.notes)
    assert any("overview.tif" in note for note in plate.notes)


def test_timepoint_and_zstep_folders(tmp_path: Path) -> None:
    for t in (1, 2):
        for z in (1, 2, 3):
            touch(tmp_path, f"TimePoint_{t}/ZStep_{z}/P_A01_s1_w1.tif", f"TimePoint_{t}/ZStep_{z}/P_A02_s1_w1.tif")
        # A projection beside the ZStep_ folders, and the HTD copy MetaXpress leaves.
        touch(tmp_path, f"TimePoint_{t}/P_A01_s1_w1.tif", f"TimePoint_{t}/P.HTD")
    plate = open_plate(tmp_path, read_headers=False)
    assert plate.zs == (1, 2, 3) and plate.timepoints == (1, 2)
    assert plate.n_images == 2 * 3 * 2
    assert plate.well("A01").path_of(ImageKey("A01", 1, 1, 3, 2)) == "TimePoint_2/ZStep_3/P_A01_s1_w1.tif"
    assert any("projection" in note and "TimePoint_1/P_A01_s1_w1.tif" in note for note in plate.notes)


def test_zstep_folders_alone_and_projections(tmp_path: Path) -> None:
    touch(tmp_path, "ZStep_1/P_A01_s1_w1.tif", "ZStep_2/P_A01_s1_w1.tif", "P_A01_s1_w1.tif")
    plate = open_plate(tmp_path, read_headers=False)
    assert keys(plate) == {("A01", 1, 1, 1, 1), ("A01", 1, 1, 2, 1)}
    assert all(path.startswith("ZStep_") for _, path in plate.wells[0].files)
    assert any("projection" in note for note in plate.notes)


def test_timepoint_folders_alone(tmp_path: Path) -> None:
    touch(tmp_path, "TimePoint_1/A01_s1_w1.tif", "TimePoint_10/A01_s1_w1.tif")
    plate = open_plate(tmp_path, read_headers=False)
    assert keys(plate) == {("A01", 1, 1, 1, 1), ("A01", 1, 1, 1, 10)}


def test_date_and_run_folders_are_descended(tmp_path: Path) -> None:
    run = tmp_path / "Screen7" / "2023-02-21" / "1334"
    touch(run, "ZStep_1/A01_s1_w1.tif", "ZStep_2/A01_s1_w1.tif")
    (tmp_path / "Screen7" / "logs").mkdir()
    plate = open_plate(tmp_path / "Screen7", read_headers=False)
    assert plate.root == str(run)
    assert plate.name == "Screen7"  # "1334" says nothing; the folder the user named does
    assert plate.zs == (1, 2)


def test_two_plates_below_is_an_error(tmp_path: Path) -> None:
    touch(tmp_path, "run1/P_A01_s1_w1.tif", "run2/P_A01_s1_w1.tif")
    with pytest.raises(PlateError, match="2 plates.*run1.*run2"):
        open_plate(tmp_path, read_headers=False)


def test_two_files_for_one_image_is_an_error(tmp_path: Path) -> None:
    touch(tmp_path, "Old_A01_s1_w1.tif", "New_A01_s1_w1.tif")
    with pytest.raises(PlateError, match="New_A01_s1_w1.tif and Old_A01_s1_w1.tif"):
        open_plate(tmp_path, read_headers=False)


def test_detection(tmp_path: Path, synthetic: Path) -> None:
    assert is_imagexpress(synthetic)
    assert is_imagexpress(synthetic / "Synthetic.HTD")
    assert not is_imagexpress(tmp_path)
    assert open_plate(synthetic / "Synthetic.HTD", read_headers=False).root == str(synthetic)


# --------------------------------------------------------------------- HTD
def write_htd(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\r\n".join(['"HTSInfoFile", Version 1.0', *lines, '"EndFile"']) + "\r\n")


def test_htd_declares_more_than_exists(tmp_path: Path) -> None:
    # 2 wells x 6 sites x 4 wavelengths x 26 z declared; 1 well x 4 sites x 2 wavelengths x 2 z shipped.
    write_htd(tmp_path / "Exp.HTD", [
        '"TimePoints", 1', '"ZSeries", TRUE', '"ZSteps", 26',
        '"XWells", 12', '"YWells", 8',
        *[f'"WellsSelection{r}", ' + ", ".join(["TRUE" if r == 2 and c in (3, 4) else "FALSE" for c in range(1, 13)])
          for r in range(1, 9)],
        '"Sites", TRUE', '"XSites", 3', '"YSites", 3',
        '"SiteSelection1", TRUE, TRUE, TRUE',
        '"SiteSelection2", TRUE, TRUE, TRUE',
        '"SiteSelection3", FALSE, FALSE, FALSE',
        '"Waves", TRUE', '"NWavelengths", 4',
        '"WaveName1", "DAPI"', '"WaveName2", "FITC"', '"WaveName3", "TRITC"', '"WaveName4", "Cy5"',
        '"WaveCollect1", 1', '"WaveCollect2", 1', '"WaveCollect3", 1', '"WaveCollect4", 1',
        '"UniquePlateIdentifier", "stale"',
    ])
    for z in (1, 2):
        for s in (1, 2, 3, 4):
            touch(tmp_path, f"ZStep_{z}/Exp_B03_s{s}_w1{GUID}.tif", f"ZStep_{z}/Exp_B03_s{s}_w2.tif")
        touch(tmp_path, f"ZStep_{z}/Exp_B03_s1_w3_thumb.tif")
    plate = open_plate(tmp_path, read_headers=False)
    assert plate.channel_names == ((1, "DAPI"), (2, "FITC"))
    assert (plate.plate_rows, plate.plate_columns) == (8, 12)
    missing = "\n".join(plate.declared_missing)
    assert len(plate.declared_missing) == 4  # one line per kind
    assert "B04" in missing and "B03" not in missing
    assert "6 site(s)" in missing and "5, 6" in missing
    assert "3 (TRITC), 4 (Cy5)" in missing and "_thumb" in missing
    assert "26 z step(s)" in missing and "3, 4, 5" in missing and "and 14 more" in missing
    assert "timepoint" not in missing


def test_htd_missing_wells_are_one_capped_line(tmp_path: Path) -> None:
    write_htd(tmp_path / "P.HTD", ['"XWells", 24', '"YWells", 16',
                                   *[f'"WellsSelection{r}", ' + ", ".join(["TRUE"] * 24) for r in range(1, 17)]])
    touch(tmp_path, "P_A01_s1_w1.tif")
    plate = open_plate(tmp_path, read_headers=False)
    assert (plate.plate_rows, plate.plate_columns) == (16, 24)
    (line,) = plate.declared_missing
    assert "383 well(s)" in line and "A02" in line and "more" in line and len(line) < 300


def test_htd_copied_into_timepoint_folders_is_read_once(tmp_path: Path) -> None:
    for t in (1, 2):
        write_htd(tmp_path / f"TimePoint_{t}" / "P.HTD", ['"TimePoints", 3', '"NWavelengths", 1', '"WaveName1", "DAPI"',
                                                        '"XWells", 12', '"YWells", 8'])
        touch(tmp_path, f"TimePoint_{t}/P_A01_s1_w1.tif", f"TimePoint_{t}/P_H12_s1_w1.tif")
    plate = open_plate(tmp_path, read_headers=False)
    assert plate.channel_names == ((1, "DAPI"),)
    assert plate.declared_missing == ("P.HTD declares 3 timepoint(s); no file has timepoint 3",)
    assert (plate.plate_rows, plate.plate_columns) == (8, 12)


def test_htd_of_another_plate_is_noted(tmp_path: Path) -> None:
    write_htd(tmp_path / "P.HTD", ['"XWells", 12', '"YWells", 8',
                                   *[f'"WellsSelection{r}", ' + ", ".join(["TRUE" if r == 1 else "FALSE"] * 12)
                                     for r in range(1, 9)]])
    touch(tmp_path, "P_A01_s1_w1.tif", "P_C03_s1_w1.tif")
    plate = open_plate(tmp_path, read_headers=False)
    assert any("C03" in note and "does not select" in note for note in plate.notes)


# ------------------------------------------------------------------ errors
def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PlateError, match="nowhere.*does not exist"):
        open_plate(tmp_path / "nowhere")
    with pytest.raises(PlateError, match="does not exist"):
        read_imagexpress(tmp_path / "nowhere")


def test_folder_without_plate_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(PlateError, match=f"{tmp_path}.*looked for.*_s<site>_w<channel>"):
        open_plate(tmp_path)
    touch(tmp_path / "thumbs", "P_A01_s1_w1_thumb.tif")
    with pytest.raises(PlateError, match="no plate found"):
        open_plate(tmp_path / "thumbs")
    with pytest.raises(PlateError, match="notes.txt"):
        open_plate(tmp_path / "notes.txt")
    with pytest.raises(PlateError, match="notes.txt is a file"):
        read_imagexpress(tmp_path / "notes.txt")


def test_mixed_shapes_name_the_files(tmp_path: Path) -> None:
    write_tiff(tmp_path / "P_A01_s1_w1.tif", (16, 16))
    write_tiff(tmp_path / "P_A01_s2_w1.tif", (16, 16))
    write_tiff(tmp_path / "P_A02_s1_w1.tif", (16, 32))
    with pytest.raises(PlateError, match=r"shape.*\(16, 16\).*P_A01_s1_w1.tif.*\(16, 32\).*P_A02_s1_w1.tif"):
        open_plate(tmp_path)
    assert open_plate(tmp_path, read_headers=False).n_images == 3


def test_mixed_dtypes_name_the_files(tmp_path: Path) -> None:
    write_tiff(tmp_path / "P_A01_s1_w1.tif", (16, 16), "uint16")
    write_tiff(tmp_path / "P_A01_s1_w2.tif", (16, 16), "uint8")
    with pytest.raises(PlateError, match=r"dtype.*uint16.*P_A01_s1_w1.tif.*uint8.*P_A01_s1_w2.tif"):
        open_plate(tmp_path)


def test_corrupt_tiff_is_noted_not_fatal(tmp_path: Path) -> None:
    # One broken file must not stop a plate: the scan names it, its well fails at run time.
    write_tiff(tmp_path / "P_A01_s1_w1.tif")
    (tmp_path / "P_A01_s2_w1.tif").write_bytes(b"not a tiff at all, just text")
    plate = open_plate(tmp_path)
    assert any("damaged image" in n and "P_A01_s2_w1.tif" in n for n in plate.notes)


def test_truncated_tiff_is_noted_not_fatal(tmp_path: Path) -> None:
    write_tiff(tmp_path / "P_A01_s1_w1.tif", (64, 64))
    good = (tmp_path / "P_A01_s1_w1.tif").read_bytes()
    (tmp_path / "P_A01_s2_w1.tif").write_bytes(good[: len(good) - 100])
    plate = open_plate(tmp_path)
    assert plate.shape == (64, 64)
    assert any("P_A01_s2_w1.tif is truncated" in n for n in plate.notes)


def test_only_damaged_files_is_a_plate_error(tmp_path: Path) -> None:
    (tmp_path / "P_A01_s1_w1.tif").write_bytes(b"garbage")
    with pytest.raises(PlateError, match="P_A01_s1_w1.tif"):
        open_plate(tmp_path)


def test_compressed_tiffs_are_sampled(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for site in range(1, 41):
        image = np.zeros((32, 32), np.uint16)
        image[: site % 32 + 1] = rng.integers(0, 1000, (site % 32 + 1, 32))
        tifffile.imwrite(tmp_path / f"P_A01_s{site}_w1.tif", image, compression="zlib", metadata=None)
    plate = open_plate(tmp_path)
    assert plate.shape == (32, 32) and plate.dtype == "uint16"
    assert any("distinct file sizes" in note for note in plate.notes)


@pytest.mark.parametrize(
    ("units", "software", "expected"),
    [
        pytest.param("um", "MetaMorph", (0.5, 0.25), id="metamorph-software"),
        pytest.param("nm", "MetaSeries", (5e-4, 2.5e-4), id="nanometres"),
        pytest.param("pixel", "MetaSeries", None, id="uncalibrated"),
    ],
)
def test_pixel_size_from_metaseries_xml(tmp_path: Path, units: str, software: str, expected: object) -> None:
    description = (
        '<MetaData><PlaneInfo><prop id="spatial-calibration-x" type="float" value="0.25"/>'
        '<prop id="spatial-calibration-y" type="float" value="0.5"/>'
        f'<prop id="spatial-calibration-units" type="string" value="{units}"/></PlaneInfo></MetaData>'
    )
    write_tiff(tmp_path / "P_A01_s1_w1.tif", description=description, software=software)
    plate = open_plate(tmp_path)
    assert plate.pixel_size_um == (pytest.approx(expected) if expected else None)


# --------------------------------------------------------------- real plate
def test_real_image_laid_out_as_a_plate(tmp_path: Path) -> None:
    image = tifffile.imread(DATA / "nuclei_2d.tif")
    assert image.shape == (512, 512) and image.dtype == np.uint16
    run = tmp_path / "1003"  # a run folder, as MetaXpress exports write
    run.mkdir()
    crops = {}
    for w, well in enumerate(("C05", "C06")):
        for site in (1, 2, 3, 4):
            y, x = divmod(site - 1, 2)
            crop = image[y * 256:(y + 1) * 256, x * 256:(x + 1) * 256]
            if w:
                crop = crop[::-1]  # another well, other pixels
            name = f"2024-05-02 Real-Plate_{well}_s{site}_w1{GUID}.tif"
            tifffile.imwrite(run / name, crop, metadata=None)
            crops[(well, site)] = crop
    plate = open_plate(tmp_path)
    assert plate.name == "2024-05-02 Real-Plate"
    assert [w.name for w in plate] == ["C05", "C06"]
    assert plate.sites == (1, 2, 3, 4) and plate.channels == (1,)
    assert plate.shape == (256, 256) and plate.dtype == "uint16"
    assert plate.pixel_size_um is None  # plain TIFFs carry no calibration
    for well in plate:
        for key, path in well.files:
            np.testing.assert_array_equal(tifffile.imread(Path(plate.root) / path), crops[(key.well, key.site)])


# --------------------------------------------------------------- scan scale
def test_scan_of_twenty_thousand_files(tmp_path: Path) -> None:
    wells = [f"{row}{column:02d}" for row in "ABCDEFGH" for column in range(1, 13)]
    for z in (1, 2):
        folder = tmp_path / f"ZStep_{z}"
        folder.mkdir()
        for well in wells:
            for site in range(1, 27):
                for channel in range(1, 5):
                    # os.open rather than Path.touch: creating the files is most of this test's time.
                    os.close(os.open(f"{folder}/Screen_{well}_s{site}_w{channel}{GUID}.tif", os.O_CREAT | os.O_WRONLY))
    plate = open_plate(tmp_path, read_headers=False)
    assert plate.n_images == 2 * 96 * 26 * 4
    assert [w.name for w in plate] == wells
    assert plate.sites == tuple(range(1, 27)) and plate.channels == (1, 2, 3, 4) and plate.zs == (1, 2)
    assert plate.gaps() == []
    assert plate.well("H12").path_of(ImageKey("H12", 26, 4, 2, 1)) == f"ZStep_2/Screen_H12_s26_w4{GUID}.tif"


def test_plate_fingerprint_is_the_hash_of_the_json_index(synthetic: Path) -> None:
    # Stores written by earlier versions keep resuming: the fingerprint is still the
    # sha256 of json.dumps(description, sort_keys=True), whatever spells that text.
    import hashlib
    import json

    from hcs_dask.plate import Well

    def reference(plate: Plate) -> str:
        description = {"name": plate.name, "shape": list(plate.shape), "dtype": plate.dtype,
                       "wells": [[w.name, [[[k.site, k.channel, k.z, k.timepoint], p] for k, p in w.files]]
                                 for w in plate.wells]}
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]

    odd = Plate(name='Pl"ate é\\1', root="/r", format="imagexpress", shape=(8, 9), dtype="uint16",
                wells=(Well("A01", ((ImageKey("A01", 1, 2, 3, 4), 'dir é/"q"\\n\tz.tif'),)), Well("B02", ())))
    for plate in (open_plate(synthetic), odd):
        assert plate.fingerprint() == reference(plate)
    assert odd.fingerprint() != Plate(name=odd.name, root="/r", format="imagexpress", shape=(8, 9), dtype="uint16",
                                      wells=odd.wells[:1]).fingerprint()
