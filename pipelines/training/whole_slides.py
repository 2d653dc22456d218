"""Whole slides rebuilt from the IDC tiles, and how a patch map compares with their labels.

Some patients of the IDC set have every 50 px tile of their downsampled slide in the
table (``x``, ``y``: the tile's 1-based top-left corner on a 50 px lattice). Pasting each
tile at ``(x - 1, y - 1)`` on white glass rebuilds the slide's tissue
(:func:`rebuild_slide`), and the tiles' labels are the pathologist's IDC outline on the
same lattice. The context stage trains on these slides
(:mod:`pipelines.training.context_stage`) and the evaluation scores them
(:mod:`pipelines.evaluation.slides`), both through the real analysis path
(:func:`analyze_picture`). A map on the lattice is compared with the labels
(:func:`map_comparison`) by:

* tile AUC over the annotated tiles the analysis scored, and the share of annotated
  tiles it scored (the rest it took for glass);
* the share of non-IDC tiles marked and the marked extent's F1 against the IDC tiles;
* the spread direction against the annotation's: the reference focus is the maximum of
  the tumour labels smoothed by a Gaussian of ``REFERENCE_SIGMA`` tiles, the reference
  direction runs from it to the centroid of the tumour tiles, and the annotation counts
  as directed when that offset is at least :data:`dicom_heatmap.spread.MIN_DIRECTEDNESS`
  of the tumour tiles' mean distance from the focus (the analysis's own definition);
* the distance between the reported focus tile and the reference focus, in tiles.
"""

from __future__ import annotations

import csv
import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dicom_heatmap.api import AnalysisSettings, analyze
from dicom_heatmap.errors import InputError
from dicom_heatmap.heatmap import Heatmap
from dicom_heatmap.scorer import TileScorer
from dicom_heatmap.spread import MIN_DIRECTEDNESS, analyze_spread
from pipelines.training.metrics import roc_auc
from transforms.grid import TileGrid

__all__ = ["RebuiltSlide", "read_rows", "whole_patients", "chosen_whole_patients", "rebuild_slide", "lattice_settings",
           "analyze_picture", "reference_direction", "angle_error", "map_comparison", "map_record", "map_heatmap",
           "MIN_WHOLE_TILES", "REFERENCE_SIGMA", "TILE", "TILE_UM"]

#: Patients with at least this many tiles have their whole slide in the IDC table
MIN_WHOLE_TILES = 400
#: The IDC lattice: tiles are cut every 50 px of the downsampled slide
TILE = 50
#: Physical side of an IDC tile (50 px of a 40x slide downsampled 16:1), in micrometres
TILE_UM = 200.0
#: Gaussian (in tiles) that smooths the tumour labels before the reference focus is taken
REFERENCE_SIGMA = 2.0
#: Glass where the table holds no tile
GLASS = 255


@dataclass
class RebuiltSlide:
    """A whole patient's slide rebuilt from its tiles.

    Attributes:
        patient: the patient ID.
        picture: (rows * 50, cols * 50, 3) uint8 RGB, white where no tile lies.
        labels: (rows, cols) int8 on the 50 px lattice: 1 IDC, 0 other tissue, -1 no tile.
    """

    patient: str
    picture: np.ndarray
    labels: np.ndarray


def read_rows(labels_csv: Path) -> list[dict]:
    if not labels_csv.is_file():
        raise InputError(labels_csv, "the labels table does not exist")
    with labels_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = [c for c in ("path", "patient_id", "x", "y", "label") if not rows or c not in rows[0]]
    if missing:
        raise InputError(labels_csv, f"the labels table lacks the column(s) {', '.join(missing)} that rebuild slides")
    return rows


def whole_patients(labels_csv: str | Path, patients: list[str] | None = None, folds: list[int] | None = None,
                   min_tiles: int = MIN_WHOLE_TILES) -> list[str]:
    """The patients of ``labels_csv`` with at least ``min_tiles`` tiles (whole slides), in table order.

    Args:
        labels_csv: the IDC table.
        patients: only these patients.
        folds: only patients of these folds (the table's ``fold`` column).
        min_tiles: least tiles of a whole patient.
    """
    rows = read_rows(Path(labels_csv))
    counts = Counter(row["patient_id"] for row in rows)
    fold_of = {row["patient_id"]: int(row.get("fold") or -1) for row in rows}
    return [p for p, count in counts.items() if count >= min_tiles and (patients is None or p in patients)
            and (folds is None or fold_of[p] in folds)]


