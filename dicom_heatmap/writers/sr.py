"""Comprehensive 3D SR with a TID 1500 measurement report of the heatmap and its spread."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from dicom_heatmap._version import __version__
from dicom_heatmap.heatmap import Heatmap
from dicom_heatmap.spread import SpreadSummary
from dicom_heatmap.writers.common import (
    ALGORITHM_NAME, MANUFACTURER, OutputIdentity, code, coding_scheme_identification,
)

__all__ = ["build_structured_report", "CONCEPTS"]


#: Names of the measurements and evaluations; standard codes where one exists.
CONCEPTS = {
    "max_score": code("DHM001", "Maximum tile tumour score"),
    "mean_score": code("DHM002", "Mean tile tumour score"),
    "analysed_tiles": code("DHM003", "Number of analysed tiles"),
    "tiles_above_threshold": code("DHM004", "Number of tiles at or above threshold"),
    "extent_area": code("DHM005", "Extent of tiles at or above threshold"),
    "threshold": code("DHM006", "Tumour score threshold"),
    "angle": code("DHM007", "Spread direction angle in image plane"),
    "direction_x": code("DHM008", "Spread direction vector x component"),
    "direction_y": code("DHM009", "Spread direction vector y component"),
    "direction_z": code("DHM010", "Spread direction vector z component"),
    "directedness": code("DHM011", "Spread directedness"),
    "reach": code("DHM012", "Spread reach from focus"),
    "focus_score": code("DHM013", "Focus tile tumour score"),
    "direction": code("DHM014", "Spread direction"),
    "main_direction": code("DHM015", "Main anatomical spread direction"),
    "lesion_tiles": code("DHM016", "Number of tiles of the lesion"),
    "lesion_area": code("DHM017", "Extent of the lesion"),
    "input_domain": code("DHM018", "Input outside the model's training domain"),
    "lesion_patches": code("DHM019", "Number of model patches of the lesion"),
}
#: The SR carries one group for each lesion up to this many, the dominant first (result.json lists all)
MAX_REPORTED_LESIONS = 20
_ANATOMICAL = {
    "left": hd.sr.CodedConcept("7771000", "SCT", "Left"),
    "right": hd.sr.CodedConcept("24028007", "SCT", "Right"),
    "anterior": hd.sr.CodedConcept("255549009", "SCT", "Anterior"),
    "posterior": hd.sr.CodedConcept("255551008", "SCT", "Posterior"),
    "superior": hd.sr.CodedConcept("264217000", "SCT", "Superior"),
    "inferior": hd.sr.CodedConcept("261089000", "SCT", "Inferior"),
}
_NEOPLASM = hd.sr.CodedConcept("108369006", "SCT", "Neoplasm")
_IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
_UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")


def _unit(symbol: str) -> hd.sr.CodedConcept:
    meanings = {"mm": "millimeter", "mm2": "square millimeter", "mm3": "cubic millimeter", "deg": "degree",
                "{tiles}": "tiles", "{patches}": "patches", "{px}": "pixels", "{px2}": "square pixels", "{px3}": "cubic pixels"}
    return hd.sr.CodedConcept(symbol, "UCUM", meanings[symbol])


def _number(value: float) -> float:
    """Round so that the DS value fits 16 characters."""
    return float(np.format_float_positional(float(value), precision=6, trim="-"))


def build_structured_report(
    heatmap: Heatmap,
    summary: SpreadSummary,
    identity: OutputIdentity,
    model_checksum: str,
    evidence_sources: list[Dataset],
    secondary_captures: list[Dataset],
    sc_scale: float,
    parametric_map: Dataset,
    frame_of_reference_uid: str | None,
    series_number: int,
    series_description: str,
    domain_warning: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 report.

    Args:
        heatmap: the scores.
        summary: the spread analysis.
        identity: gives the deterministic UIDs.
        model_checksum: sha256 of the model, named in the algorithm identification.
        evidence_sources: the DICOM source instances (empty for slide files and pictures).
        secondary_captures: the SC of each analysed slice, in slice order.
        sc_scale: scale of the SC pictures against the analysed image (below 1 when
            shown smaller, above 1 when enlarged).
        parametric_map: the Parametric Map of the scores.
        frame_of_reference_uid: the source's, for 3D coordinates; None places the focus
            on the Secondary Capture instead.
        series_number: Series Number of the report's series (see :func:`result_series`).
        series_description: its Series Description.
        domain_warning: why the scores are no findings (an input outside the model's
            training domain), coded in the heatmap group; None when the input is inside it.
    """
    # Argument checks
    if len(secondary_captures) != heatmap.scores.shape[0]:
        raise ValueError(f"secondary_captures must hold one SC per slice ({heatmap.scores.shape[0]}), got {len(secondary_captures)}")
    if not sc_scale > 0:
        raise ValueError(f"sc_scale must be positive, got {sc_scale}")

    stats = heatmap.statistics(summary.threshold)
    spatial = summary.unit == "mm"
    dimension = 3 if heatmap.scores.shape[0] > 1 else 2
    algorithm = hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME,
        version=__version__,
        parameters=[f"model sha256 {model_checksum}", f"pydicom {pydicom.__version__}", f"highdicom {hd.__version__}"],
    )

    def measure(key: str, value: float, unit: hd.sr.CodedConcept = _UNITLESS) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=CONCEPTS[key], value=_number(value), unit=unit, algorithm_id=algorithm)

    measurements = [
        measure("analysed_tiles", stats["analysed_tiles"], _unit("{tiles}")),
        measure("threshold", summary.threshold),
        measure("tiles_above_threshold", stats["tiles_above_threshold"], _unit("{tiles}")),
    ]
    area_unit = _unit(("mm" if spatial else "{px") + ("3" if dimension == 3 else "2") + ("" if spatial else "}"))
    length_unit = _unit("mm" if spatial else "{px}")
    if stats["analysed_tiles"]:
        measurements += [
            measure("max_score", stats["max_score"]),
            measure("mean_score", stats["mean_score"]),
            measure("extent_area", summary.extent_area, area_unit),
        ]
    direction_measurements, evaluations = _direction_items(summary.to_dict(), summary.frame, measure, length_unit)
    if stats["analysed_tiles"]:
        measurements += direction_measurements
    if domain_warning:
        evaluations.append(hd.sr.QualitativeEvaluation(CONCEPTS["input_domain"], code("DHM-OUTSIDE", "H&E breast slide model: scores here are no findings")))

    image_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.uid("tracking", "image"), identifier="Tumour heatmap"),
        finding_type=_NEOPLASM,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        # the map is referenced as an image: TID 1501's "Real World Value Map" item
        # must point at a Real World Value Mapping object, which a Parametric Map is not
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in [*secondary_captures, parametric_map]],
    )
    groups: list = [image_group]
    if summary.focus_index is not None:
        groups.append(_focus_group(heatmap, summary, identity, algorithm, secondary_captures, sc_scale, frame_of_reference_uid))
    for number, lesion in enumerate(summary.lesions[:MAX_REPORTED_LESIONS], start=1):
        lesion_measurements, lesion_evaluations = _direction_items(lesion, summary.frame, measure, length_unit)
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.uid("tracking", f"lesion-{number}"),
                                                         identifier=f"Lesion {number} of {len(summary.lesions)}"),
            referenced_region=_tile_region(heatmap, lesion["focus_index"], secondary_captures, sc_scale, frame_of_reference_uid),
            finding_type=_NEOPLASM,
            algorithm_id=algorithm,
            # read on the model's patches where they were scored (the spread module's note)
            measurements=[measure(*(("lesion_patches", lesion["tiles"], _unit("{patches}")) if heatmap.patches is not None
                                    else ("lesion_tiles", lesion["tiles"], _unit("{tiles}")))),
                          measure("lesion_area", lesion["area"], area_unit), *lesion_measurements],
            qualitative_evaluations=lesion_evaluations,
        ))
    if summary.lesion_ellipsoid is not None and frame_of_reference_uid is not None and heatmap.scores.shape[0] > 1:
        groups.append(_lesion_group(summary, identity, algorithm, evidence_sources, frame_of_reference_uid))

    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=_IMAGING_PROCEDURE,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*evidence_sources, *secondary_captures, parametric_map],
        content=report,
        series_instance_uid=identity.uid("sr-series"),
        series_number=series_number,
        sop_instance_uid=identity.uid("sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
    )
    # SR Document General / SOP Common: declare the private coding scheme
    sr.CodingSchemeIdentificationSequence = DicomSequence([coding_scheme_identification()])
    # General Series
    sr.SeriesDescription = series_description
    # General Equipment
    sr.SoftwareVersions = __version__
    return sr


