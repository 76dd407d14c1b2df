"""Where a synthetic plate's images go, and the vendor metadata files beside them.

One class per format: its file names, its folders, and its metadata documents
(ImageXpress ``.HTD`` and MetaSeries TIFF descriptions; Harmony ``Index.idx.xml``;
CellVoyager ``MeasurementData.mlf``, ``MeasurementDetail.mrf`` and the ``.mes``
protocol), built from the plate's parameters alone so that they list exactly
the images that :mod:`hcs_dask.formats.synthetic` writes.
"""

from __future__ import annotations

import hashlib
import math
import uuid
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

from hcs_dask.formats.cellvoyager import MEASUREMENT_DATA, MEASUREMENT_DETAIL, NAMESPACE
from hcs_dask.plate import row_index, split_well_name

__all__ = ["PlateSpec", "ImageXpressLayout", "OperaPhenixLayout", "CellVoyagerLayout", "LAYOUTS",
           "field_position_um", "wave_name", "PIXEL_SIZE_UM", "Z_STEP_UM"]

PIXEL_SIZE_UM = 0.65
Z_STEP_UM = 2.0
_WAVE_NAMES = ("DAPI", "FITC", "TRITC", "Cy5")
_WAVELENGTHS_NM = (452, 520, 590, 670)
#: Distance between neighbouring well centres on a 96-well plate, in µm.
_WELL_PITCH_UM = 9000.0
_HARMONY = "http://www.perkinelmer.com/PEHH/HarmonyV6"


@dataclass(frozen=True)
class PlateSpec:
    """The parameters of a synthetic plate that its file names and metadata depend on."""

    wells: tuple[str, ...]
    rows: int
    columns: int
    sites: int
    channels: int
    z: int
    timepoints: int
    size: int
    prefix: str
    seed: int
    mixed_depth: bool = False

    def planes(self, channel: int) -> range:
        """The z planes written for ``channel`` (with ``mixed_depth``: the last channel has one,
        the one before it none, being only a projection)."""
        if self.mixed_depth and channel == self.channels:
            return range(1, 2)
        if self.mixed_depth and channel == self.channels - 1:
            return range(0)
        return range(1, self.z + 1)

    def projected(self, channel: int) -> bool:
        """Whether a maximum projection of ``channel`` is written beside the ``ZStep_`` folders."""
        return self.mixed_depth and channel < self.channels

    def grid(self) -> tuple[int, int]:
        """``(y_sites, x_sites)``: the fields of a well on a grid, row-major."""
        y_sites = max(1, math.isqrt(self.sites))
        return y_sites, math.ceil(self.sites / y_sites)


def wave_name(channel: int) -> str:
    return _WAVE_NAMES[channel - 1] if channel <= len(_WAVE_NAMES) else f"w{channel}"


def _wavelength(channel: int) -> int:
    return _WAVELENGTHS_NM[channel - 1] if channel <= len(_WAVELENGTHS_NM) else 700 + 50 * channel


def field_position_um(spec: PlateSpec, site: int) -> tuple[float, float]:
    """``(y, x)`` of field ``site`` relative to its well's centre, fields touching on a grid (y down)."""
    y_sites, x_sites = spec.grid()
    gy, gx = divmod(site - 1, x_sites)
    step = spec.size * PIXEL_SIZE_UM
    return (round((gy - (y_sites - 1) / 2) * step, 3), round((gx - (x_sites - 1) / 2) * step, 3))


def _guid(seed: int, *parts: object) -> str:
    """A GUID that depends only on the seed and the parts, as MetaXpress appends one per file."""
    digest = hashlib.blake2b("/".join(str(p) for p in (seed, *parts)).encode(), digest_size=16).digest()
    return str(uuid.UUID(bytes=digest)).upper()


def _xml(root: ElementTree.Element) -> bytes:
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


def _child(parent: ElementTree.Element, tag: str, text: object = None, **attributes: str) -> ElementTree.Element:
    element = ElementTree.SubElement(parent, tag, attributes)
    if text is not None:
        element.text = str(text)
    return element


