"""Labelled CT and MR series the project makes itself: real slices, synthetic lesions.

No public labelled CT/MR set can be fetched onto the project's machines, so the radiology
training is checked on series built from the real CT and MR slices that pydicom ships
(``CT_small.dcm``, 128 x 128 at 0.66 mm; ``MR_small.dcm``, 64 x 64, upsampled to 128 x 128
and declared at 0.625 mm so that a 10 mm tile spans 16 pixels - its anatomy is not to
scale). Each series is one "patient": the slice flipped or turned, its intensity scaled,
a slow drift and fresh noise from slice to slice. Into it goes one lesion: an ellipsoid
of 7-11 mm radii, brighter than soft tissue (CT 85-115 HU; MR near the 95th percentile)
with a blotchy texture, and in most series a tail of 14-22 mm in a known direction in
the axial plane. Each is written as a DICOM series with a DICOM Segmentation of the
lesion (highdicom), or every fourth with a NIfTI mask, and listed in a MONAI datalist.
``truth.json`` holds each series' tail direction in patient coordinates (LPS).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = ["make_lesion_datalist"]

SLICES = 8
SLICE_SPACING_MM = 3.0


def _base_slice(modality: str) -> tuple[pydicom.Dataset, np.ndarray, float]:
    """The template dataset, its modality values (rows, cols) and the pixel spacing (mm)."""
    if modality == "CT":
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        return ds, ds.pixel_array.astype(np.float64) + float(ds.RescaleIntercept), float(ds.PixelSpacing[0])
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    values = np.kron(ds.pixel_array.astype(np.float64), np.ones((2, 2)))  # 128 x 128
    return ds, values, 0.625


def _blur(values: np.ndarray, passes: int = 2) -> np.ndarray:
    """A few 3 x 3 box blurs over the last two axes (a texture's grain)."""
    for _ in range(passes):
        padded = np.pad(values, [(0, 0)] * (values.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
        values = sum(padded[..., i : i + values.shape[-2], j : j + values.shape[-1]] for i in range(3) for j in range(3)) / 9
    return values


def _series(modality: str, rng: np.random.Generator) -> tuple[pydicom.Dataset, np.ndarray, np.ndarray, dict]:
    """(template, volume (slices, rows, cols) of modality values, lesion mask, truth)."""
    ds, base, spacing = _base_slice(modality)
    base = np.rot90(base, int(rng.integers(4)))
    if rng.random() < 0.5:
        base = base[:, ::-1]
    scale = float(rng.uniform(0.93, 1.07))
    drift = rng.normal(0, 0.5, 2)
    slices = []
    for index in range(SLICES):
        shift = np.round(drift * (index - SLICES / 2)).astype(int)
        plane = np.roll(base, tuple(shift), axis=(0, 1)) * scale
        noise = 8.0 if modality == "CT" else 0.02 * float(np.percentile(base, 90))
        slices.append(plane + rng.normal(0, noise, plane.shape))
    volume = np.stack(slices)
    rows, cols = base.shape
    z, y, x = np.meshgrid(np.arange(SLICES) * SLICE_SPACING_MM, np.arange(rows) * spacing, np.arange(cols) * spacing,
                          indexing="ij")
    # the lesion's centre: on tissue, at least 16 mm from the edges, in the middle slices
    low, high = (-150, 200) if modality == "CT" else np.percentile(base, [30, 90])
    tissue = (base > low) & (base < high)  # soft tissue, not fat, air or bone
    margin = int(np.ceil(16 / spacing))
    candidates = np.argwhere(tissue[margin:-margin, margin:-margin]) + margin
    row, col = candidates[rng.integers(len(candidates))]
    centre = np.array([SLICE_SPACING_MM * (SLICES - 1) / 2 + rng.uniform(-3, 3), row * spacing, col * spacing])
    radii = np.array([rng.uniform(5, 7), rng.uniform(8, 12), rng.uniform(8, 12)])
    offset = np.stack([z - centre[0], y - centre[1], x - centre[2]], axis=-1)
    lesion = ((offset / radii) ** 2).sum(-1) <= 1
    tail = None
    if rng.random() < 0.7:
        length = radii[1:].max() + rng.uniform(26, 34)
        extent = np.array([rows, cols]) * spacing
        for _ in range(100):  # a direction in which the tail stays inside the image
            angle = rng.uniform(0, 2 * np.pi)
            end = centre[1:] + length * np.array([np.sin(angle), np.cos(angle)])
            if np.all(end > 4) and np.all(end < extent - 4):
                break
        along_image = np.array([0.0, np.sin(angle), np.cos(angle)])  # (slice, row, col) in mm
        along = offset @ along_image
        across = np.linalg.norm(offset - along[..., None] * along_image, axis=-1)
        width = 6.0 * (1 - 0.35 * np.clip(along / length, 0, 1))  # tapering
        lesion |= (along >= 0) & (along <= length) & (across <= width)
        tail = along_image
    texture = _blur(rng.normal(0, 1, volume.shape))
    texture /= texture.std()
    if modality == "CT":
        inside = rng.uniform(85, 115) + 18 * texture
    else:
        high = float(np.percentile(base, 95))
        inside = high * (1 + 0.12 * texture)
    volume = np.where(lesion, 0.15 * volume + 0.85 * inside, volume)
    # patient coordinates of the template's axial plane: +x along a row, +y down a column
    direction = None if tail is None else [float(tail[2]), float(tail[1]), 0.0]
    return ds, volume, lesion, {"modality": modality, "tail_direction_lps": direction, "spacing": spacing}


def _write_dicom(folder: Path, template: pydicom.Dataset, volume: np.ndarray, spacing: float, number: int,
                 seed: int) -> list[pydicom.Dataset]:
    folder.mkdir(parents=True, exist_ok=True)
    uid = lambda *parts: generate_uid(entropy_srcs=[str(seed), str(number), *map(str, parts)])  # noqa: E731
    datasets = []
    for index, plane in enumerate(volume):
        ds = copy.deepcopy(template)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PatientID, ds.PatientName = f"SYN{number:03d}", f"Synthetic^Lesion{number:03d}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uid("study"), uid("series"), uid("frame")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("slice", index)
        ds.StudyID, ds.AccessionNumber, ds.SeriesNumber, ds.InstanceNumber = str(number), "", 1, index + 1
        ds.SeriesDescription = "synthetic lesion on a pydicom test slice"
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = SLICE_SPACING_MM
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, index * SLICE_SPACING_MM]
        ds.SliceLocation = index * SLICE_SPACING_MM
        if ds.Modality == "CT":
            ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
            stored = np.clip(np.round(plane + 1024), -32768, 32767)
        else:
            stored = np.clip(np.round(plane), 0, 32767)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = stored.astype(np.int16).tobytes()
        for keyword in ("LargestImagePixelValue", "SmallestImagePixelValue", "WindowCenter", "WindowWidth"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(folder / f"slice{index:03d}.dcm", enforce_file_format=True)
        datasets.append(ds)
    return datasets


def _write_seg(path: Path, datasets: list[pydicom.Dataset], lesion: np.ndarray, number: int, seed: int) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=lesion.astype(np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=generate_uid(entropy_srcs=[str(seed), str(number), "seg"]),
        series_number=100, sop_instance_uid=generate_uid(entropy_srcs=[str(seed), str(number), "seg-instance"]),
        instance_number=1, manufacturer="dicom-heatmap", manufacturer_model_name="synthetic lesions",
        software_versions="1", device_serial_number="0")
    seg.save_as(path)


def _write_nifti(path: Path, lesion: np.ndarray, spacing: float) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(lesion.astype(np.uint8))  # (slices, rows, cols) = (k, j, i)
    image.SetSpacing((spacing, spacing, SLICE_SPACING_MM))
    image.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(image, str(path))


def make_lesion_datalist(out_dir: str | Path, series: int = 36, validation: int = 12, seed: int = 0,
                         mr_every: int = 3, nifti_every: int = 4) -> Path:
    """Write ``series`` labelled series and ``OUT/datalist.json`` (the last ``validation``
    series validate) and ``OUT/truth.json``.

    Args:
        out_dir: the folder (made when missing).
        series: how many series (one patient each).
        validation: how many of them validate.
        seed: the random seed (the same seed, the same files).
        mr_every: every n-th series is MR (0: all CT).
        nifti_every: every n-th series has a NIfTI mask instead of a SEG (0: all SEG).

    Returns:
        the datalist's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, truth = [], {}
    for number in range(1, series + 1):
        modality = "MR" if mr_every and number % mr_every == 0 else "CT"
        template, volume, lesion, facts = _series(modality, rng)
        name = f"{modality.lower()}{number:03d}"
        datasets = _write_dicom(out / "series" / name, template, volume, facts["spacing"], number, seed)
        if nifti_every and number % nifti_every == 0:
            label = out / "labels" / f"{name}.nii.gz"
            label.parent.mkdir(exist_ok=True)
            _write_nifti(label, lesion, facts["spacing"])
        else:
            label = out / "labels" / f"{name}_seg.dcm"
            label.parent.mkdir(exist_ok=True)
            _write_seg(label, datasets, lesion, number, seed)
        entries.append({"image": f"series/{name}", "label": str(label.relative_to(out))})
        truth[f"series/{name}"] = facts
    datalist = {"description": "synthetic lesions in pydicom's CT and MR test slices (dicom-heatmap)",
                "training": entries[: series - validation], "validation": entries[series - validation :]}
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=1))
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return path