def _direction_items(found: dict, frame: str, measure, length_unit) -> tuple[list, list]:
    """Directedness, direction vector, angle and reach (measurements) and the direction in
    words (evaluations) of the whole summary or of one lesion (the keys they share)."""
    measurements = [measure("directedness", found["directedness"])]
    if found["directed"]:
        for axis, value in zip("xyz", found["direction_frame"]):
            measurements.append(measure(f"direction_{axis}", value))
        if found["angle_deg"] is not None:
            measurements.append(measure("angle", found["angle_deg"], _unit("deg")))
        measurements.append(measure("reach", found["reach"], length_unit))
    words = found["words"] if found["directed"] else "none"
    evaluations = [
        hd.sr.QualitativeEvaluation(
            CONCEPTS["direction"],
            code("DIR-" + words.upper(), f"spread toward {words}" if found["directed"] else "no dominant spread direction"),
        )
    ]
    if found["directed"] and frame == "PATIENT" and words.split("-")[0] in _ANATOMICAL:
        evaluations.append(hd.sr.QualitativeEvaluation(CONCEPTS["main_direction"], _ANATOMICAL[words.split("-")[0]]))
    return measurements, evaluations


def _lesion_group(summary, identity, algorithm, evidence_sources, frame_of_reference_uid):
    """TID 1411 group: the lesion of a volume as an ellipsoid (SCOORD3D) and its volume."""
    centre = np.array(summary.lesion_ellipsoid["centre"])
    axes = [np.array(a) for a in summary.lesion_ellipsoid["axes"]]
    # ELLIPSOID: the two end points of each of the three axes, longest first
    points = np.array([p for axis in axes for p in (centre - axis, centre + axis)])
    series = evidence_sources[0].SeriesInstanceUID
    surface = hd.sr.VolumeSurface(
        graphic_type="ELLIPSOID",
        graphic_data=points.round(4),
        frame_of_reference_uid=frame_of_reference_uid,
        source_series=hd.sr.SourceSeriesForSegmentation(series),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.uid("tracking", "lesion"), identifier="Lesion"),
        referenced_volume_surface=surface,
        finding_type=_NEOPLASM,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=CONCEPTS["extent_area"], value=_number(summary.extent_area), unit=_unit("mm3"), algorithm_id=algorithm),
            hd.sr.Measurement(name=CONCEPTS["tiles_above_threshold"], value=_number(summary.lesion_tiles), unit=_unit("{tiles}"),
                              algorithm_id=algorithm),
        ],
    )


