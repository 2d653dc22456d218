"""Loaders: DICOM series and images, DICOM whole-slide images, SVS/TIFF slides, PNG/JPEG.

Every loader gives the pixels as a numpy array shaped (slices, rows, columns, channels)
- one slice for a 2D image - and a metadata dictionary:

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
    ``(scale, offset)``: a position ``p`` of the frame (x or y) lies at ``p * scale + offset``
    in the corner-based pixel coordinates of the file's full-resolution level, as slide
    viewers and QuPath place objects.
``content_key`` (slides only, optional)
    a cheap identity of the file's content: OpenSlide's ``openslide.quickhash-1`` (sha256
    of the properties and the smallest level) where the format has one. Output UIDs of a
    non-DICOM input derive from its content; without this key the whole file is hashed.

Errors are :class:`InputError` from ``transforms.errors`` naming the input.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import pydicom
from monai.transforms import MapTransform, Transform
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from transforms.codestream import DEFLATED, check_codestreams, check_deflated_size
from transforms.errors import InputError, is_uid

__all__ = ["LoadInput", "LoadInputd", "StreamedSlide", "load_dicom_series", "load_dicom_image", "load_slide", "load_picture",
           "slice_thickness"]

# pydicom warns about every over-long value of real-world headers (a 66-character UID,
# say); the loaders judge what matters and raise InputError for it
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".scn", ".mrxs", ".bif", ".vms"}
PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: A slide level read for the model may have pixels up to this many times its input's.
MODEL_SCALE_SLACK = 1.25
#: Largest side, in pixels, of the slide level read when no resolution is asked for.
DEFAULT_SLIDE_SIDE = 4096
#: Most pixel values (pixels x samples x frames) an input may decode to, checked from its
#: header before any pixel data is decoded (a decompression bomb or a header claiming
#: 100,000 x 100,000 x 1,000 is refused, not attempted).
DEFAULT_MAX_VALUES = 512 * 1024 * 1024


def _check_size(source: Path, values: int, what: str, limit: int) -> None:
    if values > limit:
        raise InputError(source, f"{what} would decode to {values:,} values, more than the limit of {limit:,}; "
                                 "raise the limit (--max-megavalues) only if the machine has the memory")


def _affine_2d(spacing_rows: float, spacing_cols: float, row_dir, col_dir, origin, slice_step=None) -> np.ndarray:
    """Index (slice, row, col) -> position; ``row_dir`` is the direction of increasing row."""
    affine = np.eye(4)
    normal = np.cross(col_dir, row_dir) if slice_step is None else np.asarray(slice_step, dtype=float)
    affine[:3, 0] = normal
    affine[:3, 1] = np.asarray(row_dir, dtype=float) * spacing_rows
    affine[:3, 2] = np.asarray(col_dir, dtype=float) * spacing_cols
    affine[:3, 3] = origin
    return affine


def _pixel_affine(spacing: float = 1.0) -> np.ndarray:
    """Slide or picture axes: x along columns (right), y along rows (down)."""
    return _affine_2d(spacing, spacing, (0, 1, 0), (1, 0, 0), (0, 0, 0))


def _deflated_body_offset(path: Path) -> int | None:
    """Where the body of a deflated DICOM file starts; None for any other file."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
            return None
        return 132 + 12 + int(meta.FileMetaInformationGroupLength)  # preamble, DICM, the group length element
    except Exception:  # not DICOM, or no group length: pydicom's own reading judges it below
        return None


def _read_dicom(path: Path, pixels: bool = True, max_values: int = DEFAULT_MAX_VALUES) -> Dataset:
    offset = _deflated_body_offset(path)
    if offset is not None:
        check_deflated_size(path, offset, max_values)  # pydicom would inflate it whole, unbounded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
            for _ in ds.iterall():  # pydicom parses lazily: surface a damaged element here, not later
                pass
            return ds
    except InvalidDicomError:
        raise InputError(path, "not a DICOM file (no DICM preamble and no readable DICOM header)") from None
    except Exception as error:  # pydicom raises many kinds on a damaged file
        raise InputError(path, f"the DICOM file is damaged or truncated ({type(error).__name__})") from None


def _shown_uid(value) -> str:
    """A header UID as a message may quote it: only if it is one (header text is untrusted)."""
    text = str(value or "")
    return text if is_uid(text) else "(not a valid UID)"


