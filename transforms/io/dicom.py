"""Reading one DICOM file as the loaders need it: the header checked, pixel data decoded
only after the guards, geometry and modality values read and checked.

The DICOM loaders (:mod:`~transforms.io.dicom_series`, :mod:`~transforms.io.dicom_wsi`)
build on these helpers; header text is untrusted, so what a message quotes from it is
checked first (:func:`shown_uid`, :func:`shown_code`).
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from transforms.errors import InputError, NotDicomError, is_uid
from transforms.io.common import input_meta, orthonormal
from transforms.io.guards import DEFAULT_MAX_VALUES, check_codestreams, check_deflated_size, deflated_body_offset

__all__ = ["read_dicom", "require_identity", "decode_pixels", "decode_frames", "header_only", "plane_geometry",
           "modality_values", "rescale_of", "slice_thickness", "frame_group", "dicom_meta", "shown_uid", "shown_code"]

# pydicom warns about every over-long value of real-world headers (a 66-character UID,
# say); the loaders judge what matters and raise InputError for it
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

#: A DICOM Code String (CS) value, e.g. a Modality.
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")


def read_dicom(path: Path, pixels: bool = True, max_values: int = DEFAULT_MAX_VALUES) -> Dataset:
    """The dataset of ``path``, every element parsed (a damaged one surfaces here).

    Raises:
        NotDicomError: the file is no DICOM file.
        InputError: it is damaged, truncated, or a deflated body beyond the size guard.
    """
    offset = deflated_body_offset(path)
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
        raise NotDicomError(path, "not a DICOM file (no DICM preamble and no readable DICOM header)") from None
    except Exception as error:  # pydicom raises many kinds on a damaged file
        raise InputError(path, f"the DICOM file is damaged or truncated ({type(error).__name__})") from None


def shown_uid(value) -> str:
    """A header UID as a message may quote it: only if it is one (header text is untrusted)."""
    text = str(value or "")
    return text if is_uid(text) else "(not a valid UID)"


def shown_code(value) -> str:
    """A header code string (Modality) as a message may quote it: only if it is a valid CS."""
    text = str(value or "")
    return text if _CODE_STRING.fullmatch(text) else "?"


def slice_thickness(ds: Dataset) -> float:
    """Slice Thickness in mm where it is a positive finite number; 1 otherwise (a negative or
    infinite value would flip or break the geometry the outputs describe)."""
    try:
        value = float(ds.get("SliceThickness", 1) or 1)
    except (TypeError, ValueError):
        return 1.0
    return value if np.isfinite(value) and value > 0 else 1.0


def require_identity(ds: Dataset, path: Path) -> None:
    """The UIDs every output derives from and refers to must be there, and the character set
    the outputs will copy the patient's values in must be one DICOM defines."""
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(keyword, "") or "").strip():
            raise InputError(path, f"the header lacks {keyword}, which the results refer to")
    charset = ds.get("SpecificCharacterSet")
    values = [] if not charset else [charset] if isinstance(charset, str) else list(charset)
    for index, value in enumerate(values):
        if str(value) not in pydicom.charset.python_encoding or (value == "" and index > 0):
            raise InputError(path, f"Specific Character Set {shown_code(value)} is not a term DICOM defines, so the "
                                   "patient's names can be neither read nor copied exactly")


def decode_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """The decoded pixel data, once the codestreams agree with the header (the size guard
    on the header has run before)."""
    _check_decodable(ds, path)
    with _decoder_errors(ds, path), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.pixel_array


def decode_frames(ds: Dataset, path: Path, indices: range) -> Iterator[np.ndarray]:
    """The frames ``indices`` decoded one at a time (never all at once), once the
    codestreams agree with the header."""
    _check_decodable(ds, path)
    with _decoder_errors(ds, path), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield from pydicom.pixels.iter_pixels(ds, indices=indices)