def _tile_region(heatmap, index, secondary_captures, sc_scale, frame_of_reference_uid):
    """The outline of tile (slice, row, col): in patient coordinates (3D) where the source
    has a frame of reference, else on the slice's Secondary Capture."""
    s, r, c = index
    if frame_of_reference_uid is not None and heatmap.frame == "PATIENT":
        corners_index = [(s, r - 0.5, c - 0.5), (s, r - 0.5, c + 0.5), (s, r + 0.5, c + 0.5), (s, r + 0.5, c - 0.5), (s, r - 0.5, c - 0.5)]
        points = np.array([heatmap.centre(p) for p in corners_index])
        return hd.sr.ImageRegion3D(graphic_type="POLYGON", graphic_data=points.round(4), frame_of_reference_uid=frame_of_reference_uid)
    grid = heatmap.grid
    top, left, bottom, right = grid.row_edges[r], grid.col_edges[c], grid.row_edges[r + 1], grid.col_edges[c + 1]
    outline = np.array([(left, top), (right, top), (right, bottom), (left, bottom), (left, top)], dtype=float) * sc_scale
    return hd.sr.ImageRegion(
        graphic_type="POLYLINE",
        graphic_data=outline.round(3),
        source_image=hd.sr.SourceImageForRegion.from_source_image(secondary_captures[s]),
    )


def _focus_group(heatmap, summary, identity, algorithm, secondary_captures, sc_scale, frame_of_reference_uid):
    """TID 1410 group: the focus tile's outline and its score."""
    s, r, c = summary.focus_index
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.uid("tracking", "focus"), identifier="Focus tile"),
        referenced_region=_tile_region(heatmap, summary.focus_index, secondary_captures, sc_scale, frame_of_reference_uid),
        finding_type=_NEOPLASM,
        algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(name=CONCEPTS["focus_score"], value=_number(heatmap.scores[s, r, c]), unit=_UNITLESS, algorithm_id=algorithm)],
    )
