"""Labelled tile tables (the IDC layout: ``labels.csv`` + PNG tiles) loaded into memory.

Read by ``dicom-heatmap train`` and ``evaluate`` and by the bundle's training and
evaluation configs (``configs/train.json``, ``configs/evaluate.json``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dicom_heatmap.errors import InputError

__all__ = ["TileTable", "load_tile_table", "read_patient_list", "HELD_OUT_PATIENTS_FILE"]

#: The IDC patients the shipped model never saw in any stage: the demo mosaic is drawn from them
HELD_OUT_PATIENTS_FILE = Path(__file__).resolve().parents[2] / "models" / "held_out_patients.txt"

REQUIRED_COLUMNS = ("path", "patient_id", "label", "fold")


@dataclass
class TileTable:
    """Tiles with their labels, patients and folds.

    Attributes:
        images: (N, S, S, 3) uint8 RGB, every tile resampled to ``S`` pixels.
        labels: (N,) int64, 1 = tumour.
        patients: (N,) patient identifiers as strings.
        folds: (N,) int64 patient-level fold.
    """

    images: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    folds: np.ndarray

    def subset(self, mask: np.ndarray) -> "TileTable":
        return TileTable(self.images[mask], self.labels[mask], self.patients[mask], self.folds[mask])

    def __len__(self) -> int:
        return len(self.labels)


def load_tile_table(csv_path: str | Path, root: str | Path | None = None, size: int = 50) -> TileTable:
    """Read ``csv_path`` (columns path, patient_id, label, fold) and its tiles.

    Args:
        csv_path: the labels table.
        root: folder the ``path`` column is relative to; the table's folder by default.
        size: side every tile is resampled to (tiles at the slide's edge are smaller).
    """
    csv_path = Path(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    if not csv_path.is_file():
        raise InputError(csv_path, "the labels table does not exist")
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise InputError(csv_path, "the labels table has no rows")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise InputError(csv_path, f"the labels table lacks the column(s) {', '.join(missing)}")
    images = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    for index, row in enumerate(tqdm(rows, desc="reading tiles", unit="tile", leave=False)):
        path = root / row["path"]
        try:
            with Image.open(path) as image:
                tile = image.convert("RGB")
                if tile.size != (size, size):
                    tile = tile.resize((size, size), Image.BILINEAR)
                images[index] = np.asarray(tile)
        except (OSError, ValueError) as error:
            raise InputError(path, f"cannot read the tile ({error})") from None
    return TileTable(
        images=images,
        labels=np.array([int(r["label"]) for r in rows], dtype=np.int64),
        patients=np.array([r["patient_id"] for r in rows]),
        folds=np.array([int(r["fold"]) for r in rows], dtype=np.int64),
    )


def read_patient_list(path: str | Path) -> list[str]:
    """Patient identifiers from a text file, one a line; ``#`` starts a comment."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read the patient list ({error})") from None
    patients = [line.split("#", 1)[0].strip() for line in lines]
    return [p for p in patients if p]