def _check_decodable(ds: Dataset, path: Path) -> None:
    if "PixelData" not in ds:
        raise InputError(path, "the DICOM object holds no pixel data (PixelData is missing)")
    for keyword in ("Rows", "Columns"):
        if not ds.get(keyword):
            raise InputError(path, f"the DICOM header lacks {keyword}")
    check_codestreams(ds, path)  # a decoder allocates what the codestream declares, not the header


@contextlib.contextmanager
def _decoder_errors(ds: Dataset, path: Path) -> Iterator[None]:
    """Whatever a decoder raises, as one :class:`InputError` naming the transfer syntax."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit, InputError):
        raise
    except BaseException as error:  # decoders in Rust raise PanicException, a BaseException
        raise InputError(
            path,
            f"cannot decode the pixel data (transfer syntax {shown_uid(ds.file_meta.get('TransferSyntaxUID'))}: "
            f"{type(error).__name__}); the file may be truncated or use an unsupported compression",
        ) from None


def header_only(ds: Dataset) -> Dataset:
    """A copy of the dataset without its pixel data, for writers."""
    header = Dataset()
    header.update({tag: element for tag, element in ds.items() if tag != 0x7FE00010})
    header.file_meta = ds.file_meta if hasattr(ds, "file_meta") else Dataset()
    return header


def dicom_meta(ds: Dataset, kind: str, affine: np.ndarray, frame: str, source_path: Path,
               headers: list[Dataset] | None = None, modality: str | None = None, **extra) -> dict:
    """:func:`~transforms.io.common.input_meta` of a DICOM input whose first (or only)
    dataset is ``ds``; ``headers`` are the datasets the writers refer to (``ds`` without
    its pixel data by default)."""
    return input_meta(kind, modality or str(ds.get("Modality", "OT")), affine, frame, source_path,
                      headers if headers is not None else [header_only(ds)],
                      str(ds.get("FrameOfReferenceUID", "")) or None, **extra)


def plane_geometry(ds: Dataset, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """(row direction, column direction, position, pixel spacing) of an image plane, checked:
    orthogonal unit vectors, finite positions, positive finite spacing."""
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
    if not orthonormal(orientation[:3], orientation[3:]):
        raise InputError(path, "Image Orientation (Patient) is not two orthogonal unit vectors")
    col_dir, row_dir = orientation[:3], orientation[3:]  # DICOM: first along a row (columns increase)
    return row_dir, col_dir, position, spacing


def modality_values(pixels: np.ndarray, photometric: str | None,
                    rescale: tuple[float, float] | list[tuple[float, float]]) -> np.ndarray:
    """Grey pixels as float32 modality values (HU for CT), MONOCHROME1's inversion undone.

    Args:
        pixels: (rows, cols) of one image, or (frames, rows, cols).
        photometric: the Photometric Interpretation.
        rescale: (slope, intercept) of the whole image, or a list of one pair per frame
            (an enhanced multi-frame object's Pixel Value Transformation).
    """
    if isinstance(rescale, tuple):
        slope, intercept = rescale
        values = pixels.astype(np.float32) * slope + intercept
    else:
        values = np.empty(pixels.shape, dtype=np.float32)
        for index, (slope, intercept) in enumerate(rescale):
            values[index] = pixels[index] * slope + intercept
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values
    return values


def rescale_of(ds: Dataset, path: Path | None = None) -> tuple[float, float]:
    """(Rescale Slope, Rescale Intercept) of ``ds``, identity where absent; refused where
    either is not a finite number (every value would come out NaN or infinite)."""
    try:
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        slope = intercept = math.nan
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise InputError(path or "the DICOM object", "Rescale Slope or Rescale Intercept is not a finite number")
    return slope, intercept


def frame_group(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The functional group ``sequence`` of frame ``index``: per-frame first, then shared."""
    for groups, item in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        container = ds.get(groups)
        if container and len(container) > item:
            value = container[item].get(sequence)
            if value:  # a non-empty sequence
                return value[0]
    return None
