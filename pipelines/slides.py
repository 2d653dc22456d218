"""Whole-slide evaluation on IDC patients whose every tile is in the table.

Some patients of the IDC set have every 50 px tile of their downsampled slide in the
table (``x``, ``y``: the tile's 1-based top-left corner on a 50 px lattice). Pasting each
tile at ``(x - 1, y - 1)`` on white glass rebuilds the slide's tissue, and the tiles'
labels are the pathologist's IDC outline on the same lattice. Each rebuilt slide runs
through the real :func:`dicom_heatmap.api.analyze` path with 50 px grid tiles, so every
grid tile is one annotated tile, and is compared with its annotation:

* tile AUC over the annotated tiles the analysis scored, and the share of annotated
  tiles it scored (the rest it took for glass);
* the spread direction against the annotation's: the reference focus is the maximum of
  the tumour labels smoothed by a Gaussian of ``REFERENCE_SIGMA`` tiles, the reference
  direction runs from it to the centroid of the tumour tiles, and the annotation counts
  as directed when that offset is at least :data:`dicom_heatmap.spread.MIN_DIRECTEDNESS`
  of the tumour tiles' mean distance from the focus (the analysis's own definition);
* the distance between the reported focus tile and the reference focus, in tiles.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dicom_heatmap.api import AnalysisSettings, analyze
from dicom_heatmap.errors import InputError
from dicom_heatmap.heatmap import Heatmap
from dicom_heatmap.render import colorize
from dicom_heatmap.scorer import TileScorer
from dicom_heatmap.spread import MIN_DIRECTEDNESS, analyze_spread
from pipelines.metrics import roc_auc
from transforms.grid import TileGrid

__all__ = ["RebuiltSlide", "comparison_record", "lattice_settings", "whole_patients", "chosen_whole_patients", "rebuild_slide", "reference_direction", "angle_error", "evaluate_slides", "map_comparison", "map_heatmap", "map_record", "analyze_picture",
           "draw_slide", "write_slide_outputs",
           "format_slide_table", "MIN_WHOLE_TILES", "REFERENCE_SIGMA"]

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


def _read_rows(labels_csv: Path) -> list[dict]:
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
    rows = _read_rows(Path(labels_csv))
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
    rows = [row for row in (rows if rows is not None else _read_rows(labels_csv)) if row["patient_id"] == patient]
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


def _arrow(draw: ImageDraw.ImageDraw, focus, angle: float, length: float, cell: int, colour) -> None:
    start = np.array([(focus[1] + 0.5) * cell, (focus[0] + 0.5) * cell])
    direction = np.array([math.cos(math.radians(angle)), -math.sin(math.radians(angle))])
    end = start + direction * length
    draw.line([tuple(start), tuple(end)], fill=(255, 255, 255), width=5)
    draw.line([tuple(start), tuple(end)], fill=colour, width=3)
    head = 3 * cell
    a = math.atan2(direction[1], direction[0])
    draw.polygon([tuple(end)] + [(end[0] - head * math.cos(a + s * 0.45), end[1] - head * math.sin(a + s * 0.45))
                                 for s in (-1, 1)], fill=colour, outline=(255, 255, 255))


def draw_slide(slide: RebuiltSlide, scores: np.ndarray, record: dict, path: str | Path, cell: int = 8,
               title: str | None = None) -> None:
    """Slide, annotation and heatmap side by side, each with its direction arrow (black:
    the annotation's, reference; white-edged red: the analysis's); ``title`` heads it
    (by default "patient <ID>")."""
    rows, cols = slide.labels.shape
    height, width = rows * cell, cols * cell
    picture = np.asarray(Image.fromarray(slide.picture).resize((width, height), Image.BILINEAR))
    annotation = np.full((rows, cols, 3), 255, dtype=np.uint8)
    annotation[slide.labels == 0] = (190, 190, 190)
    annotation[slide.labels == 1] = (200, 30, 30)
    heat = np.where(np.isfinite(scores)[..., None], colorize(scores), 255).astype(np.uint8)
    enlarge = lambda a: np.repeat(np.repeat(a, cell, axis=0), cell, axis=1)  # noqa: E731
    gap, header = 10, 26
    canvas = Image.new("RGB", (3 * width + 2 * gap, height + header), "white")
    for index, panel in enumerate((picture, enlarge(annotation), enlarge(heat))):
        canvas.paste(Image.fromarray(panel), (index * (width + gap), header))
    draw = ImageDraw.Draw(canvas)
    error = record["direction_error_deg"]
    draw.text((4, 4), f"{title or f'patient {slide.patient}'}: slide | annotation (IDC red) | heatmap   tile AUC {record['tile_auc']:.3f}   "
                      f"analysed {record['analysed_share']:.0%}   direction error {'-' if error is None else f'{error:.0f} deg'}",
              fill="black")
    length = 0.25 * min(width, height)
    for panel in (1, 2):
        offset = panel * (width + gap)
        sub = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        sub_draw = ImageDraw.Draw(sub)
        if record["reference"]["directed"]:
            _arrow(sub_draw, record["reference"]["focus"], record["reference"]["angle_deg"], length, cell, (0, 0, 0))
        if record["directed"] and record["focus"] is not None:
            _arrow(sub_draw, record["focus"], record["angle_deg"], length, cell, (220, 0, 0))
        canvas.paste(sub, (offset, header), sub)
    canvas.save(path)


def analyze_picture(picture: np.ndarray, scorer: TileScorer, settings: AnalysisSettings, progress: bool = False):
    """:func:`~dicom_heatmap.api.analyze` of an RGB picture held in memory (a rebuilt slide, a
    mosaic): written to a temporary PNG, so that it takes the path users' pictures take."""
    with tempfile.TemporaryDirectory(prefix="dicom-heatmap-picture-") as temporary:
        path = Path(temporary) / "picture.png"
        Image.fromarray(picture).save(path)
        return analyze(path, scorer, settings, progress=progress)