def _shown_code(value) -> str:
    """A header code string (Modality) as a message may quote it: only if it is a valid CS."""
    text = str(value or "")
    return text if re.fullmatch(r"[A-Z0-9_ ]{1,16}", text) else "?"


def slice_thickness(ds: Dataset) -> float:
    """Slice Thickness in mm where it is a positive finite number; 1 otherwise (a negative or
    infinite value would flip or break the geometry the outputs describe)."""
    try:
        value = float(ds.get("SliceThickness", 1) or 1)
    except (TypeError, ValueError):
        return 1.0
    return value if np.isfinite(value) and value > 0 else 1.0


def _require_identity(ds: Dataset, path: Path) -> None:
    """The UIDs every output derives from and refers to must be there, and the character set
    the outputs will copy the patient's values in must be one DICOM defines."""
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(keyword, "") or "").strip():
            raise InputError(path, f"the header lacks {keyword}, which the results refer to")
    charset = ds.get("SpecificCharacterSet")
    values = [] if not charset else [charset] if isinstance(charset, str) else list(charset)
    for index, value in enumerate(values):
        if str(value) not in pydicom.charset.python_encoding or (value == "" and index > 0):
            raise InputError(path, f"Specific Character Set {_shown_code(value)} is not a term DICOM defines, so the "
                                   "patient's names can be neither read nor copied exactly")


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    if "PixelData" not in ds:
        raise InputError(path, "the DICOM object holds no pixel data (PixelData is missing)")
    for keyword in ("Rows", "Columns"):
        if not ds.get(keyword):
            raise InputError(path, f"the DICOM header lacks {keyword}")
    check_codestreams(ds, path)  # a decoder allocates what the codestream declares, not the header
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # decoders in Rust raise PanicException, a BaseException
        raise InputError(
            path,
            f"cannot decode the pixel data (transfer syntax {_shown_uid(ds.file_meta.get('TransferSyntaxUID'))}: "
            f"{type(error).__name__}); the file may be truncated or use an unsupported compression",
        ) from None


def _header(ds: Dataset) -> Dataset:
    """A copy of the dataset without its pixel data, for writers."""
    header = Dataset()
    header.update({tag: element for tag, element in ds.items() if tag != 0x7FE00010})
    header.file_meta = ds.file_meta if hasattr(ds, "file_meta") else Dataset()
    return header


