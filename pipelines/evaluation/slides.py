"""``evaluate --slides``: whole IDC slides rebuilt from their tiles, analysed and compared with their annotation.

Each patient chosen whose every tile is in the table is rebuilt
(:func:`pipelines.training.whole_slides.rebuild_slide`) and runs through the real
:func:`dicom_heatmap.api.analyze` path with 50 px grid tiles, so every grid tile is one
annotated tile; :func:`pipelines.training.whole_slides.map_comparison` says how the
heatmap and its spread compare with the annotation. Writes one picture a slide (slide,
annotation, heatmap with both arrows), ``slides.json`` and the table ``slides.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dicom_heatmap.render import colorize
from dicom_heatmap.scorer import TileScorer
from pipelines.training.whole_slides import (RebuiltSlide, analyze_picture, lattice_settings, map_comparison, map_record,
                                             read_rows, rebuild_slide)

__all__ = ["evaluate_slides", "comparison_record", "draw_slide", "format_slide_table", "write_slide_outputs"]


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
    rows = read_rows(Path(labels_csv))
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
        records: from :func:`evaluate_slides` (or :func:`pipelines.evaluation.mosaics.evaluate_mosaics`).
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
