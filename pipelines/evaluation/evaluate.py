"""Evaluate a model on labelled tiles: pooled and per-patient metrics, every head, a ROC plot.

Run by ``dicom-heatmap evaluate`` and the bundle's ``configs/evaluate.json``; with
``--slides`` and ``--mosaics`` it also runs :mod:`pipelines.evaluation.slides` and
:mod:`pipelines.evaluation.mosaics`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from dicom_heatmap.errors import ConfigurationError, InputError
from dicom_heatmap.scorer import TileScorer
from pipelines.training.metrics import roc_auc, roc_curve, threshold_metrics
from pipelines.training.tile_data import load_tile_table

__all__ = ["evaluate", "draw_roc", "format_report", "write_outputs", "run_evaluation", "mosaic_patients"]


def evaluate(csv_path: str | Path, root: str | Path | None = None, model: str | Path | None = None,
             folds: list[int] | None = None, threshold: float = 0.5, precision: str = "auto", backend: str = "auto",
             patients: list[str] | None = None) -> dict:
    """Score every tile of the table (or of ``folds``, or of ``patients``) and compute the metrics.

    Args:
        csv_path: the tile table (columns path, patient_id, label, fold).
        root: folder the table's paths are relative to; the table's folder when ``None``.
        model: the model file; the shipped one when ``None``.
        folds: only the tiles of these patient folds.
        threshold: score at or above which a tile counts as tumour.
        precision: as for :class:`~dicom_heatmap.scorer.TileScorer`.
        backend: as for :class:`~dicom_heatmap.scorer.TileScorer`.
        patients: only the tiles of these patient IDs (with ``folds``: of both).

    Returns a dictionary with ``tiles``, ``patients``, ``auc``, ``median_patient_auc``,
    the threshold metrics, ``head_auc`` (13 values) and the ROC points of the fusion.
    """
    table = load_tile_table(csv_path, root)
    if folds is not None:
        chosen = table.subset(np.isin(table.folds, folds))
        if not len(chosen):
            raise InputError(Path(csv_path), f"no tile of the table is in the folds asked for ({', '.join(map(str, folds))}); "
                                             f"its fold column holds {', '.join(map(str, np.unique(table.folds)))}")
        table = chosen
    if patients is not None:
        table = table.subset(np.isin(table.patients, patients))
        if not len(table):
            within = " within the folds asked for" if folds is not None else ""
            raise InputError(Path(csv_path), f"no tile of the table{within} belongs to the {len(patients)} patient "
                                             "IDs asked for; check the patient list against the table's patient_id column")
    scorer = TileScorer.load(model, precision=precision, backend=backend)
    scores = np.empty(len(table), dtype=np.float32)
    layers = np.empty((len(table), 13), dtype=np.float32)
    for start in tqdm(range(0, len(table), 256), desc="scoring", unit="batch", leave=False):
        details = scorer.score_details(table.images[start : start + 256])
        scores[start : start + 256] = details.scores
        layers[start : start + 256] = details.layer_probabilities
    per_patient = [roc_auc(table.labels[table.patients == p], scores[table.patients == p]) for p in np.unique(table.patients)]
    per_patient = [v for v in per_patient if np.isfinite(v)]
    fpr, tpr = roc_curve(table.labels, scores)
    return {
        "model_sha256": scorer.checksum,
        "precision": scorer.precision,
        "folds": folds,
        "patient_list": patients,
        "tiles": int(len(table)),
        "patients": int(len(np.unique(table.patients))),
        "positive_share": float(table.labels.mean()),
        "auc": roc_auc(table.labels, scores),
        "median_patient_auc": float(np.median(per_patient)) if per_patient else float("nan"),
        "patients_with_both_classes": len(per_patient),
        "threshold": threshold,
        **threshold_metrics(table.labels, scores, threshold),
        "head_auc": [roc_auc(table.labels, layers[:, i]) for i in range(layers.shape[1])],
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        "head_roc": [dict(zip(("fpr", "tpr"), (a.tolist() for a in roc_curve(table.labels, layers[:, i])))) for i in range(13)],
    }


def format_report(result: dict) -> str:
    """The metrics as a few lines of text."""
    lines = [
        f"{result['tiles']} tiles of {result['patients']} patients ({result['positive_share']:.1%} tumour), "
        f"scored in {result['precision']}",
        f"AUC {result['auc']:.3f}   median per-patient AUC {result['median_patient_auc']:.3f} "
        f"({result['patients_with_both_classes']} patients with both classes)",
        f"at threshold {result['threshold']}: sensitivity {result['sensitivity']:.3f}, specificity {result['specificity']:.3f}, "
        f"balanced accuracy {result['balanced_accuracy']:.3f}, F1 {result['f1']:.3f}",
        "AUC of each conv layer's head alone (fusion " + f"{result['auc']:.3f}):",
        "  " + "  ".join(f"{i + 1}:{v:.3f}" for i, v in enumerate(result["head_auc"])),
    ]
    return "\n".join(lines)


def draw_roc(result: dict, path: str | Path, size: int = 560) -> None:
    """ROC curves of the fusion (red) and the 13 heads (grey) as a PNG."""
    margin = 60
    side = size - 2 * margin
    canvas = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)

    def xy(fpr: float, tpr: float) -> tuple[float, float]:
        return margin + fpr * side, margin + (1 - tpr) * side

    for tick in np.linspace(0, 1, 6):
        draw.line([xy(tick, 0), xy(tick, 1)], fill=(230, 230, 230))
        draw.line([xy(0, tick), xy(1, tick)], fill=(230, 230, 230))
        draw.text((xy(tick, 0)[0] - 10, size - margin + 6), f"{tick:.1f}", fill="black", font=font)
        draw.text((margin - 34, xy(0, tick)[1] - 8), f"{tick:.1f}", fill="black", font=font)
    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(160, 160, 160), width=1)
    for head in result["head_roc"]:
        draw.line([xy(f, t) for f, t in zip(head["fpr"], head["tpr"])], fill=(175, 175, 175), width=1)
    draw.line([xy(f, t) for f, t in zip(result["roc"]["fpr"], result["roc"]["tpr"])], fill=(200, 0, 0), width=3)
    draw.text((margin, 18), f"ROC, {result['tiles']} tiles / {result['patients']} patients", fill="black", font=font)
    draw.text((margin + side * 0.35, margin + side * 0.75), f"fusion AUC {result['auc']:.3f}", fill=(200, 0, 0), font=font)
    draw.text((margin + side * 0.35, margin + side * 0.75 + 18), f"13 heads AUC {min(result['head_auc']):.3f}-{max(result['head_auc']):.3f}",
              fill=(120, 120, 120), font=font)
    draw.text((size / 2 - 60, size - 24), "1 - specificity", fill="black", font=font)
    draw.text((6, 28), "sensitivity", fill="black", font=font)
    canvas.save(path)


def write_outputs(result: dict, out_dir: str | Path) -> dict:
    """Write ``metrics.json`` (the metrics without the ROC points) and ``roc.png`` in
    ``out_dir``; return what ``metrics.json`` holds."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k not in ("roc", "head_roc")}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    draw_roc(result, out_dir / "roc.png")
    return summary