# ------------------------------------------------------------------ ImageXpress
class ImageXpressLayout:
    """``[TimePoint_<t>/][ZStep_<z>/]<prefix>_<well>_s<site>_w<channel><GUID>.tif`` and ``<prefix>.HTD``."""

    name = "imagexpress"
    software = "MetaSeries"

    def __init__(self, spec: PlateSpec) -> None:
        self.spec = spec

    def _folder(self, t: int, zi: int | None) -> str:
        folder = f"TimePoint_{t}/" if self.spec.timepoints > 1 else ""
        if self.spec.z > 1 and zi is not None:
            folder += f"ZStep_{zi}/"
        return folder

    def folders(self) -> list[str]:
        return sorted({self._folder(t, zi) for t in range(1, self.spec.timepoints + 1)
                       for zi in (None, *range(1, self.spec.z + 1))} - {""})

    def _stem(self, well: str, site: int, channel: int) -> str:
        stem = f"{self.spec.prefix}_{well}" if self.spec.prefix else well
        return f"{stem}_s{site}_w{channel}"

    def plane(self, well: str, site: int, channel: int, zi: int, t: int) -> str:
        guid = _guid(self.spec.seed, well, site, channel, zi, t)
        return f"{self._folder(t, zi)}{self._stem(well, site, channel)}{guid}.tif"

    def projection(self, well: str, site: int, channel: int, t: int) -> str:
        guid = _guid(self.spec.seed, well, site, channel, "projection", t)
        return f"{self._folder(t, None)}{self._stem(well, site, channel)}{guid}.tif"

    def thumb(self, well: str, site: int, channel: int, t: int) -> str:
        guid = _guid(self.spec.seed, well, site, channel, "thumb", t)
        return f"{self._folder(t, None)}{self._stem(well, site, channel)}_thumb{guid}.tif"

    def description(self, well: str, site: int, channel: int, zi: int | None, itemsize: int) -> str:
        """MetaSeries XML, as MetaXpress writes into every TIFF's ImageDescription."""
        wave = wave_name(channel)
        props = [
            ("pixel-size-x", "int", self.spec.size),
            ("pixel-size-y", "int", self.spec.size),
            ("bits-per-pixel", "int", 8 * itemsize),
            ("spatial-calibration-state", "bool", "on"),
            ("spatial-calibration-x", "float", PIXEL_SIZE_UM),
            ("spatial-calibration-y", "float", PIXEL_SIZE_UM),
            ("spatial-calibration-units", "string", "um"),
            ("image-name", "string", wave),
            ("stage-label", "string", f"{well} : Site {site}"),
            ("z-position", "float", round(((zi or 1) - 1) * Z_STEP_UM, 3)),
            ("wavelength", "float", _wavelength(channel)),
            ("_IllumSetting_", "string", wave),
        ]
        plane = "".join(f'<prop id="{i}" type="{t}" value="{v}"/>\r\n' for i, t, v in props)
        return (
            "<MetaData>\r\n"
            '<prop id="Description" type="string" value="synthetic image written by hcs_dask"/>\r\n'
            '<prop id="MetaDataVersion" type="float" value="1"/>\r\n'
            f"<PlaneInfo>\r\n{plane}</PlaneInfo>\r\n"
            '<SetInfo>\r\n<prop id="number-of-planes" type="int" value="1"/>\r\n</SetInfo>\r\n'
            "</MetaData>"
        )

    def metadata(self) -> dict[str, bytes]:
        spec = self.spec

        def flags(count: int, total: int) -> str:
            return ", ".join("TRUE" if i < count else "FALSE" for i in range(total))

        y_sites, x_sites = spec.grid()
        lines = [
            '"HTSInfoFile", Version 1.0',
            '"Description", "Synthetic plate written by hcs_dask"',
            '"PlateType", 6',
            f'"TimePoints", {spec.timepoints}',
            f'"ZSeries", {"TRUE" if spec.z > 1 else "FALSE"}',
            f'"ZSteps", {spec.z}',
            f'"ZProjection", {"TRUE" if spec.mixed_depth else "FALSE"}',
            f'"XWells", {spec.columns}',
            f'"YWells", {spec.rows}',
        ]
        n = len(spec.wells)
        lines += [f'"WellsSelection{r + 1}", {flags(n - r * spec.columns, spec.columns)}' for r in range(spec.rows)]
        lines += [f'"Sites", {"TRUE" if spec.sites > 1 else "FALSE"}', f'"XSites", {x_sites}', f'"YSites", {y_sites}']
        lines += [f'"SiteSelection{r + 1}", {flags(spec.sites - r * x_sites, x_sites)}' for r in range(y_sites)]
        lines += ['"Waves", TRUE', f'"NWavelengths", {spec.channels}']
        lines += [f'"WaveName{c}", "{wave_name(c)}"' for c in range(1, spec.channels + 1)]
        lines += [f'"WaveCollect{c}", 1' for c in range(1, spec.channels + 1)]
        lines += [f'"UniquePlateIdentifier", "{_guid(spec.seed, "plate")}"', '"EndFile"']
        return {f"{spec.prefix or 'plate'}.HTD": ("\r\n".join(lines) + "\r\n").encode("ascii")}


