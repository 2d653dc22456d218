"""DICOM Segmentation of the lesions, on the source images' own pixels.

One binary segment per lesion (the dominant first), each the pixels of its tiles, so
viewers that overlay a SEG on its source series (OHIF, 3D Slicer, a PACS viewer) show it
where the heatmap found it. Written only when the analysed image is the source's pixel
grid (no crop, zoom or rotation): a CT/MR series or image, or a DICOM whole-slide image
with its own slide coordinates.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import VLWholeSlideMicroscopyImageStorage
from pydicom.sr.codedict import codes

from dicom_heatmap._version import __version__
from dicom_heatmap.heatmap import Heatmap
from dicom_heatmap.writers.common import ALGORITHM_NAME, OutputIdentity, equipment

__all__ = ["build_segmentation", "pixel_mask"]


def pixel_mask(heatmap: Heatmap, tiles: np.ndarray) -> np.ndarray:
    """(slices, rows, cols) boolean pixels of the tiles set in ``tiles`` (slices, R, C)."""
    grid = heatmap.grid
    rows = np.repeat(np.arange(len(grid.row_edges) - 1), np.diff(grid.row_edges))
    cols = np.repeat(np.arange(len(grid.col_edges) - 1), np.diff(grid.col_edges))
    return tiles[:, rows][:, :, cols]


def build_segmentation(heatmap: Heatmap, lesions: list[np.ndarray], sources: list[Dataset], identity: OutputIdentity,
                       series_number: int, series_description: str) -> hd.seg.Segmentation | None:
    """The lesions as a binary Segmentation of ``sources``; None without a lesion.

    Args:
        heatmap: the scores on the sources' pixel grid (one slice per source, in order).
        lesions: boolean tile masks of the lesions, dominant first.
        sources: the source images (headers), one per slice of the heatmap.
        identity: gives the deterministic UIDs.
        series_number: Series Number of the segmentation's series.
        series_description: its Series Description.
    """
    if len(sources) != heatmap.scores.shape[0]:
        raise ValueError(f"sources must hold one image per slice ({heatmap.scores.shape[0]}), got {len(sources)}")
    if not lesions:
        return None
    algorithm = hd.AlgorithmIdentificationSequence(name=ALGORITHM_NAME, version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=index + 1,
            segment_label=f"Lesion {index + 1}" + (" (dominant)" if index == 0 else ""),
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for index in range(len(lesions))
    ]
    # labels: each pixel the number of its lesion (lesions do not overlap), 0 elsewhere
    labels = np.zeros(pixel_mask(heatmap, lesions[0]).shape, dtype=np.uint8)
    for index, lesion in enumerate(lesions):
        labels[pixel_mask(heatmap, lesion)] = index + 1
    # a whole-slide image: the mask is its total pixel matrix, cut into highdicom's tiles,
    # each placed in the slide's coordinates
    tiled = {}
    if sources[0].get("SOPClassUID") == VLWholeSlideMicroscopyImageStorage:
        measures = sources[0].SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        tiled = {"tile_pixel_array": True, "dimension_organization_type": "TILED_SPARSE",
                 # slide images often omit Slice Thickness, which the SEG's pixel measures need
                 "pixel_measures": hd.PixelMeasuresSequence(pixel_spacing=[float(v) for v in measures.PixelSpacing],
                                                            slice_thickness=float(measures.get("SliceThickness") or 0.001))}
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labels if len(sources) > 1 else labels[0],
        **tiled,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=identity.uid("seg-series"),
        series_number=series_number,
        sop_instance_uid=identity.uid("seg"),
        instance_number=1,
        **equipment(),
        content_description="Lesion tiles of the tumour heatmap (research use only)",
        omit_empty_frames=False,
    )
    # General Series
    seg.SeriesDescription = series_description
    # General Image: Type 2C, present and empty where the source has none (slides)
    if "PatientOrientation" not in seg:
        seg.PatientOrientation = sources[0].get("PatientOrientation") or None
    if tiled:
        _orientation_for_gdcm(seg)
    return seg


def _orientation_for_gdcm(seg: hd.seg.Segmentation) -> None:
    """Add a shared Plane Orientation (Patient) with the cosines of Image Orientation (Slide).

    GDCM, which Orthanc's GDCM plugin renders with, computes a Segmentation's slice spacing
    from its Pixel Measures and then requires Plane Orientation (Patient); a slide SEG
    states only Image Orientation (Slide), and GDCM's assertion (left on in Debian 12's
    build) aborts the whole archive at ``/instances/{id}/preview`` - highdicom's own slide
    SEG does the same. The macro is allowed in a Segmentation and repeats the orientation
    the SEG already states, in its own frame of reference; dciodvfy accepts it and readers
    of slide coordinates (highdicom, slide viewers) go by Image Orientation (Slide).
    """
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(seg.ImageOrientationSlide)
    seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = [orientation]