def evaluate_slides(labels_csv: str | Path, patients: list[str], scorer: TileScorer, out_dir: str | Path | None = None,
                    root: str | Path | None = None, threshold: float = 0.5, progress: bool = True) -> list[dict]:
    """Rebuild each patient's slide, analyse it with 50 px grid tiles and compare with the annotation.

    Args:
        labels_csv: the IDC table.
        patients: whole patients (see :func:`whole_patients`) to evaluate.
        scorer: the loaded model.
        out_dir: where ``slides/<patient>.png`` (slide, annotation and heatmap) go; none when ``None``.
        root: folder the table's paths are relative to.
        threshold: the analysis's lesion threshold.
        progress: show the scoring progress bar.

    Returns:
        one record a slide: patient, tiles, tumour tiles, analysed share, tile AUC, the
        reference direction, the reported direction and focus, angle error and focus
        distance (tiles).
    """
    records = []
    folder = Path(out_dir) / "slides" if out_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    settings = lattice_settings(threshold)
    rows = _read_rows(Path(labels_csv))
    for patient in patients:
        slide = rebuild_slide(labels_csv, patient, root, rows)
        result = analyze_picture(slide.picture, scorer, settings, progress)
        record = comparison_record(slide, result)
        records.append(record)
        if folder is not None:
            draw_slide(slide, result.heatmap, record, folder / f"{patient}.png")
    return records


def comparison_record(slide: RebuiltSlide, result) -> dict:
    """How an analysis on the 50 px lattice of ``slide`` compares with its labels (see
    :func:`map_comparison`); ``raw`` holds the same for the tile model's own scores where
    the whole-slide stage changed them."""
    record = map_comparison(slide.patient, slide.labels, result.heatmap, result.spread)
    if result.slide_threshold is not None:  # the whole-slide stage ran
        record["raw"] = map_record(slide.patient, slide.labels, result.raw_patch_scores, result.spread.threshold)
    record["slide_threshold"] = result.slide_threshold
    return record


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