# --------------------------------------------------------------- Opera Phenix
class OperaPhenixLayout:
    """``Images/r<RR>c<CC>f<FF>p<PP>-ch<C>sk<T>fk1fl1.tiff`` and ``Images/Index.idx.xml`` (Harmony 6 style)."""

    name = "operaphenix"
    software = None

    def __init__(self, spec: PlateSpec) -> None:
        self.spec = spec

    def folders(self) -> list[str]:
        return ["Images/"]

    def plane(self, well: str, site: int, channel: int, zi: int, t: int) -> str:
        row, column = split_well_name(well)
        return f"Images/r{row_index(row) + 1:02d}c{column:02d}f{site:02d}p{zi:02d}-ch{channel}sk{t}fk1fl1.tiff"

    def description(self, well: str, site: int, channel: int, zi: int | None, itemsize: int) -> str | None:
        return None

    def metadata(self) -> dict[str, bytes]:
        spec = self.spec
        ns = f"{{{_HARMONY}}}"
        ElementTree.register_namespace("", _HARMONY)
        root = ElementTree.Element(f"{ns}EvaluationInputData", {"Version": "2"})
        _child(root, f"{ns}User", "hcs_dask")
        _child(root, f"{ns}InstrumentType", "Phenix")
        plate = _child(_child(root, f"{ns}Plates"), f"{ns}Plate")
        _child(plate, f"{ns}PlateID", spec.prefix or "plate")
        _child(plate, f"{ns}MeasurementID", _guid(spec.seed, "measurement"))
        _child(plate, f"{ns}MeasurementStartTime", "2024-05-02T10:00:00+00:00")
        _child(plate, f"{ns}Name", spec.prefix or "plate")
        _child(plate, f"{ns}PlateTypeName", f"{spec.rows * spec.columns} PerkinElmer CellCarrier Ultra")
        _child(plate, f"{ns}PlateRows", spec.rows)
        _child(plate, f"{ns}PlateColumns", spec.columns)
        for well in spec.wells:
            row, column = split_well_name(well)
            _child(plate, f"{ns}Well", id=f"{row_index(row) + 1:02d}{column:02d}")
        wells = _child(root, f"{ns}Wells")
        for well in spec.wells:
            row, column = split_well_name(well)
            entry = _child(wells, f"{ns}Well")
            _child(entry, f"{ns}id", f"{row_index(row) + 1:02d}{column:02d}")
            _child(entry, f"{ns}Row", row_index(row) + 1)
            _child(entry, f"{ns}Col", column)
        maps = _child(_child(root, f"{ns}Maps"), f"{ns}Map")
        for channel in range(1, spec.channels + 1):
            entry = _child(maps, f"{ns}Entry", ChannelID=str(channel))
            _child(entry, f"{ns}ChannelName", wave_name(channel))
            _child(entry, f"{ns}ImageType", "Signal")
            _child(entry, f"{ns}AcquisitionType", "NipkowConfocal")
            _child(entry, f"{ns}ChannelType", "Fluorescence")
            _child(entry, f"{ns}ImageResolutionX", f"{PIXEL_SIZE_UM * 1e-6:.6E}", Unit="m")
            _child(entry, f"{ns}ImageResolutionY", f"{PIXEL_SIZE_UM * 1e-6:.6E}", Unit="m")
            _child(entry, f"{ns}ImageSizeX", spec.size)
            _child(entry, f"{ns}ImageSizeY", spec.size)
            _child(entry, f"{ns}BinningX", 2)
            _child(entry, f"{ns}BinningY", 2)
            _child(entry, f"{ns}MainExcitationWavelength", _wavelength(channel) - 50, Unit="nm")
            _child(entry, f"{ns}MainEmissionWavelength", _wavelength(channel), Unit="nm")
            _child(entry, f"{ns}ObjectiveMagnification", 20, Unit="")
            _child(entry, f"{ns}ObjectiveNA", "0.8", Unit="")
            _child(entry, f"{ns}ExposureTime", "0.1", Unit="s")
        images = _child(root, f"{ns}Images")
        for well in spec.wells:
            row, column = split_well_name(well)
            for site in range(1, spec.sites + 1):
                y_um, x_um = field_position_um(spec, site)
                for t in range(1, spec.timepoints + 1):
                    for channel in range(1, spec.channels + 1):
                        for zi in range(1, spec.z + 1):
                            url = self.plane(well, site, channel, zi, t).removeprefix("Images/")
                            image = _child(images, f"{ns}Image", Version="1")
                            _child(image, f"{ns}id", url.removesuffix(".tiff"))
                            _child(image, f"{ns}State", "Ok")
                            _child(image, f"{ns}URL", url)
                            _child(image, f"{ns}Row", row_index(row) + 1)
                            _child(image, f"{ns}Col", column)
                            _child(image, f"{ns}FieldID", site)
                            _child(image, f"{ns}PlaneID", zi)
                            _child(image, f"{ns}TimepointID", t - 1)
                            _child(image, f"{ns}ChannelID", channel)
                            _child(image, f"{ns}FlimID", 1)
                            _child(image, f"{ns}PositionX", f"{x_um * 1e-6:.6E}", Unit="m")
                            _child(image, f"{ns}PositionY", f"{y_um * 1e-6:.6E}", Unit="m")
                            _child(image, f"{ns}PositionZ", f"{(zi - 1) * Z_STEP_UM * 1e-6:.6E}", Unit="m")
                            _child(image, f"{ns}MeasurementTimeOffset", (t - 1) * 600, Unit="s")
        return {"Images/Index.idx.xml": _xml(root)}


