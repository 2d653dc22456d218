"""``evaluate --datalist``: a CT/MR model on labelled series, as the analysis runs it.

Each series of the datalist's validation list (or every series with ``entries="all"``)
is read and analysed as ``dicom-heatmap analyze`` would (:func:`dicom_heatmap.api.analyze_prepared`:
the grid at the model's field of view, the spread reading), and compared with its label
(:mod:`pipelines.training.lesion_labels`) on the same tiles:

* tile AUC, pooled over the series and per series (a tile is positive where its lesion
  share reaches the model's ``lesion_fraction``);
* lesion detection: each connected lesion of the mask (26-neighbourhood, SimpleITK) is
  found when one of its tiles (those it covers at least ``lesion_fraction`` of, or its
  most covered tile) scores at or above the threshold; false-positive tiles are scored
  tiles of no lesion at or above it;
* the spread direction: the project's reading of the heatmap against the same reading of
  the mask's own tile shares, as the angle between the two directions in patient
  coordinates, where both are directed.

Writes ``OUT/datalist_evaluation.json`` and prints a table.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dicom_heatmap.api import AnalysisSettings, analyze_prepared
from dicom_heatmap.inferer import TileGridInferer
from dicom_heatmap.scorer import TileScorer
from dicom_heatmap.spread import analyze_spread
from pipelines.training.datalist import read_datalist
from pipelines.training.lesion_labels import LabelledImage, load_labelled
from pipelines.training.metrics import roc_auc
from transforms._dictionary import meta_key

__all__ = ["evaluate_datalist", "direction_error_deg"]


def direction_error_deg(found: list[float], truth: list[float]) -> float:
    """Angle in degrees between two directions (vectors of any length)."""
    a, b = np.asarray(found, float), np.asarray(truth, float)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


def _lesions(labelled: LabelledImage, fraction: float) -> list[np.ndarray]:
    """The tiles (flat indices) of each connected lesion of the mask."""
    import SimpleITK as sitk

    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(labelled.lesion.astype(np.uint8)),
                                                                True))
    tiles = []
    for number in range(1, int(components.max()) + 1):
        share = labelled.grid.share(components == number).ravel()
        chosen = np.flatnonzero(share >= fraction)
        tiles.append(chosen if len(chosen) else np.array([int(np.argmax(share))]))
    return tiles


def _one_series(labelled: LabelledImage, scorer: TileScorer, threshold: float) -> dict:
    fraction = scorer.domain.lesion_fraction or 0.25
    data = {"image": labelled.image, meta_key("image"): labelled.meta, "image_grid": labelled.grid}
    result = analyze_prepared(data, scorer, AnalysisSettings(threshold=threshold), TileGridInferer(progress=False))
    scores = result.tile_map.scores.ravel()
    analysed = np.isfinite(scores)
    labels = (labelled.share.ravel() >= fraction).astype(int)
    row = {"image": str(labelled.entry.image), "where": labelled.entry.where, "modality": labelled.meta["modality"],
           "tiles": int(analysed.sum()), "positive": int(labels[analysed].sum()),
           "auc": (roc_auc(labels[analysed], scores[analysed]) if 0 < labels[analysed].sum() < analysed.sum() else None),
           "warning": result.domain_warning}
    lesions = _lesions(labelled, fraction)
    in_lesion = np.zeros(len(scores), bool)
    found = 0
    for tiles in lesions:
        in_lesion[tiles] = True
        found += bool(np.nanmax(np.where(analysed[tiles], scores[tiles], -1.0)) >= threshold)
    row.update(lesions=len(lesions), found=found,
               false_positive_tiles=int((analysed & ~in_lesion & (labelled.share.ravel() == 0)
                                         & (np.nan_to_num(scores) >= threshold)).sum()))
    mask_map = replace(result.tile_map, scores=np.where(result.tile_map.analysed, labelled.share, np.nan).astype(np.float32),
                       raw_scores=None, patches=None)
    truth = analyze_spread(mask_map, fraction)
    row.update(direction=result.spread.direction_frame if result.spread.directed else None,
               mask_direction=truth.direction_frame if truth.directed else None, frame=result.spread.frame)
    row["direction_error_deg"] = (round(direction_error_deg(row["direction"], row["mask_direction"]), 1)
                                  if row["direction"] and row["mask_direction"] else None)
    row["_scores"], row["_labels"] = scores[analysed], labels[analysed]
    return row


def evaluate_datalist(datalist: str | Path, model: str | Path | None, out_dir: str | Path, entries: str = "validation",
                      threshold: float = 0.5, precision: str = "auto", backend: str = "auto", progress: bool = True) -> dict:
    """Evaluate a CT/MR model on a datalist's series; see the module docstring.

    Args:
        datalist: the datalist.
        model: the model file (the shipped model when ``None``: it warns on CT and MR).
        out_dir: ``datalist_evaluation.json`` goes here.
        entries: ``"validation"`` (the validation list, or the highest fold) or ``"all"``.
        threshold: score at or above which a tile counts as lesion.
        precision: as for analyze.
        backend: as for analyze.
        progress: show a progress bar.

    Returns:
        the summary and one row per series.
    """
    scorer = TileScorer.load(model, precision=precision, backend=backend)
    chosen = read_datalist(datalist)
    if entries == "validation":
        folds = sorted({e.fold for e in chosen if e.fold is not None})
        validating = [e for e in chosen if e.validation] or [e for e in chosen if folds and len(folds) > 1 and e.fold == folds[-1]]
        chosen = validating or chosen
    rows = [_one_series(load_labelled(entry, scorer, AnalysisSettings()), scorer, threshold)
            for entry in tqdm(chosen, desc="evaluating series", unit="series", disable=not progress)]
    scores = np.concatenate([row.pop("_scores") for row in rows])
    labels = np.concatenate([row.pop("_labels") for row in rows])
    errors = [row["direction_error_deg"] for row in rows if row["direction_error_deg"] is not None]
    aucs = [row["auc"] for row in rows if row["auc"] is not None]
    summary = {
        "model": str(model) if model else "shipped", "datalist": str(datalist), "series": len(rows), "threshold": threshold,
        "tile_auc": roc_auc(labels, scores) if 0 < labels.sum() < len(labels) else None,
        "median_series_auc": float(np.median(aucs)) if aucs else None,
        "lesions": sum(r["lesions"] for r in rows), "lesions_found": sum(r["found"] for r in rows),
        "false_positive_tiles": sum(r["false_positive_tiles"] for r in rows),
        "directed_pairs": len(errors), "median_direction_error_deg": float(np.median(errors)) if errors else None,
        "within_30_deg": sum(e <= 30 for e in errors),
        "warnings": sum(r["warning"] is not None for r in rows),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "datalist_evaluation.json").write_text(json.dumps({"summary": summary, "series": rows}, indent=1))
    _print_table(summary, rows)
    return {"summary": summary, "series": rows}


def _print_table(summary: dict, rows: list[dict]) -> None:
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    print("| series | modality | tiles | positive | AUC | lesions found | false-positive tiles | direction error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {Path(row['image']).name} | {row['modality']} | {row['tiles']} | {row['positive']} | {fmt(row['auc'])} "
              f"| {row['found']}/{row['lesions']} | {row['false_positive_tiles']} | {fmt(row['direction_error_deg'], '.0f')}"
              f"{'' if row['direction_error_deg'] is None else ' deg'} |")
    print(f"tile AUC {fmt(summary['tile_auc'])} (median per series {fmt(summary['median_series_auc'])}); "
          f"lesions found {summary['lesions_found']}/{summary['lesions']} at threshold {summary['threshold']:g}; "
          f"spread direction within 30 deg of the mask's in {summary['within_30_deg']}/{summary['directed_pairs']} "
          f"(median {fmt(summary['median_direction_error_deg'], '.0f')} deg); domain warnings {summary['warnings']}")