def _number(value, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def format_slide_table(records: list[dict], name: str = "patient") -> str:
    """The per-slide records as a Markdown table, with the median of each column; the
    direction error's median is over the slides with a directed annotation where a
    direction was reported ("missed": the annotation is directed, the report is not), and
    the last line counts undirected annotations reported as directed. Where the whole-slide
    stage ran, each cell of the heatmap's columns reads "refined (raw)": the analysis's map,
    then the tile model's own scores read the same way at the fixed threshold.

    Args:
        records: from :func:`evaluate_slides` (or :func:`pipelines.mosaic.evaluate_mosaics`).
        name: the first column's title.
    """
    def both(record: dict, format_value) -> str:
        value = format_value(record)
        return f"{value} ({format_value(record['raw'])})" if "raw" in record else value

    def error(r: dict) -> str:
        return "missed" if r["direction_missed"] else _number(r["direction_error_deg"], 0)

    def reported(r: dict) -> str:
        return f"{r['angle_deg']:.0f} deg ({r['directedness']:.2f})" if r["directed"] else "undirected"

    lines = [f"| {name} | tiles | IDC tiles | analysed | tile AUC | non-IDC marked | extent F1 | reference direction | "
             "reported direction | direction error | focus distance (tiles) |", "| --- " * 11 + "|"]
    for r in records:
        ref = r["reference"]
        if not r["tumour_tiles"]:
            reference = "no IDC"
        elif ref["angle_deg"] is None:
            reference = "undirected (0.00)"
        else:
            reference = f"{ref['angle_deg']:.0f} deg ({ref['directedness']:.2f})" + ("" if ref["directed"] else ", undirected")
        lines.append(f"| {r['patient']} | {r['tiles']} | {r['tumour_tiles']} | {r['analysed_share']:.2f} | "
                     f"{both(r, lambda x: _number(x['tile_auc'], 3))} | "
                     f"{both(r, lambda x: _number(x['non_idc_marked'], 2))} | "
                     f"{both(r, lambda x: _number(x['extent_f1'], 2))} | {reference} | "
                     f"{both(r, reported)} | {both(r, error)} | "
                     f"{_number(r['focus_distance_tiles'], 1)} |")

    def medians(chosen: list[dict]) -> tuple[str, ...]:
        aucs = [r["tile_auc"] for r in chosen if math.isfinite(r["tile_auc"])]
        marked = [r["non_idc_marked"] for r in chosen if math.isfinite(r["non_idc_marked"])]
        f1 = [r["extent_f1"] for r in chosen if math.isfinite(r["extent_f1"])]
        errors = [r["direction_error_deg"] for r in chosen if r["direction_error_deg"] is not None]
        missed = sum(r["direction_missed"] for r in chosen)
        return (f"{_number(float(np.median(aucs)) if aucs else None, 3)} (worst {_number(min(aucs) if aucs else None, 3)})",
                f"{_number(float(np.median(marked)) if marked else None, 2)} (most {_number(max(marked) if marked else None, 2)})",
                _number(float(np.median(f1)) if f1 else None, 2),
                f"{_number(float(np.median(errors)) if errors else None, 0)} over {len(errors)} directed"
                f"{f', {missed} missed' if missed else ''}, {sum(e > 60 for e in errors)} over 60")

    rows = [("**median**", records)] + ([("median, raw", [r["raw"] for r in records])] if all("raw" in r for r in records) else [])
    for label, chosen in rows:
        auc, marked, f1, errors = medians(chosen)
        lines.append(f"| {label} | | | {np.median([r['analysed_share'] for r in records]):.2f} | {auc} | {marked} | {f1} | | | "
                     f"{errors} | |")
    undirected = [r for r in records if r["tumour_tiles"] and not r["reference"]["directed"]]
    if undirected:
        lines.append(f"\nUndirected annotations reported as directed: {sum(r['directed'] for r in undirected)} of {len(undirected)}.")
    return "\n".join(lines)


def write_slide_outputs(records: list[dict], out_dir: str | Path, stem: str = "slides", name: str = "patient") -> None:
    """``<stem>.json`` (the records) and ``<stem>.md`` (the table, first column ``name``) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(records, indent=1))
    (out_dir / f"{stem}.md").write_text(format_slide_table(records, name) + "\n")