def _plane_geometry(ds: Dataset, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    try:
        orientation = np.array(ds.ImageOrientationPatient, dtype=float)
        position = np.array(ds.ImagePositionPatient, dtype=float)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        raise InputError(path, "the image lacks Image Orientation/Position (Patient) or Pixel Spacing") from None
    if orientation.shape != (6,) or position.shape != (3,) or len(spacing) != 2:
        raise InputError(path, "Image Orientation/Position (Patient) or Pixel Spacing has the wrong number of values")
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputError(path, f"Pixel Spacing {spacing} must be positive and finite")
    if not np.all(np.isfinite(orientation)) or not np.all(np.isfinite(position)):
        raise InputError(path, "Image Orientation/Position (Patient) holds values that are not finite numbers")
    if abs(np.linalg.norm(orientation[:3]) - 1) > 0.01 or abs(np.linalg.norm(orientation[3:]) - 1) > 0.01 \
            or abs(np.dot(orientation[:3], orientation[3:])) > 0.01:
        raise InputError(path, "Image Orientation (Patient) is not two orthogonal unit vectors")
    col_dir, row_dir = orientation[:3], orientation[3:]  # DICOM: first along a row (columns increase)
    return row_dir, col_dir, position, spacing


def _to_float_image(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """Rescale to modality values (HU for CT) and undo MONOCHROME1's inversion."""
    values = pixels.astype(np.float32)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    values = values * slope + intercept
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        values = values.max() + values.min() - values
    return values


def _stack(positions: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray, source: Path) -> tuple[np.ndarray, np.ndarray]:
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


def _frame_group(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The functional group ``sequence`` of frame ``index``: per-frame first, then shared."""
    for groups, item in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        container = ds.get(groups)
        if container and len(container) > item:
            value = container[item].get(sequence)
            if value:  # a non-empty sequence
                return value[0]
    return None


def _load_enhanced(ds: Dataset, path: Path) -> tuple[np.ndarray, dict]:
    """An enhanced multi-frame CT/MR (one file, one volume): frames placed by their positions.

    Without plane positions (some stripped test objects) the frames stay in stored order
    and the volume has no physical geometry (frame ``"IMAGE"``).
    """
    frames = _pixels(ds, path)
    count = int(ds.NumberOfFrames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or len(frames) != count:
        raise InputError(path, f"expected {count} grey frames, the pixel data holds shape {frames.shape}")
    values = np.empty(frames.shape, dtype=np.float32)
    for index in range(count):
        transform = _frame_group(ds, index, "PixelValueTransformationSequence")
        slope = float(transform.get("RescaleSlope", 1) or 1) if transform else float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(transform.get("RescaleIntercept", 0) or 0) if transform else float(ds.get("RescaleIntercept", 0) or 0)
        values[index] = frames[index] * slope + intercept
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        values = values.max() + values.min() - values
    positions = [_frame_group(ds, i, "PlanePositionSequence") for i in range(count)]
    orientation = _frame_group(ds, 0, "PlaneOrientationSequence")
    measures = _frame_group(ds, 0, "PixelMeasuresSequence")
    meta = {
        "kind": "series",
        "modality": str(ds.get("Modality", "OT")),
        "source_path": str(path),
        "source_datasets": [_header(ds)],
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")) or None,
    }
    if any(p is None for p in positions) or orientation is None or measures is None or "PixelSpacing" not in measures:
        affine = _pixel_affine()
        affine[:3, 0] = (0, 0, 1)
        meta.update(affine=affine, frame="IMAGE")
        return values[..., None], meta
    header = Dataset()
    header.ImageOrientationPatient = orientation.ImageOrientationPatient
    header.ImagePositionPatient = positions[0].ImagePositionPatient
    header.PixelSpacing = measures.PixelSpacing
    row_dir, col_dir, _, spacing = _plane_geometry(header, path)
    points = np.array([[float(v) for v in p.ImagePositionPatient] for p in positions])
    order, step = _stack(points, row_dir, col_dir, path)
    meta.update(affine=_affine_2d(spacing[0], spacing[1], row_dir, col_dir, points[order[0]], slice_step=step), frame="PATIENT",
                frame_numbers=[int(i) + 1 for i in order])
    return values[order][..., None], meta


def _default_level(spacings_um: Sequence[float], model_scale_um: float | None) -> int | None:
    """Index of the coarsest level (``spacings_um`` finest first) whose pixels are at most
    :data:`MODEL_SCALE_SLACK` times ``model_scale_um``: the model's patches are then cut
    from at least (nearly) as many pixels as it sees. The finest level when none is that
    fine; None without a model scale."""
    if model_scale_um is None:
        return None
    fine_enough = [i for i, spacing in enumerate(spacings_um) if spacing <= MODEL_SCALE_SLACK * model_scale_um]
    return fine_enough[-1] if fine_enough else 0


def _choose_wsi_level(levels: list[tuple[Path, Dataset]], source: Path, resolution_um: float | None,
                      model_scale_um: float | None = None, max_values: int = DEFAULT_MAX_VALUES) -> Path:
    """The pyramid level nearest ``resolution_um``; by default the one that suits the model
    (:func:`_default_level`), or without a model scale the finest that fits
    :data:`DEFAULT_SLIDE_SIDE`. Thumbnails, labels and overviews are not levels."""
    candidates = []
    for path, ds in levels:
        if "VOLUME" not in [str(v) for v in ds.get("ImageType", [])]:
            continue
        try:
            spacing = float(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0])
            side = max(int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns))
            values = _declared_values(ds, path)
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
    suited = _default_level([c[0] * 1000 for c in readable], model_scale_um)
    if suited is not None:
        return readable[suited][2]
    fitting = [c for c in candidates if c[1] <= DEFAULT_SLIDE_SIDE]
    return (fitting[0] if fitting else candidates[-1])[2]


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
        model_scale_um: micrometres per pixel of the model's input (see :func:`load_slide`).
    """
    headers: list[tuple[Path, Dataset]] = []
    refused: InputError | None = None  # the first DICOM file refused (not merely another kind of file)
    for path in paths:
        try:
            headers.append((path, _read_dicom(path, pixels=False, max_values=max_values)))
        except InputError as error:
            if refused is None and "not a DICOM file" not in error.problem:
                refused = error
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, ds in headers:
        if "Rows" in ds and ds.get("SeriesInstanceUID"):
            series.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    if not series:
        if refused is not None:  # say why the folder's DICOM file was refused, not that there is none
            raise refused
        raise InputError(source, "no DICOM image found in this folder")
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(source, f"no series with Series Instance UID {_shown_uid(series_uid)}; present: "
                                     f"{', '.join(_shown_uid(uid) for uid in sorted(series))}")
        chosen = series[series_uid]
    elif len(series) > 1:
        listing = "; ".join(f"{_shown_uid(uid)} ({_shown_code(ds_list[0][1].get('Modality'))}, {len(ds_list)} files)"
                            for uid, ds_list in sorted(series.items()))
        raise InputError(source, f"the folder holds {len(series)} image series; choose one with --series UID: {listing}")
    else:
        chosen = next(iter(series.values()))
    if len(chosen) == 1:
        return load_dicom_image(chosen[0][0], max_values)
    if chosen[0][1].get("SOPClassUID") == WSI_SOP_CLASS:
        return load_dicom_image(_choose_wsi_level(chosen, source, resolution_um, model_scale_um, max_values), max_values)
    for path, ds in chosen:
        _require_identity(ds, path)
    _check_size(source, sum(_declared_values(ds, path) for path, ds in chosen), "the series", max_values)
    first_path, first = chosen[0]
    row_dir, col_dir, _, spacing = _plane_geometry(first, first_path)
    for path, ds in chosen[1:]:
        other_row, other_col, _, other_spacing = _plane_geometry(ds, path)
        if not (np.allclose(other_row, row_dir, atol=1e-3) and np.allclose(other_col, col_dir, atol=1e-3)):
            raise InputError(source, "the slices of the series are not parallel (Image Orientation (Patient) differs)")
        if not np.allclose(other_spacing, spacing, rtol=1e-3):
            raise InputError(path, f"Pixel Spacing {other_spacing} differs from the series' {spacing}")
    positions = np.array([np.array(ds.ImagePositionPatient, float) for _, ds in chosen])
    order, step = _stack(positions, row_dir, col_dir, source)
    ordered = [chosen[i] for i in order]
    volume = []
    for path, _ in ordered:
        ds = _read_dicom(path, max_values=max_values)
        image = _to_float_image(ds, _pixels(ds, path))
        if image.shape != (first.Rows, first.Columns):
            raise InputError(path, f"slice of {image.shape} pixels in a series of {(first.Rows, first.Columns)}")
        volume.append(image)
    meta = {
        "kind": "series",
        "modality": str(first.get("Modality", "OT")),
        "affine": _affine_2d(spacing[0], spacing[1], row_dir, col_dir, positions[order[0]], slice_step=step),
        "frame": "PATIENT",
        "source_path": str(source),
        "source_datasets": [_header(ds) for _, ds in ordered],  # the headers read above
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")) or None,
    }
    return np.stack(volume)[..., None], meta


def _declared_values(ds: Dataset, path: Path) -> int:
    """Pixel values the header announces: rows x columns x samples x frames (or the total matrix)."""
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        if ds.get("SOPClassUID") == WSI_SOP_CLASS and "TotalPixelMatrixRows" in ds:
            return int(ds.TotalPixelMatrixRows) * int(ds.TotalPixelMatrixColumns) * samples
        return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * samples * int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise InputError(path, "Rows, Columns, Samples per Pixel or Number of Frames is not a number") from None


def load_dicom_image(path: Path, max_values: int = DEFAULT_MAX_VALUES) -> tuple[np.ndarray, dict]:
    """Load one DICOM file: a CT/MR/other single image, an enhanced volume, or a whole-slide image.

    Args:
        path: the file.
        max_values: the size guard, checked on the header before decoding.
    """
    ds = _read_dicom(path, max_values=max_values)  # the stored (possibly compressed) bytes; nothing decoded yet
    _require_identity(ds, path)
    _check_size(path, _declared_values(ds, path), "the image", max_values)
    if ds.get("SOPClassUID") == WSI_SOP_CLASS:
        return _load_dicom_wsi(ds, path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and int(ds.get("SamplesPerPixel", 1)) == 1:
        return _load_enhanced(ds, path)
    if frames > 1:
        raise InputError(path, f"multi-frame colour objects ({frames} frames) are not supported; export one frame per file")
    pixels = _pixels(ds, path)
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
        image = _to_float_image(ds, pixels)[None, ..., None]
    else:
        raise InputError(path, f"Samples per Pixel {samples} is not supported (1 or 3)")
    frame, affine = "IMAGE", _pixel_affine()
    if "ImageOrientationPatient" in ds and "ImagePositionPatient" in ds and "PixelSpacing" in ds:
        row_dir, col_dir, position, spacing = _plane_geometry(ds, path)
        affine, frame = _affine_2d(spacing[0], spacing[1], row_dir, col_dir, position), "PATIENT"
        affine[:3, 0] *= slice_thickness(ds)
    meta = {
        "kind": "image" if samples == 3 or ds.get("Modality") not in ("CT", "MR", "PT") else "series",
        "modality": str(ds.get("Modality", "OT")),
        "affine": affine,
        "frame": frame,
        "source_path": str(path),
        "source_datasets": [_header(ds)],
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")) or None,
    }
    return image, meta


def _load_dicom_wsi(ds: Dataset, path: Path) -> tuple[np.ndarray, dict]:
    """Assemble the total pixel matrix of a TILED_FULL VL Whole Slide Microscopy image."""
    if ds.get("DimensionOrganizationType", "TILED_FULL") != "TILED_FULL":
        raise InputError(path, "only TILED_FULL whole-slide images are supported (this one is TILED_SPARSE)")
    try:
        total_rows, total_cols = int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns)
        spacing = [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    except (AttributeError, IndexError, TypeError, ValueError):
        raise InputError(path, "the whole-slide image lacks Total Pixel Matrix size or Pixel Spacing") from None
    frames = _pixels(ds, path)
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
    affine = _affine_2d(spacing[0], spacing[1], (0, 1, 0), (1, 0, 0), (0, 0, 0))  # slide x right, y down
    meta = {
        "kind": "slide",
        "modality": "SM",
        "affine": affine,
        "frame": "SLIDE",
        "level0_pixels": (1.0 / spacing[1], 0.5),  # this file's own pixels
        "source_path": str(path),
        "source_datasets": [_header(ds)],
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")) or None,
    }
    return matrix[None], meta


#: Slide levels of more pixels than this are streamed tile by tile instead of read whole.
STREAM_ABOVE_PIXELS = 64 * 1024 * 1024
#: Pixels of one band when a level with no small level is thumbnailed by streaming.
BAND_PIXELS = 16 * 1024 * 1024
#: Most pixels of one TIFF tile or strip (a reader decodes one whole).
MAX_PIECE_PIXELS = 64 * 1024 * 1024
#: A slide whose smallest level has more pixels than this times the size guard is refused:
#: its tissue map would read that whole level, band by band.
STREAMED_LEVEL_FACTOR = 4

#: Widest region (pixels of the level read) that adjacent tiles are read together in.
_LONGEST_READ = 4096


@dataclass
class _Run:
    """Boxes side by side in one row, read in one call at ``level`` (``factor`` times coarser
    than the streamed level); ``members`` are (index of the box, its left, its right)."""

    level: int
    factor: float
    top: int
    bottom: int
    left: int
    right: int
    members: list[tuple[int, int, int]]


class StreamedSlide:
    """One level of a slide read tile by tile with openslide, never whole.

    It stands in for the (1, rows, cols, 3) uint8 array the loaders give: ``shape``,
    ``dtype`` and indexing ``[0, top:bottom, left:right]`` read just that region;
    :meth:`thumbnail` gives a small picture of the whole level (from the slide's own
    pyramid) for the tissue map and the Secondary Capture.

    Args:
        path: the slide file.
        level: the pyramid level.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, path: Path, level: int) -> None:
        import openslide

        self.path, self.level = Path(path), level
        self._slide = openslide.OpenSlide(str(path))
        width, height = self._slide.level_dimensions[level]
        self.shape = (1, height, width, 3)
        self._downsamples = tuple(self._slide.level_downsamples)  # openslide makes the tuple anew on each access
        self._thumbnails: dict[int, tuple[np.ndarray, float]] = {}

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, int) or not (isinstance(key, tuple) and len(key) == 3 and key[0] == 0):
            raise TypeError("a streamed slide is read as [0, rows, cols] regions only")
        rows, cols = key[1], key[2]
        top, bottom = rows.start or 0, rows.stop if rows.stop is not None else self.shape[1]
        left, right = cols.start or 0, cols.stop if cols.stop is not None else self.shape[2]
        return self._read(self.level, left, top, right - left, bottom - top)

    def regions(self, boxes: Sequence[tuple[int, int, int, int]], min_side: int) -> list[np.ndarray]:
        """The regions ``[top:bottom, left:right]`` of this level, one per box, each read from
        the coarsest level of the slide's pyramid that still gives it at least ``min_side``
        pixels a side - a tile that will be shrunk for the network need not be read at full
        resolution.

        Boxes that follow each other side by side (same rows, each starting where the one
        before ends, as the tiles of a grid row do) are read in one call and cut apart:
        an openslide call costs more than the pixels it returns.
        """
        runs: list[_Run] = []
        for index, (top, left, bottom, right) in enumerate(boxes):
            level, factor = self._coarsest_level(min(bottom - top, right - left), min_side)
            run = runs[-1] if runs else None
            if (run is not None and (run.level, run.top, run.bottom, run.right) == (level, top, bottom, left)
                    and (right - run.left) / factor <= _LONGEST_READ):
                run.right = right
                run.members.append((index, left, right))
            else:
                runs.append(_Run(level, factor, top, bottom, left, right, [(index, left, right)]))
        pieces: list[np.ndarray] = [np.empty(0)] * len(boxes)
        for run in runs:
            # Cut on the read level's own pixel lattice: openslide resamples a region that
            # starts between two of its pixels (measured three times slower per tile).
            x0, y0 = round(run.left / run.factor), round(run.top / run.factor)
            width = max(1, round(run.right / run.factor) - x0)
            height = max(1, round(run.bottom / run.factor) - y0)
            pixels = self._read(run.level, x0, y0, width, height)
            for index, left, right in run.members:
                start = min(round(left / run.factor) - x0, width - 1)
                stop = max(round(right / run.factor) - x0, start + 1)
                pieces[index] = pixels[:, start:stop]
        return pieces

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 pixels of pyramid ``level`` from its pixel (x, y)."""
        import openslide

        downsample = self._downsamples[level]
        location = (int(round(x * downsample)), int(round(y * downsample)))  # openslide wants level-0 pixels
        try:
            region = self._slide.read_region(location, level, (width, height))
        except openslide.OpenSlideError as error:
            raise InputError(self.path, f"cannot read a region of level {level} ({error})") from None
        return np.asarray(region.convert("RGB"))

    def _coarsest_level(self, side: int, min_side: int) -> tuple[int, float]:
        """The coarsest pyramid level (and its downsample relative to this one) at which
        ``side`` pixels of this level are still at least ``min_side``."""
        best, best_factor = self.level, 1.0
        for level, downsample in enumerate(self._downsamples):
            factor = downsample / self._downsamples[self.level]
            if factor > best_factor and side / factor >= min_side:
                best, best_factor = level, factor
        return best, best_factor

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """(rows', cols', 3) uint8 picture of the level no larger than ``max_side``, and its scale.

        Kept once made: the tissue map and the rendered heatmap ask for the same one, and
        making it reads a whole pyramid level (about a second on a 40k slide).
        """
        if max_side not in self._thumbnails:
            height, width = self.shape[1:3]
            scale = min(1.0, max_side / max(height, width))
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            source = self._slide.get_best_level_for_downsample(self._downsamples[self.level] / scale)
            source_width, source_height = self._slide.level_dimensions[source]
            if source_width * source_height <= STREAM_ABOVE_PIXELS:
                picture = np.asarray(self._slide.get_thumbnail(size).convert("RGB").resize(size))
            else:  # no small level: openslide would hold the whole level; read it in bands instead
                picture = self._banded_thumbnail(source, size)
            picture.flags.writeable = False
            self._thumbnails[max_side] = (picture, picture.shape[0] / height)
        return self._thumbnails[max_side]


    def _banded_thumbnail(self, level: int, size: tuple[int, int]) -> np.ndarray:
        """A ``size`` picture of pyramid ``level`` read in bands of rows, each shrunk before
        the next is read: memory stays at one band however large the level."""
        from PIL import Image

        width, height = self._slide.level_dimensions[level]
        band = max(1, BAND_PIXELS // width)
        rows = []
        for top in range(0, height, band):
            rows_here = min(band, height - top)
            pixels = self._read(level, 0, top, width, rows_here)
            out_top, out_bottom = round(top * size[1] / height), round((top + rows_here) * size[1] / height)
            if out_bottom > out_top:
                rows.append(np.asarray(Image.fromarray(pixels).resize((size[0], out_bottom - out_top), Image.BOX)))
        return np.concatenate(rows)


def _check_tiff_layout(path: Path, max_values: int) -> None:
    """Refuse a TIFF-based slide whose tiles or strips, or whose smallest level, no reader
    could hold, before openslide opens it (a tile side of 2**20 aborts openslide's
    process; a 200,000-pixel-square level without a smaller one cannot be mapped)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            pages = [(page.imagewidth, page.imagelength, page.tilewidth, page.tilelength, page.rowsperstrip)
                     for page in tiff.pages]
    except Exception:  # not a TIFF (another openslide format), or damaged: openslide judges it
        return
    for index, (width, length, tile_width, tile_length, rows_per_strip) in enumerate(pages):
        piece = tile_width * tile_length if tile_width else width * min(rows_per_strip or length, length)
        if piece > MAX_PIECE_PIXELS:
            what = f"tiles of {tile_width} x {tile_length}" if tile_width else f"strips of {width} x {rows_per_strip}"
            raise InputError(path, f"TIFF page {index} has {what} pixels, more than any reader can hold at once "
                                   f"({MAX_PIECE_PIXELS:,}); refused before reading")
    smallest = min((width * length for width, length, *_ in pages), default=0)
    if smallest > STREAMED_LEVEL_FACTOR * max_values:
        raise InputError(path, f"the slide's smallest level has {smallest:,} pixels and no smaller level to map its "
                               "tissue from; raise the limit (--max-megavalues) only if you can wait for it to be read")


def load_slide(path: Path, resolution_um: float | None = None, max_values: int = DEFAULT_MAX_VALUES,
               stream_above: int | None = None, level: int | None = None,
               model_scale_um: float | None = None) -> tuple[np.ndarray | StreamedSlide, dict]:
    """Read one level of an SVS/TIFF slide with openslide; large levels are streamed.

    Args:
        resolution_um: wanted pixel spacing in micrometres; the level closest to it is read. By default
            the level ``model_scale_um`` suits, or else the finest level whose larger side is at
            most 4096 pixels.
        max_values: the size guard for a level read whole.
        stream_above: a level of more pixels is returned as a :class:`StreamedSlide`
            (default :data:`STREAM_ABOVE_PIXELS`).
        level: read this pyramid level (0 = full resolution) instead of choosing one.
        model_scale_um: micrometres per pixel of the model's input. Without ``resolution_um``
            or ``level``, a slide that states its pixel size is read at the coarsest level
            not much coarser than this (see :data:`MODEL_SCALE_SLACK`), so that the model's
            patches keep their detail.
    """
    import openslide

    _check_tiff_layout(path, max_values)
    try:
        slide = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as error:
        raise InputError(path, f"cannot open the slide ({error})") from None
    with slide:
        mpp = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        quickhash = slide.properties.get("openslide.quickhash-1")
        base_mm = float(mpp) / 1000 if mpp else None
        downsamples = slide.level_downsamples
        if level is not None:
            if not 0 <= level < slide.level_count:
                raise InputError(path, f"the slide has levels 0..{slide.level_count - 1}, not {level}")
        elif resolution_um is not None and base_mm:
            level = int(np.argmin([abs(np.log(base_mm * 1000 * d / resolution_um)) for d in downsamples]))
        elif model_scale_um is not None and base_mm:
            level = _default_level([base_mm * 1000 * d for d in downsamples], model_scale_um)
        else:
            fitting = [i for i, (w, h) in enumerate(slide.level_dimensions) if max(w, h) <= DEFAULT_SLIDE_SIDE]
            level = fitting[0] if fitting else slide.level_count - 1
        width, height = slide.level_dimensions[level]
        spacing = base_mm * downsamples[level] if base_mm else None
        if width * height > (STREAM_ABOVE_PIXELS if stream_above is None else stream_above):
            region = None
        else:
            _check_size(path, width * height * 3, f"level {level} of the slide", max_values)
            try:
                region = np.asarray(slide.read_region((0, 0), level, (width, height)).convert("RGB"))[None]
            except openslide.OpenSlideError as error:
                raise InputError(path, f"cannot read level {level} of the slide ({error})") from None
    meta = {
        "kind": "slide",
        "modality": "SM",
        "affine": _pixel_affine(spacing or 1.0),
        "frame": "SLIDE" if spacing else "IMAGE",
        # level-0 pixels per frame unit (mm, or pixels of this level), centres half a pixel in
        "level0_pixels": (1.0 / base_mm if spacing else downsamples[level], 0.5 * downsamples[level]),
        "source_path": str(path),
        "source_datasets": [],
        "frame_of_reference_uid": None,
        "content_key": f"openslide-quickhash-1:{quickhash}" if quickhash else None,
    }
    return (StreamedSlide(path, level) if region is None else region), meta


def load_picture(path: Path, max_values: int = DEFAULT_MAX_VALUES, pixel_size_um: float | None = None) -> tuple[np.ndarray, dict]:
    """Read a PNG/JPEG export as RGB.

    A picture carries no physical size: without ``pixel_size_um`` its frame is ``"IMAGE"``
    (pixels); with it, the picture is taken as a slide region of that pixel size (frame
    ``"SLIDE"``, lengths in mm), so tile sizes in micrometres and scale bars work.
    """
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # our own guard below, on the declared size, before decoding
    try:
        with Image.open(path) as picture:
            _check_size(path, picture.width * picture.height * 3, "the picture", max_values)
            image = np.asarray(picture if picture.mode == "RGB" else picture.convert("RGB"))  # no second copy
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:  # Pillow's PNG chunk errors are SyntaxError
        raise InputError(path, f"cannot read the picture ({type(error).__name__}: the file is damaged or not an image)") from None
    meta = {
        "kind": "image",
        "modality": "OT",
        "affine": _pixel_affine(pixel_size_um / 1000 if pixel_size_um else 1.0),
        "frame": "SLIDE" if pixel_size_um else "IMAGE",
        "level0_pixels": (1000.0 / pixel_size_um if pixel_size_um else 1.0, 0.5),
        "source_path": str(path),
        "source_datasets": [],
        "frame_of_reference_uid": None,
    }
    return image[None], meta


class LoadInput(Transform):
    """Load any supported input path: a DICOM folder or file, a slide, a picture.

    Args:
        series_uid: which series to load from a folder holding several.
        resolution_um: wanted pixel spacing for slides in micrometres (the nearest level is read).
        max_values: most pixel values the input may decode to, checked on its header
            before decoding.
        level: for SVS/TIFF slides, the pyramid level to read (instead of choosing one).
        pixel_size_um: the pixel size of a PNG/JPEG picture in micrometres, which the file
            cannot say; refused for other inputs, which say their own.
        model_scale_um: micrometres per pixel of the model's input: without
            ``resolution_um`` or ``level``, slides are read at a level that suits it.

    Returns ``(image, meta)``; see the module docstring.
    """

    def __init__(self, series_uid: str | None = None, resolution_um: float | None = None,
                 max_values: int = DEFAULT_MAX_VALUES, level: int | None = None,
                 pixel_size_um: float | None = None, model_scale_um: float | None = None) -> None:
        if max_values < 1:
            raise ValueError(f"max_values must be positive, got {max_values}")
        self.series_uid = series_uid
        self.resolution_um = resolution_um
        self.max_values = max_values
        self.level = level
        self.pixel_size_um = pixel_size_um
        self.model_scale_um = model_scale_um

    def __call__(self, path: str | Path) -> tuple[np.ndarray, dict]:
        path = Path(path)
        if not path.exists():
            raise InputError(path, "no such file or folder")
        if path.is_dir():
            inside = path.resolve()
            # a link that leads out of the folder is not part of the series (nor read)
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                           and p.resolve().is_relative_to(inside))
            if not files:
                raise InputError(path, "the folder is empty")
            return load_dicom_series(files, path, self.series_uid, self.resolution_um, self.max_values, self.model_scale_um)
        suffix = path.suffix.lower()
        if suffix in PICTURE_SUFFIXES:
            return load_picture(path, self.max_values, self.pixel_size_um)
        if self.pixel_size_um is not None:
            raise InputError(path, "a pixel size can be declared for PNG/JPEG pictures only; this input states its own "
                                   "(or reads as unknown)")
        if suffix in SLIDE_SUFFIXES:
            return load_slide(path, self.resolution_um, self.max_values, level=self.level, model_scale_um=self.model_scale_um)
        if path.stat().st_size == 0:
            raise InputError(path, "the file is empty")
        return load_dicom_image(path, self.max_values)


class LoadInputd(MapTransform):
    """Dictionary form of :class:`LoadInput`: ``data[key]`` (a path) becomes the image,
    its metadata goes to ``data[f"{key}_meta_dict"]``."""

    def __init__(self, keys: str | Sequence[str], series_uid: str | None = None, resolution_um: float | None = None,
                 max_values: int = DEFAULT_MAX_VALUES, level: int | None = None, pixel_size_um: float | None = None,
                 model_scale_um: float | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadInput(series_uid, resolution_um, max_values, level, pixel_size_um, model_scale_um)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], d[f"{key}_meta_dict"] = self.loader(d[key])
        return d
