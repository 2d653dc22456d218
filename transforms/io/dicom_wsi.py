"""DICOM whole-slide images (VL Whole Slide Microscopy): one pyramid level, its total pixel matrix.

A slide's levels are files of one series; :func:`choose_wsi_level` picks the level to read
(the one asked for, or the one the model's scale suits among those the size guard lets
through) and :func:`load_dicom_wsi` assembles its TILED_FULL frames into one matrix in
slide coordinates (frame ``"SLIDE"``; see :mod:`transforms.io.common`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from transforms.errors import InputError
from transforms.io.common import DEFAULT_SLIDE_SIDE, model_suited_level, orthonormal, plane_affine, positive_number
from transforms.io.dicom import decode_frames, dicom_meta
from transforms.io.guards import DEFAULT_MAX_VALUES, declared_values

__all__ = ["choose_wsi_level", "load_dicom_wsi", "wsi_pixel_spacing", "slide_coordinates", "SPACING_RANGE_MM"]

#: Plausible pixel spacing of a slide level, in mm: 10 nm to 10 mm.
SPACING_RANGE_MM = (1e-5, 10.0)


def wsi_pixel_spacing(ds: Dataset, path: Path) -> tuple[float, float]:
    """(row, column) spacing in mm of a whole-slide level, checked: finite and plausible."""
    try:
        values = list(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing)
    except (AttributeError, IndexError, TypeError, KeyError):
        raise InputError(path, "the whole-slide image lacks its Pixel Spacing (shared Pixel Measures)") from None
    if len(values) != 2:
        raise InputError(path, "the whole-slide image's Pixel Spacing needs two values")
    return tuple(positive_number(v, path, "the whole-slide image's Pixel Spacing (mm)", *SPACING_RANGE_MM)
                 for v in values)


def slide_coordinates(ds: Dataset) -> np.ndarray | None:
    """The 4x4 map from frame positions (mm from the centre of the top-left pixel, x right,
    y down) to the DICOM slide coordinate system, where the image states where it lies on
    the glass (Total Pixel Matrix Origin and Image Orientation (Slide), both finite, the
    orientation two orthogonal unit vectors); None where it does not."""
    try:
        origin = ds.TotalPixelMatrixOriginSequence[0]
        offset = np.array([float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem)])
        orientation = np.array([float(v) for v in ds.ImageOrientationSlide])
    except (AttributeError, IndexError, TypeError, ValueError, KeyError):
        return None
    if orientation.shape != (6,) or not (np.all(np.isfinite(orientation)) and np.all(np.isfinite(offset))):
        return None
    along_row, along_column = orientation[:3], orientation[3:]  # DICOM: first the direction of increasing column
    if not orthonormal(along_row, along_column):
        return None
    matrix = np.eye(4)
    matrix[:3, 0], matrix[:3, 1] = along_row, along_column
    matrix[:3, 2] = np.cross(along_row, along_column)
    matrix[:2, 3] = offset
    return matrix


def choose_wsi_level(levels: list[tuple[Path, Dataset]], source: Path, resolution_um: float | None,
                      model_scale_um: float | None = None, max_values: int = DEFAULT_MAX_VALUES) -> Path:
    """The pyramid level nearest ``resolution_um``; by default the one that suits the model
    (:func:`~transforms.io.common.model_suited_level`), or without a model scale the finest that fits
    :data:`DEFAULT_SLIDE_SIDE`. Thumbnails, labels and overviews are not levels."""
    candidates = []
    for path, ds in levels:
        if "VOLUME" not in [str(v) for v in ds.get("ImageType", [])]:
            continue
        try:
            spacing = wsi_pixel_spacing(ds, path)[0]
            side = max(int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns))
            values = declared_values(ds, path)
        except (AttributeError, TypeError, ValueError, InputError):
            continue  # not a level that can be read: another is chosen, or none is left
        candidates.append((spacing, side, path, values))
    if not candidates:
        raise InputError(source, "the whole-slide series has no VOLUME level with a pixel spacing")
    candidates.sort()
    if resolution_um is not None:
        return min(candidates, key=lambda c: abs(np.log(c[0] * 1000 / resolution_um)))[2]  # PixelSpacing in mm
    # a level is read whole: the one the model suits among those the size guard lets through
    readable = [c for c in candidates if c[3] <= max_values] or candidates[-1:]
    suited = model_suited_level([c[0] * 1000 for c in readable], model_scale_um)
    if suited is not None:
        return readable[suited][2]
    fitting = [c for c in candidates if c[1] <= DEFAULT_SLIDE_SIDE]
    return (fitting[0] if fitting else candidates[-1])[2]


def load_dicom_wsi(ds: Dataset, path: Path) -> tuple[np.ndarray, dict]:
    """Assemble the total pixel matrix of a TILED_FULL VL Whole Slide Microscopy image.

    The frames it needs are decoded one at a time into the matrix (the size guard has
    counted the matrix and one frame, :func:`transforms.io.guards.declared_values`); frames
    beyond them (other focal planes, optical paths) are not decoded.
    """
    if ds.get("DimensionOrganizationType", "TILED_FULL") != "TILED_FULL":
        raise InputError(path, "only TILED_FULL whole-slide images are supported (this one is TILED_SPARSE)")
    try:
        total_rows, total_cols = int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns)
        tile_rows, tile_cols = int(ds.Rows), int(ds.Columns)
        count = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise InputError(path, "the whole-slide image lacks Total Pixel Matrix Rows/Columns, Rows or Columns") from None
    if min(total_rows, total_cols, tile_rows, tile_cols, count) < 1:
        raise InputError(path, "the whole-slide image's Total Pixel Matrix, Rows, Columns and Number of Frames "
                               "must be positive")
    spacing = wsi_pixel_spacing(ds, path)
    across = -(-total_cols // tile_cols)
    down = -(-total_rows // tile_rows)
    if count < across * down:
        raise InputError(path, f"the image has {count} frames; TILED_FULL needs {across * down}")
    matrix = np.zeros((down * tile_rows, across * tile_cols, 3), dtype=np.uint8)
    # TILED_FULL: row-major over the first focal plane
    for index, frame in enumerate(decode_frames(ds, path, range(across * down))):
        if frame.ndim == 2:  # grey
            frame = np.repeat(frame[..., None], 3, axis=-1)
        r, c = divmod(index, across)
        matrix[r * tile_rows : (r + 1) * tile_rows, c * tile_cols : (c + 1) * tile_cols] = frame[..., :3]
    matrix = matrix[:total_rows, :total_cols]
    affine = plane_affine(spacing[0], spacing[1], (0, 1, 0), (1, 0, 0), (0, 0, 0))  # slide x right, y down
    meta = dicom_meta(ds, "slide", affine, "SLIDE", path, modality="SM",
                      level0_pixels=((1.0 / spacing[1], 1.0 / spacing[0]), 0.5),  # this file's own pixels
                      slide_affine=slide_coordinates(ds))
    return matrix[None], meta
