"""Synthetic CT series with a known object, written as real DICOM in any orientation."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from dicom_heatmap.scorer import TileScorer, TileScores

DATA = Path(__file__).resolve().parent / "data"


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    x, y, z = axis
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + s * k + (1 - c) * (k @ k)


#: (first IOP triplet: along a row, second: down a column) of the planes the tests use
ORIENTATIONS = {
    "axial": ((1, 0, 0), (0, 1, 0)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
    "oblique": tuple(tuple(rotation((1, 1, 0), 35) @ v) for v in ((1, 0, 0), (0, 1, 0))),
}


def lesion_with_tail(direction, centre=(0.0, 0.0, 0.0), radius=20.0, tail=60.0, tail_radius=8.0, inside=200.0, outside=0.0):
    """HU at patient points: a sphere with a cylindrical tail along ``direction``."""
    direction = np.asarray(direction, float) / np.linalg.norm(direction)
    centre = np.asarray(centre, float)

    def hounsfield(points: np.ndarray) -> np.ndarray:
        offset = points - centre
        along = offset @ direction
        across = np.linalg.norm(offset - along[..., None] * direction, axis=-1)
        sphere = np.linalg.norm(offset, axis=-1) <= radius
        cylinder = (along >= 0) & (along <= radius + tail) & (across <= tail_radius)
        return np.where(sphere | cylinder, inside, outside)

    return hounsfield


def write_series(folder: Path, orientation: str, field, size: int = 64, spacing: float = 2.5, slice_spacing: float = 5.0,
                 slices: int = 32, reverse: bool = False) -> list[Path]:
    """Write ``slices`` CT slices centred on the origin, in the given orientation."""
    folder.mkdir(parents=True, exist_ok=True)
    along_row, down_column = (np.asarray(v, float) for v in ORIENTATIONS[orientation])
    normal = np.cross(along_row, down_column)
    template = pydicom.dcmread(DATA / "CT_small.dcm")
    series_uid, frame_uid = generate_uid(), generate_uid()
    half = (size - 1) / 2 * spacing
    rows, cols = np.mgrid[0:size, 0:size]
    paths = []
    for index in range(slices):
        offset = (index - (slices - 1) / 2) * slice_spacing
        origin = -half * along_row - half * down_column + offset * normal
        points = origin + (cols[..., None] * spacing) * along_row + (rows[..., None] * spacing) * down_column
        hounsfield = field(points)
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID = series_uid, generate_uid(), frame_uid
        ds.InstanceNumber = (slices - index) if reverse else index + 1
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = slice_spacing
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*along_row, *down_column)]
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hounsfield + 1024).astype(np.int16).tobytes()
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        path = folder / f"slice{index:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


class MeanIntensityScorer(TileScorer):
    """A model stand-in: a tile's score is its mean grey level / 255 (the object is bright)."""

    def __init__(self) -> None:
        self.network = SimpleNamespace(num_layers=13)
        self.checksum = "stand-in-mean-intensity"
        self.precision = "fp32"
        self.backend = "torch"
        self.batch_size = 64
        self.input_size = 48
        self.field_of_view_um = 200.0

    def score_details(self, tiles) -> TileScores:
        scores = np.array([np.asarray(t, dtype=np.float32).mean() / 255.0 for t in tiles], dtype=np.float32)
        return TileScores(scores, np.repeat(scores[:, None], 13, axis=1))
