"""Parametric Map: the float tile scores on the tile grid, with the grid's geometry."""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import VLWholeSlideMicroscopyImageStorage

from dicom_heatmap.heatmap import Heatmap
from dicom_heatmap.errors import is_uid
from dicom_heatmap.writers.common import OutputIdentity, equipment
from transforms.io.dicom import slice_thickness

__all__ = ["build_parametric_map", "geometry_carrier", "on_slide"]



def geometry_carrier(image: Dataset, pixel_affine: np.ndarray, scale: float, identity: OutputIdentity) -> Dataset:
    """A copy of a picture's header that states its pixel geometry in a frame of its own.

    Slide files and pictures have no DICOM frame of reference; the Parametric Map still
    needs one to place its tiles. The carrier lends the Secondary Capture's identity and
    size and adds a Frame of Reference (derived UID) in which x runs along columns and y
    along rows in mm of the slide (or pixels when unknown). It is never written.

    Args:
        image: the Secondary Capture the map is laid over.
        pixel_affine: 4x4 map of the analysed image's pixel index to position.
        scale: the Secondary Capture's pixels per analysed-image pixel.
        identity: gives the frame of reference UID.
    """
    carrier = copy.deepcopy(image)
    carrier.FrameOfReferenceUID = identity.uid("frame-of-reference")
    carrier.SliceThickness = 1.0  # a picture has no thickness; highdicom needs one
    row_step, col_step = pixel_affine[:3, 1], pixel_affine[:3, 2]
    carrier.ImagePositionPatient = [float(v) for v in pixel_affine[:3, 3]]
    carrier.ImageOrientationPatient = [float(v) for v in np.concatenate([col_step / np.linalg.norm(col_step), row_step / np.linalg.norm(row_step)])]
    carrier.PixelSpacing = [float(np.linalg.norm(row_step) / scale), float(np.linalg.norm(col_step) / scale)]
    return carrier


def on_slide(source: Dataset) -> bool:
    """Whether the map can be placed in a DICOM whole-slide image's own slide coordinates:
    a VL Whole Slide Microscopy image with Total Pixel Matrix Origin, Image Orientation
    (Slide) and a valid Frame of Reference UID."""
    return (source.get("SOPClassUID") == VLWholeSlideMicroscopyImageStorage and bool(source.get("TotalPixelMatrixOriginSequence"))
            and len(source.get("ImageOrientationSlide") or []) == 6
            and is_uid(source.get("FrameOfReferenceUID")))


def _patient_geometry(heatmap: Heatmap, source: Dataset):
    """Pixel measures, orientation and one plane position per slice in patient coordinates
    (the source's, or a :func:`geometry_carrier`'s)."""
    affine = heatmap.tile_affine
    row_step, col_step, slice_step = affine[:3, 1], affine[:3, 2], affine[:3, 0]
    spacing = (float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step)))
    orientation = np.concatenate([col_step / spacing[1], row_step / spacing[0]])
    thickness = float(np.linalg.norm(slice_step)) if heatmap.scores.shape[0] > 1 else slice_thickness(source)
    positions = [
        hd.PlanePositionSequence(coordinate_system="PATIENT", image_position=[round(float(v), 6) for v in heatmap.centre((s, 0, 0))])
        for s in range(heatmap.scores.shape[0])
    ]
    return (hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=thickness),
            hd.PlaneOrientationSequence(coordinate_system="PATIENT", image_orientation=[round(float(v), 6) for v in orientation]),
            positions)


def _slide_geometry(heatmap: Heatmap, source: Dataset):
    """Pixel measures, orientation and the plane position of a map laid on the slide in its
    own slide coordinates: one pixel a tile, the first pixel's centre at the centre of the
    grid's first tile (so that a slide viewer overlays each tile where it was cut)."""
    if heatmap.scores.shape[0] != 1:
        raise ValueError("a slide map has one slice")
    transformer = hd.spatial.PixelToReferenceTransformer.for_image(source, for_total_pixel_matrix=True)
    origin = transformer(np.array([[0, 0]]))[0]  # (column, row) indices of the source's total pixel matrix
    along_column_index = transformer(np.array([[1, 0]]))[0] - origin
    along_row_index = transformer(np.array([[0, 1]]))[0] - origin
    grid = heatmap.grid
    tile_rows, tile_cols = float(np.diff(grid.row_edges).mean()), float(np.diff(grid.col_edges).mean())
    first = origin + (grid.col_edges[1] / 2 - 0.5) * along_column_index + (grid.row_edges[1] / 2 - 0.5) * along_row_index
    spacing = [float(v) for v in source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    thickness = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].get("SliceThickness") or 0.001
    return (hd.PixelMeasuresSequence(pixel_spacing=(spacing[0] * tile_rows, spacing[1] * tile_cols),
                                     slice_thickness=float(thickness)),
            hd.PlaneOrientationSequence(coordinate_system="SLIDE",
                                        image_orientation=[float(v) for v in source.ImageOrientationSlide]),
            [hd.PlanePositionSequence(coordinate_system="SLIDE", image_position=[round(float(v), 6) for v in first],
                                      pixel_matrix_position=(1, 1))])


def build_parametric_map(heatmap: Heatmap, sources: list[Dataset], identity: OutputIdentity, series_number: int,
                         series_description: str) -> hd.pm.ParametricMap:
    """Build the Parametric Map of the scores.

    Not-analysed tiles hold NaN. One frame per slice, placed at the centre of the slice's
    first tile; highdicom orders frames by position, so read frames back by their
    per-frame Plane Position, never by order.

    Args:
        heatmap: the scores and the tile grid's affine.
        sources: the images the map is derived from, with a Frame of Reference UID and
            plane geometry: the source slices, a DICOM whole-slide image (:func:`on_slide`;
            the map is then laid on its slide coordinates), or a :func:`geometry_carrier`.
        identity: gives the deterministic UIDs.
        series_number: Series Number of the map's series (see :func:`result_series`).
        series_description: its Series Description.
    """
    # Argument checks
    if not sources:
        raise ValueError("sources must hold at least one image")
    if any("FrameOfReferenceUID" not in s for s in sources):
        raise ValueError("every source must have a Frame of Reference UID (use geometry_carrier)")

    if on_slide(sources[0]):
        measures, orientation, positions = _slide_geometry(heatmap, sources[0])
    else:
        measures, orientation, positions = _patient_geometry(heatmap, sources[0])
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="TUMOUR",
        lut_explanation="Fused tumour score of the tile (share of cancerous tissue)",
        unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
        value_range=(0.0, 1.0),
        slope=1,
        intercept=0,
    )
    pm = hd.pm.ParametricMap(
        source_images=sources,
        pixel_array=heatmap.scores.astype(np.float32),
        series_instance_uid=identity.uid("pm-series"),
        series_number=series_number,
        sop_instance_uid=identity.uid("pm"),
        instance_number=1,
        **equipment(),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        pixel_measures=measures,
        plane_orientation=orientation,
        plane_positions=positions,
        content_label="HEATMAP",
        content_description="Tile tumour scores, NaN where not analysed",
    )
    # General Series
    pm.SeriesDescription = series_description
    pm.Laterality = sources[0].get("Laterality") or None  # Type 2C: present, empty when unknown
    return pm
