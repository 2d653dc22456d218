"""One datalist entry read as the analysis reads it, with its lesion mask on the same voxels.

:func:`load_labelled` runs the analysis's own preprocessing (:func:`dicom_heatmap.api.preprocessing`:
the loader, the model's intensity normalisation, the grid at the model's field of view),
reads the label onto the loaded image's voxels and gives each grid tile its lesion share.

Labels:

* a DICOM Segmentation (read with highdicom): it must reference the image's series; its
  frames are matched to the image's slices by SOP Instance UID (by frame number for an
  enhanced multi-frame image); a fractional SEG counts from 0.5;
* a NIfTI mask: its voxel grid must be the image's (the same voxels in any axis order
  or flip: its geometry is compared with the image's); with ``segment`` a label map's
  value, otherwise every non-zero voxel.

A label on another grid, a SEG of another series, a mask with no lesion voxel: one
:class:`~dicom_heatmap.errors.InputError` naming the pair; nothing is trained.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.uid import SegmentationStorage

from dicom_heatmap.api import AnalysisSettings, preprocessing, project_errors
from dicom_heatmap.domain import input_body_part
from dicom_heatmap.errors import InputError
from dicom_heatmap.scorer import TileScorer
from pipelines.training.datalist import DatalistEntry
from transforms._dictionary import meta_key
from transforms.grid import TileGrid

__all__ = ["LabelledImage", "load_labelled", "read_lesion_mask"]

@dataclass
class LabelledImage:
    """An image as the analysis sees it, with its lesion.

    Attributes:
        entry: the datalist entry.
        image: (slices, rows, cols, 3) uint8 after the model's normalisation.
        meta: the loader's metadata.
        grid: the tile grid at the model's field of view.
        lesion: (slices, rows, cols) bool lesion voxels.
        share: (slices, R, C) lesion share of each tile.
        patient: whom the image is of (the datalist's ``patient``, the Patient ID, else the
            Study Instance UID).
    """

    entry: DatalistEntry
    image: np.ndarray
    meta: dict
    grid: TileGrid
    lesion: np.ndarray
    share: np.ndarray
    patient: str

    @property
    def body_part(self) -> str | None:
        return input_body_part(self.meta)


def load_labelled(entry: DatalistEntry, scorer: TileScorer, settings: AnalysisSettings) -> LabelledImage:
    """Read ``entry``'s image as :func:`dicom_heatmap.analyze` would with ``scorer``, and its label.

    Raises:
        InputError: the image cannot be read, or the label does not fit it (the message
            names the pair).
    """
    with warnings.catch_warnings(), project_errors():
        warnings.simplefilter("ignore")
        data = preprocessing(settings, model=scorer)({"image": entry.image})
    image, meta, grid = np.asarray(data["image"]), data[meta_key("image")], data["image_grid"]
    if meta["modality"] not in ("CT", "MR"):
        raise InputError(entry.image, f"{entry.where}: the image is not CT or MR (Modality {meta['modality']!r}); "
                                      "a radiology model learns from CT and MR series")
    lesion = read_lesion_mask(entry, meta, image.shape[:3])
    if not lesion.any():
        raise InputError(entry.label, f"{entry.where}: the mask marks no lesion voxel of {entry.image.name}: nothing to "
                                      "learn a lesion from (leave the pair out, or label the lesion)")
    sources = meta.get("source_datasets") or []
    patient = entry.patient or next((str(sources[0].get(k, "") or "") for k in ("PatientID", "StudyInstanceUID")
                                     if sources and str(sources[0].get(k, "") or "")), str(entry.image))
    return LabelledImage(entry, image, meta, grid, lesion, grid.share(lesion), patient)


def read_lesion_mask(entry: DatalistEntry, meta: dict, shape: tuple[int, int, int]) -> np.ndarray:
    """(slices, rows, cols) bool lesion mask of ``entry.label`` on the loaded image's voxels.

    Args:
        entry: the pair.
        meta: the loaded image's metadata (affine, source datasets, frame numbers).
        shape: (slices, rows, cols) of the loaded image.
    """
    name = entry.label.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _nifti_mask(entry, meta, shape)
    try:
        header = pydicom.dcmread(entry.label, stop_before_pixels=True)
    except Exception:  # pydicom raises several kinds on what is not DICOM
        header = None
    if header is None or header.get("SOPClassUID") != SegmentationStorage:
        raise InputError(entry.label, f"{entry.where}: the label is neither a DICOM Segmentation nor a NIfTI mask "
                                      "(.nii, .nii.gz)")
    return _seg_mask(entry, meta, shape)


def _seg_mask(entry: DatalistEntry, meta: dict, shape: tuple[int, int, int]) -> np.ndarray:
    import highdicom as hd

    try:
        seg = hd.seg.segread(entry.label)
    except Exception as error:  # highdicom and pydicom raise several kinds on a damaged object
        raise InputError(entry.label, f"{entry.where}: cannot read the Segmentation ({type(error).__name__})") from None
    sources = meta["source_datasets"]
    series = str(sources[0].SeriesInstanceUID)
    referenced = [str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])]
    if series not in referenced:
        raise InputError(entry.label, f"{entry.where}: the Segmentation references series "
                                      f"{', '.join(referenced) or 'none'}, not the image's series {series}")
    number = _segment_number(entry, seg)
    try:
        if meta.get("frame_numbers"):  # an enhanced multi-frame image: its frames in their order in space
            pixels = seg.get_pixels_by_source_frame(str(sources[0].SOPInstanceUID), meta["frame_numbers"],
                                                    segment_numbers=[number], assert_missing_frames_are_empty=True)
        else:
            pixels = seg.get_pixels_by_source_instance([str(ds.SOPInstanceUID) for ds in sources], segment_numbers=[number],
                                                       assert_missing_frames_are_empty=True)
    except (ValueError, KeyError, IndexError, RuntimeError) as error:
        raise InputError(entry.label, f"{entry.where}: its frames do not map onto the image's "
                                      f"({str(error).splitlines()[0][:160]})") from None
    mask = np.asarray(pixels)[..., 0] >= (0.5 if np.asarray(pixels).dtype.kind == "f" else 1)
    if mask.shape != tuple(shape):
        raise InputError(entry.label, f"{entry.where}: the Segmentation's geometry {mask.shape} is not the image's "
                                      f"{tuple(shape)} (slices, rows, columns)")
    return mask


def _segment_number(entry: DatalistEntry, seg) -> int:
    """The segment ``entry.segment`` names (number or label), or the SEG's only one."""
    labels = {int(n): str(seg.get_segment_description(n).segment_label) for n in seg.segment_numbers}
    if entry.segment is None:
        if len(labels) != 1:
            raise InputError(entry.label, f"{entry.where}: the Segmentation has {len(labels)} segments "
                                          f"({', '.join(f'{n} {v!r}' for n, v in labels.items())}); give \"segment\"")
        return next(iter(labels))
    chosen = [n for n, label in labels.items() if entry.segment in (n, label)]
    if not chosen:
        raise InputError(entry.label, f"{entry.where}: no segment {entry.segment!r} (it has "
                                      f"{', '.join(f'{n} {v!r}' for n, v in labels.items())})")
    return chosen[0]


