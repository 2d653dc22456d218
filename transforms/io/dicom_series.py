"""DICOM CT/MR and other images: a series folder, one image file, an enhanced multi-frame volume.

:func:`load_dicom_series` reads the headers of a folder's files, chooses the one image
series (or the one asked for), checks the stack's geometry before any pixel data is
decoded, then decodes the slices in their order in space. :func:`load_dicom_image` reads
one file: a single image, an enhanced multi-frame volume, or a whole-slide image (handed
to :mod:`transforms.io.dicom_wsi`). The metadata is described in :mod:`transforms.io.common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import VLWholeSlideMicroscopyImageStorage

from transforms.errors import InputError, NotDicomError
from transforms.io.common import LoadOptions, pixel_affine, plane_affine
from transforms.io.dicom import (decode_pixels, dicom_meta, frame_group, header_only, modality_values, plane_geometry,
                                 read_dicom, require_identity, rescale_of, shown_code, shown_uid, slice_thickness)
from transforms.io.dicom_wsi import choose_wsi_level, load_dicom_wsi
from transforms.io.guards import DEFAULT_MAX_VALUES, check_size, declared_values

__all__ = ["read", "load_dicom_series", "load_dicom_image"]


def read(path: Path, options: LoadOptions) -> tuple[np.ndarray, dict]:
    """The reader's entry for :class:`~transforms.io.load.LoadInput`: a folder's one series
    (:func:`load_dicom_series`) or one file (:func:`load_dicom_image`). DICOM files have no
    fixed suffix: any file no other reader claims comes here."""
    if not path.is_dir():
        if path.stat().st_size == 0:
            raise InputError(path, "the file is empty")
        return load_dicom_image(path, options.max_values)
    inside = path.resolve()
    # a link that leads out of the folder is not part of the series (nor read)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.resolve().is_relative_to(inside))
    if not files:
        raise InputError(path, "the folder is empty")
    return load_dicom_series(files, path, options.series_uid, options.resolution_um, options.max_values,
                             options.model_scale_um)


def load_dicom_series(paths: Sequence[Path], source: Path, series_uid: str | None = None,
                      resolution_um: float | None = None, max_values: int = DEFAULT_MAX_VALUES,
                      model_scale_um: float | None = None) -> tuple[np.ndarray, dict]:
    """Load the one image series among ``paths`` (a folder's files) as a volume.

    A whole-slide series (one file per pyramid level) gives the level nearest
    ``resolution_um`` instead, or by default the one ``model_scale_um`` suits.

    Args:
        paths: candidate files; non-DICOM files are skipped.
        source: the folder, for messages.
        series_uid: the Series Instance UID to pick when several image series are present.
        resolution_um: wanted pixel spacing of a whole-slide level, in micrometres.
        max_values: the size guard, checked on the headers before decoding.
        model_scale_um: micrometres per pixel of the model's input (see
            :func:`transforms.io.slide.load_slide`).
    """
    chosen = _chosen_series(_image_headers(paths, source, max_values), source, series_uid)
    if len(chosen) == 1:
        return load_dicom_image(chosen[0][0], max_values)
    if chosen[0][1].get("SOPClassUID") == VLWholeSlideMicroscopyImageStorage:
        return load_dicom_image(choose_wsi_level(chosen, source, resolution_um, model_scale_um, max_values), max_values)
    for path, ds in chosen:
        require_identity(ds, path)
    check_size(source, sum(declared_values(ds, path) for path, ds in chosen), "the series", max_values)
    first_path, first = chosen[0]
    row_dir, col_dir, _, spacing = plane_geometry(first, first_path)
    for path, ds in chosen[1:]:
        other_row, other_col, _, other_spacing = plane_geometry(ds, path)
        if not (np.allclose(other_row, row_dir, atol=1e-3) and np.allclose(other_col, col_dir, atol=1e-3)):
            raise InputError(source, "the slices of the series are not parallel (Image Orientation (Patient) differs)")
        if not np.allclose(other_spacing, spacing, rtol=1e-3):
            raise InputError(path, f"Pixel Spacing {other_spacing} differs from the series' {spacing}")
    positions = np.array([np.array(ds.ImagePositionPatient, float) for _, ds in chosen])
    order, step = _stack_order(positions, row_dir, col_dir, source)
    ordered = [chosen[i] for i in order]
    volume = []
    for path, _ in ordered:
        ds = read_dicom(path, max_values=max_values)
        image = modality_values(decode_pixels(ds, path), ds.get("PhotometricInterpretation"), rescale_of(ds, path))
        if image.shape != (first.Rows, first.Columns):
            raise InputError(path, f"slice of {image.shape} pixels in a series of {(first.Rows, first.Columns)}")
        volume.append(image)
    affine = plane_affine(spacing[0], spacing[1], row_dir, col_dir, positions[order[0]], slice_step=step)
    meta = dicom_meta(first, "series", affine, "PATIENT", source, [header_only(ds) for _, ds in ordered])
    return np.stack(volume)[..., None], meta


def _image_headers(paths: Sequence[Path], source: Path, max_values: int) -> dict[str, list[tuple[Path, Dataset]]]:
    """The headers of the image files among ``paths``, by Series Instance UID (files of
    another kind are passed over; a DICOM file refused is reported if no series is left)."""
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    refused: InputError | None = None  # the first DICOM file refused (not merely another kind of file)
    for path in paths:
        try:
            ds = read_dicom(path, pixels=False, max_values=max_values)
        except NotDicomError:
            continue
        except InputError as error:
            refused = refused or error
            continue
        if "Rows" in ds and ds.get("SeriesInstanceUID"):
            series.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    if not series:
        if refused is not None:  # say why the folder's DICOM file was refused, not that there is none
            raise refused
        raise InputError(source, "no DICOM image found in this folder")
    return series


def _chosen_series(series: dict[str, list[tuple[Path, Dataset]]], source: Path,
                   series_uid: str | None) -> list[tuple[Path, Dataset]]:
    """The series asked for, or the only one; a folder of several needs ``series_uid``."""
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(source, f"no series with Series Instance UID {shown_uid(series_uid)}; present: "
                                     f"{', '.join(shown_uid(uid) for uid in sorted(series))}")
        return series[series_uid]
    if len(series) > 1:
        listing = "; ".join(f"{shown_uid(uid)} ({shown_code(ds_list[0][1].get('Modality'))}, {len(ds_list)} files)"
                            for uid, ds_list in sorted(series.items()))
        raise InputError(source, f"the folder holds {len(series)} image series; choose one with --series UID: {listing}")
    return next(iter(series.values()))


def load_dicom_image(path: Path, max_values: int = DEFAULT_MAX_VALUES) -> tuple[np.ndarray, dict]:
    """Load one DICOM file: a CT/MR/other single image, an enhanced volume, or a whole-slide image.

    Args:
        path: the file.
        max_values: the size guard, checked on the header before decoding.
    """
    ds = read_dicom(path, max_values=max_values)  # the stored (possibly compressed) bytes; nothing decoded yet
    require_identity(ds, path)
    check_size(path, declared_values(ds, path), "the image", max_values)
    if ds.get("SOPClassUID") == VLWholeSlideMicroscopyImageStorage:
        return load_dicom_wsi(ds, path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and int(ds.get("SamplesPerPixel", 1)) == 1:
        return _load_enhanced(ds, path)
    if frames > 1:
        raise InputError(path, f"multi-frame colour objects ({frames} frames) are not supported; export one frame per file")
    pixels = decode_pixels(ds, path)
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples == 3:
        if ds.get("PhotometricInterpretation", "").startswith("YBR"):
            pixels = pydicom.pixels.convert_color_space(pixels, ds.PhotometricInterpretation, "RGB")
        stored = int(ds.get("BitsStored", 8) or 8)
        if pixels.dtype != np.uint8 or stored > 8:  # 16-bit colour: scaled to 8 bits, never wrapped
            top = float(2 ** min(max(stored, 8), 16) - 1)
            pixels = np.clip(np.round(pixels.astype(np.float32) * (255.0 / top)), 0, 255)
        image = pixels.astype(np.uint8)[None]
    elif samples == 1:
        image = modality_values(pixels, ds.get("PhotometricInterpretation"), rescale_of(ds, path))[None, ..., None]
    else:
        raise InputError(path, f"Samples per Pixel {samples} is not supported (1 or 3)")
    frame, affine = "IMAGE", pixel_affine()
    if "ImageOrientationPatient" in ds and "ImagePositionPatient" in ds and "PixelSpacing" in ds:
        row_dir, col_dir, position, spacing = plane_geometry(ds, path)
        affine, frame = plane_affine(spacing[0], spacing[1], row_dir, col_dir, position), "PATIENT"
        affine[:3, 0] *= slice_thickness(ds)
    kind = "image" if samples == 3 or ds.get("Modality") not in ("CT", "MR", "PT") else "series"
    return image, dicom_meta(ds, kind, affine, frame, path)


def _load_enhanced(ds: Dataset, path: Path) -> tuple[np.ndarray, dict]:
    """An enhanced multi-frame CT/MR (one file, one volume): frames placed by their positions.

    Without plane positions (some stripped test objects) the frames stay in stored order
    and the volume has no physical geometry (frame ``"IMAGE"``).
    """
    frames = decode_pixels(ds, path)
    count = int(ds.NumberOfFrames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or len(frames) != count:
        raise InputError(path, f"expected {count} grey frames, the pixel data holds shape {frames.shape}")
    rescales = [rescale_of(frame_group(ds, index, "PixelValueTransformationSequence") or ds, path) for index in range(count)]
    values = modality_values(frames, ds.get("PhotometricInterpretation"), rescales)
    positions = [frame_group(ds, i, "PlanePositionSequence") for i in range(count)]
    orientation = frame_group(ds, 0, "PlaneOrientationSequence")
    measures = frame_group(ds, 0, "PixelMeasuresSequence")
    if any(p is None for p in positions) or orientation is None or measures is None or "PixelSpacing" not in measures:
        affine = pixel_affine()
        affine[:3, 0] = (0, 0, 1)
        return values[..., None], dicom_meta(ds, "series", affine, "IMAGE", path)
    header = Dataset()
    header.ImageOrientationPatient = orientation.ImageOrientationPatient
    header.ImagePositionPatient = positions[0].ImagePositionPatient
    header.PixelSpacing = measures.PixelSpacing
    row_dir, col_dir, _, spacing = plane_geometry(header, path)
    points = np.array([[float(v) for v in p.ImagePositionPatient] for p in positions])
    order, step = _stack_order(points, row_dir, col_dir, path)
    affine = plane_affine(spacing[0], spacing[1], row_dir, col_dir, points[order[0]], slice_step=step)
    meta = dicom_meta(ds, "series", affine, "PATIENT", path, frame_numbers=[int(i) + 1 for i in order])
    return values[order][..., None], meta


def _stack_order(positions: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray, source: Path) -> tuple[np.ndarray, np.ndarray]:
    """Order slices along their normal and check they form a regular stack.

    Returns:
        the order of the slices and the step (mm, patient axes) from one to the next,
        measured from the positions (not from Slice Thickness).
    """
    normal = np.cross(col_dir, row_dir)
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    steps = np.diff(distances[order])
    if np.any(np.abs(steps) < 1e-3):
        raise InputError(source, "two slices share one position (duplicated Image Position (Patient)); remove the duplicates")
    if steps.size and (np.max(steps) - np.min(steps)) > 0.01 * np.max(np.abs(steps)) + 1e-3:
        raise InputError(source, "the slices are not evenly spaced; resample the series to even spacing before analysis")
    if len(order) < 2:
        return order, normal
    step = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    tilt = np.degrees(np.arccos(np.clip(abs(np.dot(step, normal)) / np.linalg.norm(step), -1, 1)))
    if tilt > 0.5:
        raise InputError(source, f"the slices are sheared against their plane by {tilt:.1f} degrees (gantry tilt); "
                                 "resample the series to an orthogonal grid before analysis")
    return order, step


