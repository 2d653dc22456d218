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
from transforms.io.common import DEFAULT_SLIDE_SIDE, model_suited_level, plane_affine
from transforms.io.dicom import decode_pixels, dicom_meta
from transforms.io.guards import DEFAULT_MAX_VALUES, declared_values

__all__ = ["choose_wsi_level", "load_dicom_wsi"]


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
            spacing = float(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0])
            side = max(int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns))
            values = declared_values(ds, path)
        except (AttributeError, IndexError, TypeError, ValueError, InputError):
            continue
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
    """Assemble the total pixel matrix of a TILED_FULL VL Whole Slide Microscopy image."""
    if ds.get("DimensionOrganizationType", "TILED_FULL") != "TILED_FULL":
        raise InputError(path, "only TILED_FULL whole-slide images are supported (this one is TILED_SPARSE)")
    try:
        total_rows, total_cols = int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns)
        spacing = [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    except (AttributeError, IndexError, TypeError, ValueError):
        raise InputError(path, "the whole-slide image lacks Total Pixel Matrix size or Pixel Spacing") from None
    frames = decode_pixels(ds, path)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.shape[-1] != 3:
        frames = np.repeat(frames[..., None] if frames.ndim == 3 else frames, 3, axis=-1)[..., :3]
    tile_rows, tile_cols = int(ds.Rows), int(ds.Columns)
    across = -(-total_cols // tile_cols)
    down = -(-total_rows // tile_rows)
    if len(frames) < across * down:
        raise InputError(path, f"the image has {len(frames)} frames; TILED_FULL needs {across * down}")
    matrix = np.zeros((down * tile_rows, across * tile_cols, 3), dtype=np.uint8)
    for index in range(across * down):  # TILED_FULL: row-major over the first focal plane
        r, c = divmod(index, across)
        matrix[r * tile_rows : (r + 1) * tile_rows, c * tile_cols : (c + 1) * tile_cols] = frames[index]
    matrix = matrix[:total_rows, :total_cols]
    affine = plane_affine(spacing[0], spacing[1], (0, 1, 0), (1, 0, 0), (0, 0, 0))  # slide x right, y down
    meta = dicom_meta(ds, "slide", affine, "SLIDE", path, modality="SM",
                      level0_pixels=(1.0 / spacing[1], 0.5))  # this file's own pixels
    return matrix[None], meta