def chosen_whole_patients(labels_csv: str | Path, patients: list[str] | None = None,
                          folds: list[int] | None = None) -> list[str]:
    """:func:`whole_patients`, refusing an empty choice (before anything is scored or written).

    Raises:
        InputError: when none of the patients chosen has a whole slide.
    """
    whole = whole_patients(labels_csv, patients, folds)
    if not whole:
        raise InputError(labels_csv, f"none of the patients chosen has a whole slide in the table ({MIN_WHOLE_TILES} tiles "
                                     "or more); choose other --patients or --folds, or leave out --slides")
    return whole


def rebuild_slide(labels_csv: str | Path, patient: str, root: str | Path | None = None,
                  rows: list[dict] | None = None) -> RebuiltSlide:
    """Paste every tile of ``patient`` at ``(x - 1, y - 1)`` on white glass.

    Args:
        labels_csv: the IDC table (columns path, patient_id, x, y, label).
        patient: whose slide.
        root: folder the table's paths are relative to (the table's folder by default).
        rows: the table's rows, when already read (read from ``labels_csv`` otherwise).
    """
    labels_csv = Path(labels_csv)
    root = Path(root) if root is not None else labels_csv.parent
    rows = [row for row in (rows if rows is not None else read_rows(labels_csv)) if row["patient_id"] == patient]
    if not rows:
        raise InputError(labels_csv, f"no tile of patient {patient} in the table")
    columns = [(int(row["x"]) - 1) // TILE for row in rows]
    lines = [(int(row["y"]) - 1) // TILE for row in rows]
    labels = np.full((max(lines) + 1, max(columns) + 1), -1, dtype=np.int8)
    picture = np.full((labels.shape[0] * TILE, labels.shape[1] * TILE, 3), GLASS, dtype=np.uint8)
    for row, r, c in zip(rows, lines, columns):
        try:
            with Image.open(root / row["path"]) as image:
                tile = np.asarray(image.convert("RGB"))[:TILE, :TILE]
        except OSError as error:
            raise InputError(root / row["path"], f"cannot read the tile ({error})") from None
        picture[r * TILE : r * TILE + tile.shape[0], c * TILE : c * TILE + tile.shape[1]] = tile
        labels[r, c] = max(labels[r, c], int(row["label"]))
    return RebuiltSlide(patient, picture, labels)


def lattice_settings(threshold: float = 0.5, context: bool = True) -> AnalysisSettings:
    """Analysis settings for a picture on the IDC lattice (a rebuilt slide, a mosaic): 50 px
    grid tiles and the tiles' pixel size declared (about 4 um), so the model's patches are
    exactly those tiles and every grid tile is one labelled tile; ``context`` as in
    :class:`~dicom_heatmap.api.AnalysisSettings`."""
    return AnalysisSettings(tile_size=TILE, threshold=threshold, pixel_size_um=TILE_UM / TILE, context=context)


def _gaussian_smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian smoothing with zero padding."""
    radius = max(1, int(math.ceil(3 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    smoothed = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), 0, values.astype(np.float64))
    return np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), 1, smoothed)


def reference_direction(labels: np.ndarray, sigma: float = REFERENCE_SIGMA) -> dict:
    """The annotation's focus and spread direction (see the module docstring).

    Args:
        labels: (rows, cols) 1 tumour, 0 other, -1 no tile.
        sigma: the smoothing Gaussian, in tiles.

    Returns:
        ``focus`` (row, col), ``angle_deg`` (counter-clockwise from right on screen, None
        when the annotation has no tumour), ``directedness`` and ``directed``.
    """
    tumour = labels == 1
    if not tumour.any():
        return {"focus": None, "angle_deg": None, "directedness": 0.0, "directed": False}
    smoothed = _gaussian_smooth(tumour, sigma)
    focus = np.array(np.unravel_index(np.argmax(smoothed), smoothed.shape), dtype=float)
    offsets = np.argwhere(tumour) - focus
    mean_offset = offsets.mean(axis=0)
    mean_distance = float(np.linalg.norm(offsets, axis=1).mean())
    directedness = float(np.linalg.norm(mean_offset) / mean_distance) if mean_distance else 0.0
    angle = math.degrees(math.atan2(-mean_offset[0], mean_offset[1])) % 360.0 if np.any(mean_offset) else None
    return {"focus": [int(v) for v in focus], "angle_deg": angle, "directedness": directedness,
            "directed": directedness >= MIN_DIRECTEDNESS}


def angle_error(a: float | None, b: float | None) -> float | None:
    """Smallest difference between two angles in degrees (None when either is missing)."""
    if a is None or b is None:
        return None
    return abs((a - b + 180.0) % 360.0 - 180.0)


def analyze_picture(picture: np.ndarray, scorer: TileScorer, settings: AnalysisSettings, progress: bool = False):
    """:func:`~dicom_heatmap.api.analyze` of an RGB picture held in memory (a rebuilt slide, a
    mosaic): written to a temporary PNG, so that it takes the path users' pictures take."""
    with tempfile.TemporaryDirectory(prefix="dicom-heatmap-picture-") as temporary:
        path = Path(temporary) / "picture.png"
        Image.fromarray(picture).save(path)
        return analyze(path, scorer, settings, progress=progress)


def map_record(patient: str, labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict:
    """:func:`map_comparison` of a bare patch map on the IDC lattice, its spread read as
    :func:`~dicom_heatmap.api.analyze` reads it (at ``threshold``)."""
    return map_comparison(patient, labels, scores, analyze_spread(map_heatmap(scores), threshold))


def map_comparison(patient: str, labels: np.ndarray, scores: np.ndarray, spread) -> dict:
    """How a heatmap on the 50 px lattice compares with its labels: tile AUC, share of
    annotated tiles analysed, share of non-IDC tiles marked (at or above the spread's
    threshold) and the marked extent's F1 against the IDC tiles, reference and reported
    direction, angle error, focus distance (tiles).

    Args:
        patient: names the record.
        labels: (rows, cols) 1 IDC, 0 other tissue, -1 no tile.
        scores: (rows, cols) the heatmap, NaN where not analysed.
        spread: its :class:`~dicom_heatmap.spread.SpreadSummary`.
    """
    annotated = labels >= 0
    scored = annotated & np.isfinite(scores)
    marked = scored & (np.nan_to_num(scores, nan=-1.0) >= spread.threshold)
    tumour = labels == 1
    hits = int((marked & tumour).sum())
    reference = reference_direction(labels)
    focus = spread.focus_index[1:] if spread.focus_index is not None else None
    return {
        "patient": patient,
        "tiles": int(annotated.sum()),
        "tumour_tiles": int(tumour.sum()),
        "analysed_share": float(scored.sum() / annotated.sum()),
        "tile_auc": roc_auc(labels[scored], scores[scored]),
        "non_idc_marked": float(marked[labels == 0].mean()) if (labels == 0).any() else float("nan"),
        "extent_f1": 2 * hits / (int(marked.sum()) + int(tumour.sum())) if marked.any() or tumour.any() else float("nan"),
        "reference": reference,
        "directed": bool(spread.directed),
        "angle_deg": spread.angle_deg,
        "directedness": spread.directedness,
        "focus": focus,
        "lesion_tiles": spread.lesion_tiles,
        "direction_error_deg": angle_error(spread.angle_deg, reference["angle_deg"]) if reference["directed"] else None,
        "direction_missed": bool(reference["directed"] and not spread.directed),
        "focus_distance_tiles": (float(np.linalg.norm(np.subtract(focus, reference["focus"])))
                                 if focus is not None and reference["focus"] is not None else None),
    }


def map_heatmap(scores: np.ndarray) -> Heatmap:
    """A :class:`~dicom_heatmap.heatmap.Heatmap` of a patch map on the IDC lattice (50 px
    patches at 4 um), so that the spread analysis reads it as :func:`~dicom_heatmap.api.analyze` does."""
    rows, cols = scores.shape
    analysed = np.isfinite(scores)[None]
    grid = TileGrid(np.arange(rows + 1) * TILE, np.arange(cols + 1) * TILE, 1, analysed.astype(np.float64), analysed)
    numbers = np.flatnonzero(analysed.ravel()) + 1
    layers = np.zeros((rows, cols, 13))  # the spread reads the scores only
    spacing_mm = TILE_UM / TILE / 1000.0
    affine = np.diag([1.0, spacing_mm, spacing_mm, 1.0])
    return Heatmap.assemble(grid, numbers, scores[analysed[0]], layers[analysed[0]], affine, "SLIDE", (rows * TILE, cols * TILE))