#: Most mosaics one evaluation builds
MAX_MOSAICS = 64


def mosaic_patients(csv_path: str | Path, folds: list[int] | None, patients: list[str] | None) -> list[str]:
    """The patients mosaics are drawn from: those chosen by ``patients`` and ``folds``.

    Raises:
        InputError: when none is chosen (mosaics must come from patients the model never saw,
            which only the user knows), or the table has no tile sizes to draw 50 px tiles by.
    """
    from pipelines.evaluation.mosaics import mosaic_rows

    csv_path = Path(csv_path)
    if patients is None and folds is None:
        raise InputError(csv_path, "mosaics need --patients or --folds: their tiles must come from patients the model "
                                   "never saw, e.g. --patients models/held_out_patients.txt")
    with csv_path.open(newline="") as handle:  # the table's rows only: the tiles are read once, by evaluate
        fold_of = {row["patient_id"]: row.get("fold") for row in csv.DictReader(handle)}
    wanted_folds = None if folds is None else {str(f) for f in folds}
    chosen = [p for p, fold in fold_of.items() if (patients is None or p in patients)
              and (wanted_folds is None or str(fold).strip() in wanted_folds)]
    if not mosaic_rows(csv_path, chosen):
        raise InputError(csv_path, "no 50 px tile of the table belongs to the patients chosen for the mosaics")
    return sorted(chosen)


def run_evaluation(csv_path: str | Path, out_dir: str | Path, model: str | Path | None = None, root: str | Path | None = None,
                   folds: list[int] | None = None, patients: list[str] | None = None, slides: bool = False,
                   mosaics: int = 0, precision: str = "auto", backend: str = "auto") -> dict:
    """What ``dicom-heatmap evaluate`` and the evaluation bundle run: tile metrics and ROC
    plot; with ``slides``, the whole-slide table; with ``mosaics``, the mosaic table. Every
    choice is checked before anything is scored or written; tables are printed.

    Args:
        csv_path: the tile table.
        out_dir: where ``metrics.json``, ``roc.png``, ``slides.*``/``slides/`` and
            ``mosaics.*``/``mosaics/`` go.
        model: the model file; the shipped one when ``None``.
        root: folder the table's paths are relative to.
        folds: only these patient folds.
        patients: only these patients.
        slides: rebuild and analyse the whole patients among those chosen.
        mosaics: build and analyse this many mosaics from the patients chosen.
        precision: as for :class:`~dicom_heatmap.scorer.TileScorer`.
        backend: as for :class:`~dicom_heatmap.scorer.TileScorer`.

    Returns:
        what ``metrics.json`` holds, with ``slides`` and ``mosaics`` records where asked for.
    """
    from pipelines.evaluation.mosaics import evaluate_mosaics
    from pipelines.evaluation.slides import evaluate_slides, format_slide_table, write_slide_outputs
    from pipelines.training.whole_slides import chosen_whole_patients

    if not 0 <= mosaics <= MAX_MOSAICS:
        raise ConfigurationError(f"mosaics must be a whole number from 0 to {MAX_MOSAICS}, got {mosaics}")
    whole = chosen_whole_patients(csv_path, patients, folds) if slides else []
    drawn_from = mosaic_patients(csv_path, folds, patients) if mosaics else []
    result = evaluate(csv_path, root, model, folds, patients=patients, precision=precision, backend=backend)
    print(format_report(result))
    summary = write_outputs(result, out_dir)
    print(f"-> {out_dir}/ (metrics.json, roc.png)")
    scorer = TileScorer.load(model, precision=precision, backend=backend) if whole or drawn_from else None
    if whole:
        summary["slides"] = evaluate_slides(csv_path, whole, scorer, out_dir, root)
        print(format_slide_table(summary["slides"]))
        write_slide_outputs(summary["slides"], out_dir)
        print(f"-> {out_dir}/ (slides.md, slides.json, slides/*.png)")
    if drawn_from:
        summary["mosaics"] = evaluate_mosaics(csv_path, drawn_from, scorer, mosaics, out_dir)
        print(format_slide_table(summary["mosaics"], "mosaic"))
        write_slide_outputs(summary["mosaics"], out_dir, "mosaics", "mosaic")
        print(f"-> {out_dir}/ (mosaics.md, mosaics.json, mosaics/*.png)")
    return summary