def _nifti_mask(entry: DatalistEntry, meta: dict, shape: tuple[int, int, int]) -> np.ndarray:
    """A NIfTI mask brought onto the image's voxels, which it must share (read with
    SimpleITK, which gives its geometry in LPS, as DICOM's)."""
    import SimpleITK as sitk

    try:
        nifti = sitk.ReadImage(str(entry.label))
    except RuntimeError as error:
        raise InputError(entry.label, f"{entry.where}: cannot read the NIfTI mask ({type(error).__name__})") from None
    if nifti.GetDimension() != 3:
        raise InputError(entry.label, f"{entry.where}: the NIfTI mask has {nifti.GetDimension()} dimensions, not 3")
    if meta["frame"] != "PATIENT":
        raise InputError(entry.image, f"{entry.where}: the image states no position in the patient, so a NIfTI mask "
                                      "cannot be placed on it; use a DICOM Segmentation")
    values = sitk.GetArrayFromImage(nifti)  # axes (k, j, i)
    to_patient = np.eye(4)
    to_patient[:3, :3] = (np.reshape(nifti.GetDirection(), (3, 3)) @ np.diag(nifti.GetSpacing()))[:, ::-1]
    to_patient[:3, 3] = nifti.GetOrigin()
    # image index (slice, row, col) -> mask array index: must be a signed permutation plus whole offsets
    to_mask = np.linalg.inv(to_patient) @ meta["affine"]
    permutation = np.round(to_mask[:3, :3])
    offset = np.round(to_mask[:3, 3])
    if (not np.allclose(to_mask[:3, :3], permutation, atol=1e-2) or not np.allclose(to_mask[:3, 3], offset, atol=1e-2)
            or sorted(np.abs(permutation).sum(axis=0)) != [1, 1, 1] or sorted(np.abs(permutation).sum(axis=1)) != [1, 1, 1]):
        raise InputError(entry.label, f"{entry.where}: the mask's voxel grid (origin, spacing, direction) is not the "
                                      "image's: resample it onto the image first")
    axes = [int(np.argmax(np.abs(permutation[:, a]))) for a in range(3)]
    index = []
    for image_axis, mask_axis in enumerate(axes):
        steps = np.arange(shape[image_axis]) * permutation[mask_axis, image_axis] + offset[mask_axis]
        if steps.min() < 0 or steps.max() >= values.shape[mask_axis]:
            raise InputError(entry.label, f"{entry.where}: the mask ({'x'.join(map(str, values.shape[::-1]))} voxels) does "
                                          f"not cover the image ({'x'.join(map(str, shape))}, slices x rows x columns)")
        index.append(steps.astype(np.int64))
    aligned = values.transpose(axes)[np.ix_(*index)]
    return aligned == entry.segment if isinstance(entry.segment, int) else aligned > 0
