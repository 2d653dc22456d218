"""What every loader shares: the metadata dictionary, the affine it holds, the choice of a
slide level for the model.

Every loader gives the pixels as a numpy array shaped (slices, rows, columns, channels)
- one slice for a 2D image - and the metadata dictionary :func:`input_meta` builds:

``kind``
    ``"series"`` (CT/MR slices), ``"image"`` (a single 2D picture) or ``"slide"``.
``modality``
    the DICOM modality (``CT``, ``MR``, ``SM`` for slides, ``OT`` for picture files).
``affine``
    4x4 float64 matrix taking an index (slice, row, column, 1) to a position in mm
    in ``frame``; pixel centres sit at integer indices.
``frame``
    ``"PATIENT"`` (DICOM LPS), ``"SLIDE"`` (slide x right, y down, mm from the top
    left of the loaded level) or ``"IMAGE"`` (no physical size known: 1 unit = 1 pixel).
``source_path``
    the file or folder loaded, for messages.
``source_datasets``
    one pydicom Dataset per slice (no pixel data) for DICOM inputs, else an empty list.
``frame_of_reference_uid``
    the source's Frame of Reference UID where it has one.
``level0_pixels`` (slides and pictures)
    ``((scale_x, scale_y), offset)``: a position ``(x, y)`` of the frame lies at
    ``(x * scale_x + offset, y * scale_y + offset)`` in the corner-based pixel coordinates
    of the file's full-resolution level, as slide viewers and QuPath place objects (the
    two scales differ where the pixels are not square).
``slide_affine`` (DICOM whole-slide images only)
    the 4x4 map from ``"SLIDE"`` frame positions to the DICOM slide coordinate system (mm
    on the glass), where the image states its Total Pixel Matrix Origin and Image
    Orientation (Slide); None where it does not.
``content_key`` (slides only, optional)
    a cheap identity of the file's content: OpenSlide's ``openslide.quickhash-1`` (sha256
    of the properties and the smallest level) where the format has one. Output UIDs of a
    non-DICOM input derive from its content; without this key the whole file is hashed.
``frame_numbers`` (enhanced multi-frame DICOM only)
    which frame of the file (1-based) each slice is, once the frames are ordered in space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset

from transforms.errors import InputError
from transforms.io.guards import DEFAULT_MAX_VALUES

__all__ = ["LoadOptions", "input_meta", "positive_number", "orthonormal", "plane_affine", "pixel_affine",
           "model_suited_level", "MODEL_SCALE_SLACK", "DEFAULT_SLIDE_SIDE"]

#: A slide level read for the model may have pixels up to this many times its input's.
MODEL_SCALE_SLACK = 1.25
#: Largest side, in pixels, of the slide level read when no resolution is asked for.
DEFAULT_SLIDE_SIDE = 4096


@dataclass(frozen=True)
class LoadOptions:
    """What a reader may be asked, beside the path (see :class:`transforms.io.load.LoadInput`).

    Attributes:
        series_uid: which series to load from a folder holding several.
        resolution_um: wanted pixel spacing of a slide level in micrometres (the nearest is read).
        max_values: most pixel values the input may decode to, checked on its header first.
        level: the SVS/TIFF pyramid level to read, instead of choosing one.
        pixel_size_um: the pixel size of a picture in micrometres, which the file cannot say.
        model_scale_um: micrometres per pixel of the model's input: without ``resolution_um``
            or ``level``, slides are read at a level that suits it.
    """

    series_uid: str | None = None
    resolution_um: float | None = None
    max_values: int = DEFAULT_MAX_VALUES
    level: int | None = None
    pixel_size_um: float | None = None
    model_scale_um: float | None = None


def input_meta(kind: str, modality: str, affine: np.ndarray, frame: str, source_path: str | Path,
               source_datasets: Sequence[Dataset] = (), frame_of_reference_uid: str | None = None, **extra) -> dict:
    """The loaders' metadata dictionary (keys in the module docstring); ``extra`` adds the
    optional keys (``level0_pixels``, ``content_key``, ``frame_numbers``)."""
    return {
        "kind": kind,
        "modality": modality,
        "affine": affine,
        "frame": frame,
        "source_path": str(source_path),
        "source_datasets": list(source_datasets),
        "frame_of_reference_uid": frame_of_reference_uid,
        **extra,
    }


def plane_affine(spacing_rows: float, spacing_cols: float, row_dir, col_dir, origin, slice_step=None) -> np.ndarray:
    """Index (slice, row, col) -> position; ``row_dir`` is the direction of increasing row,
    ``slice_step`` the step from one slice to the next (the plane's normal by default)."""
    affine = np.eye(4)
    normal = np.cross(col_dir, row_dir) if slice_step is None else np.asarray(slice_step, dtype=float)
    affine[:3, 0] = normal
    affine[:3, 1] = np.asarray(row_dir, dtype=float) * spacing_rows
    affine[:3, 2] = np.asarray(col_dir, dtype=float) * spacing_cols
    affine[:3, 3] = origin
    return affine


def pixel_affine(spacing: float = 1.0) -> np.ndarray:
    """Slide or picture axes: x along columns (right), y along rows (down)."""
    return plane_affine(spacing, spacing, (0, 1, 0), (1, 0, 0), (0, 0, 0))


def model_suited_level(spacings_um: Sequence[float], model_scale_um: float | None) -> int | None:
    """Index of the coarsest level (``spacings_um`` finest first) whose pixels are at most
    :data:`MODEL_SCALE_SLACK` times ``model_scale_um``: the model's patches are then cut
    from at least (nearly) as many pixels as it sees. The finest level when none is that
    fine; None without a model scale."""
    if model_scale_um is None:
        return None
    fine_enough = [i for i, spacing in enumerate(spacings_um) if spacing <= MODEL_SCALE_SLACK * model_scale_um]
    return fine_enough[-1] if fine_enough else 0


def positive_number(value, path: Path, what: str, low: float, high: float) -> float:
    """``value`` as a float where it is a finite number in [low, high]; otherwise the input is
    refused naming ``what`` (header numbers enter arithmetic: 0, NaN or infinity would
    surface as a ZeroDivisionError or a LinAlgError far from the header)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and low <= number <= high):
        raise InputError(path, f"{what} must be a finite number from {low:g} to {high:g}")
    return number


def orthonormal(first, second, tolerance: float = 0.01) -> bool:
    """Whether two direction vectors (a header's orientation cosines) are unit vectors at a
    right angle to each other, within ``tolerance``."""
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    return (abs(np.linalg.norm(first) - 1) <= tolerance and abs(np.linalg.norm(second) - 1) <= tolerance
            and abs(float(np.dot(first, second))) <= tolerance)
