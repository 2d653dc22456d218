"""Secondary Capture: the heatmap blended over the source picture, for any viewer."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from dicom_heatmap.writers.common import PATIENT_STUDY_KEYWORDS, OutputIdentity, equipment, patient_orientation

__all__ = ["build_secondary_capture"]

#: Purpose of reference of the source image (DCM 121322).
_SOURCE_PURPOSE = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")


def build_secondary_capture(
    picture: np.ndarray,
    reference: Dataset,
    identity: OutputIdentity,
    instance_number: int,
    pixel_spacing: tuple[float, float] | None,
    series_number: int,
    series_description: str,
    row_direction: np.ndarray | None = None,
    col_direction: np.ndarray | None = None,
    source: Dataset | None = None,
    source_frame: int | None = None,
) -> hd.sc.SCImage:
    """Build the Secondary Capture of one analysed slice.

    Args:
        picture: (rows, cols, 3) uint8 rendering (overlay, grid, colour bar, arrow).
        reference: header whose Patient and Study modules the SC copies.
        identity: gives the deterministic series and instance UIDs.
        instance_number: 1-based number of the slice among the analysed slices.
        pixel_spacing: (row, col) spacing of the picture in mm, when known.
        series_number: Series Number of the result series (see :func:`result_series`).
        series_description: its Series Description.
        row_direction: patient (LPS) direction of increasing row, for Patient Orientation.
        col_direction: patient direction of increasing column.
        source: the DICOM instance the picture shows, referenced as its source.
        source_frame: the 1-based frame of a multi-frame ``source`` the picture shows.
    """
    # Argument checks
    if picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype != np.uint8:
        raise ValueError(f"picture must be (rows, cols, 3) uint8, got {picture.shape} {picture.dtype}")
    if instance_number < 1:
        raise ValueError(f"instance_number must be positive, got {instance_number}")
    if (row_direction is None) != (col_direction is None):
        raise ValueError("give both row_direction and col_direction, or neither")

    orientation = None
    if row_direction is not None:
        orientation = (patient_orientation(col_direction), patient_orientation(row_direction))
    gear = equipment()
    sc = hd.sc.SCImage(
        pixel_array=np.ascontiguousarray(picture),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=reference.StudyInstanceUID,
        series_instance_uid=identity.uid("sc-series"),
        series_number=series_number,
        sop_instance_uid=identity.uid("sc", instance_number),
        instance_number=instance_number,
        manufacturer=gear["manufacturer"],
        # highdicom demands a value and accepts single letters only (an oblique plane
        # needs "LFP"); the real value, or empty where unknown, is set below
        patient_orientation=("L", "P"),
        pixel_spacing=pixel_spacing,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    # Patient, General Study, Patient Study: the same as the source, so a PACS files it there
    if "SOPClassUID" in reference:
        sc.copy_patient_and_study_information(reference)
    else:  # a header made for a file without one: its Type 2 attributes, present and empty
        for keyword in PATIENT_STUDY_KEYWORDS:
            setattr(sc, keyword, reference.get(keyword))

    # General Image
    sc.PatientOrientation = list(orientation) if orientation is not None else None  # Type 2C
    sc.BurnedInAnnotation = "YES"  # colour bar, grid, arrow and caption are drawn in
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = "Tile tumour scores of a VGG16 13-head network blended over the source image"
    if source is not None:
        item = Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if source_frame is not None:
            item.ReferencedFrameNumber = source_frame
        item.PurposeOfReferenceCodeSequence = DicomSequence([_SOURCE_PURPOSE])
        sc.SourceImageSequence = DicomSequence([item])
    # General Series
    sc.SeriesDescription = series_description
    sc.Laterality = reference.get("Laterality") or None  # Type 2C: present, empty when unknown
    if source is not None:
        series = Dataset()
        series.SeriesInstanceUID = source.SeriesInstanceUID
        instance = Dataset()
        instance.ReferencedSOPClassUID = source.SOPClassUID
        instance.ReferencedSOPInstanceUID = source.SOPInstanceUID
        series.ReferencedInstanceSequence = DicomSequence([instance])
        sc.ReferencedSeriesSequence = DicomSequence([series])
    # General Equipment / SC Equipment: what SCImage takes no argument for
    sc.SoftwareVersions = gear["software_versions"]
    sc.ManufacturerModelName = gear["manufacturer_model_name"]
    return sc