# ---------------------------------------------------------------- CellVoyager
class CellVoyagerLayout:
    """``<prefix>_<well>_T<t>F<f>L01A01Z<z>C<c>.tif``, ``MeasurementData.mlf``, ``MeasurementDetail.mrf``, ``<prefix>.mes``."""

    name = "cellvoyager"
    software = None

    def __init__(self, spec: PlateSpec) -> None:
        self.spec = spec

    def folders(self) -> list[str]:
        return []

    def plane(self, well: str, site: int, channel: int, zi: int, t: int) -> str:
        return f"{self.spec.prefix or 'plate'}_{well}_T{t:04d}F{site:03d}L01A01Z{zi:02d}C{channel:02d}.tif"

    def description(self, well: str, site: int, channel: int, zi: int | None, itemsize: int) -> str | None:
        return None

    def stage_position(self, well: str, site: int) -> tuple[float, float]:
        """``(X, Y)`` of the field as the ``.mlf`` records it: absolute stage µm, y up."""
        row, column = split_well_name(well)
        y_um, x_um = field_position_um(self.spec, site)
        return (round((column - 1) * _WELL_PITCH_UM + x_um, 1),
                round(-(row_index(row) * _WELL_PITCH_UM + y_um), 1) + 0.0)

    def metadata(self) -> dict[str, bytes]:
        spec = self.spec
        bts = f"{{{NAMESPACE}}}"
        ElementTree.register_namespace("bts", NAMESPACE)
        protocol = f"{spec.prefix or 'plate'}.mes"

        data = ElementTree.Element(f"{bts}MeasurementData", {f"{bts}Version": "1.0"})
        for well in spec.wells:
            row, column = split_well_name(well)
            for t in range(1, spec.timepoints + 1):
                for site in range(1, spec.sites + 1):
                    x, y = self.stage_position(well, site)
                    for channel in range(1, spec.channels + 1):
                        for zi in range(1, spec.z + 1):
                            _child(data, f"{bts}MeasurementRecord", self.plane(well, site, channel, zi, t), **{
                                f"{bts}Type": "IMG", f"{bts}Time": f"2024-05-02T10:{site:02d}:{zi:02d}.000+02:00",
                                f"{bts}Column": str(column), f"{bts}Row": str(row_index(row) + 1),
                                f"{bts}TimePoint": str(t), f"{bts}FieldIndex": str(site), f"{bts}ZIndex": str(zi),
                                f"{bts}TimelineIndex": "1", f"{bts}ActionIndex": "1",
                                f"{bts}Action": "3D" if spec.z > 1 else "2D",
                                f"{bts}X": str(x), f"{bts}Y": str(y), f"{bts}Z": str(round((zi - 1) * Z_STEP_UM, 3)),
                                f"{bts}Ch": str(channel)})
        # Real measurements hold autofocus failures as ERR records, which name no image.
        _child(data, f"{bts}MeasurementRecord", "AF failed", **{
            f"{bts}Type": "ERR", f"{bts}Time": "2024-05-02T10:59:59.000+02:00", f"{bts}Column": "1", f"{bts}Row": "1"})

        detail = ElementTree.Element(f"{bts}MeasurementDetail", {
            f"{bts}Version": "1.0", f"{bts}OperatorName": "hcs_dask", f"{bts}Title": spec.prefix or "plate",
            f"{bts}Application": "", f"{bts}BeginTime": "2024-05-02T10:00:00.000+02:00",
            f"{bts}EndTime": "2024-05-02T11:00:00.000+02:00", f"{bts}MeasurementSettingFileName": protocol,
            f"{bts}ColumnCount": str(spec.columns), f"{bts}RowCount": str(spec.rows),
            f"{bts}TimePointCount": str(spec.timepoints), f"{bts}FieldCount": str(spec.sites),
            f"{bts}ZCount": str(spec.z), f"{bts}TargetSystem": "CV8000", f"{bts}ReleaseNumber": "R1.17.05"})
        _child(detail, f"{bts}MeasurementSamplePlate", **{
            f"{bts}Name": spec.prefix or "plate", f"{bts}WellPlateFileName": f"{spec.prefix or 'plate'}.wpi",
            f"{bts}WellPlateProductFileName": f"{spec.rows * spec.columns}_synthetic.wpp"})
        for channel in range(1, spec.channels + 1):
            _child(detail, f"{bts}MeasurementChannel", **{
                f"{bts}Ch": str(channel), f"{bts}HorizontalPixelDimension": str(PIXEL_SIZE_UM),
                f"{bts}VerticalPixelDimension": str(PIXEL_SIZE_UM), f"{bts}CameraNumber": "1",
                f"{bts}InputBitDepth": "16", f"{bts}InputLevel": "1000", f"{bts}HorizontalPixels": str(spec.size),
                f"{bts}VerticalPixels": str(spec.size), f"{bts}FilterWheelPosition": str(channel),
                f"{bts}FilterPosition": str(channel), f"{bts}ShadingCorrectionSource": ""})

        setting = ElementTree.Element(f"{bts}MeasurementSetting", {f"{bts}Version": "1.0", f"{bts}ProductID": "10"})
        channels = _child(setting, f"{bts}ChannelList")
        for channel in range(1, spec.channels + 1):
            _child(channels, f"{bts}Channel", **{
                f"{bts}Ch": str(channel), f"{bts}Target": wave_name(channel), f"{bts}Objective": "20x",
                f"{bts}Magnification": "20", f"{bts}ExposureTime": "100", f"{bts}Kind": "ConfocalFluorescence"})
        return {MEASUREMENT_DATA: _xml(data), MEASUREMENT_DETAIL: _xml(detail), protocol: _xml(setting)}


LAYOUTS = {layout.name: layout for layout in (ImageXpressLayout, OperaPhenixLayout, CellVoyagerLayout)}
