"""The radiology training, end to end on series the project makes: ``make lesion-check``.

Writes labelled CT and MR series (:mod:`pipelines.evaluation.synthetic_lesions`: real
pydicom slices, synthetic lesions, DICOM SEG and NIfTI labels, a MONAI datalist), trains
a model on the training series (:func:`pipelines.training.radiology.train_datalist`),
evaluates it on the validation series it never saw
(:func:`pipelines.evaluation.datalist_eval.evaluate_datalist`), compares its spread
directions with the tails the lesions were drawn with, and analyses one validation CT
with the trained model and with the shipped H&E model (the first must not warn, the
second must). Prints the tables; writes ``OUT/lesion_check.json``.

    python -m pipelines.evaluation.lesion_check --out runs/lesion-check [--epochs 6]

The targets of the issue that asked for it: tile AUC >= 0.9 on the validation series and
spread directions within 30 degrees.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dicom_heatmap.api import analyze
from dicom_heatmap.scorer import TileScorer
from pipelines.evaluation.datalist_eval import direction_error_deg, evaluate_datalist
from pipelines.evaluation.synthetic_lesions import make_lesion_datalist
from pipelines.training.radiology import radiology_settings, train_datalist

__all__ = ["run_lesion_check"]

#: The check's tile side: the synthetic lesions span a few tiles of it (their tails, 3 to 5)
CHECK_FIELD_OF_VIEW_MM = 6.0


def run_lesion_check(out: Path, series: int = 36, validation: int = 12, epochs: int = 6, width: float = 1.0,
                     seed: int = 0) -> dict:
    """Make the data, train, evaluate; see the module docstring. Returns what it printed."""
    started = time.time()
    datalist = make_lesion_datalist(out / "data", series, validation, seed)
    truth = json.loads((out / "data" / "truth.json").read_text())
    made = time.time()
    model = train_datalist(datalist, out / "model", radiology_settings(epochs=epochs, width_multiplier=width),
                           field_of_view_mm=CHECK_FIELD_OF_VIEW_MM)
    trained = time.time()
    evaluation = evaluate_datalist(datalist, model, out / "evaluation")
    tails = []
    for row in evaluation["series"]:
        tail = truth[f"series/{Path(row['image']).name}"]["tail_direction_lps"]
        if tail is not None:
            tails.append(None if row["direction"] is None else round(direction_error_deg(row["direction"], tail), 1))
    directed = [error for error in tails if error is not None]
    first_ct = next(Path(row["image"]) for row in evaluation["series"] if row["modality"] == "CT")
    warnings = {name: analyze(first_ct, TileScorer.load(path), progress=False).domain_warning
                for name, path in (("trained", model), ("shipped H&E", None))}
    report = {
        "summary": evaluation["summary"],
        "against_drawn_tails": {"tailed_series": len(tails), "directed": len(directed),
                                "within_30_deg": sum(e <= 30 for e in directed),
                                "median_error_deg": float(np.median(directed)) if directed else None},
        "domain_warning_on_a_validation_ct": warnings,
        "seconds": {"data": round(made - started, 1), "training": round(trained - made, 1),
                    "evaluation": round(time.time() - trained, 1)},
        "settings": {"series": series, "validation": validation, "epochs": epochs, "width_multiplier": width, "seed": seed,
                     "field_of_view_mm": CHECK_FIELD_OF_VIEW_MM},
    }
    (out / "lesion_check.json").write_text(json.dumps(report, indent=1))
    tail = report["against_drawn_tails"]
    print(f"against the tails the lesions were drawn with: {tail['directed']} of {tail['tailed_series']} tailed "
          f"validation lesions read as directed, {tail['within_30_deg']} within 30 deg (median "
          f"{'-' if tail['median_error_deg'] is None else format(tail['median_error_deg'], '.0f')} deg)")
    for name, warning in warnings.items():
        print(f"{name} model on {first_ct.name}: {warning or 'no domain warning'}")
    print(f"seconds: {report['seconds']}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lesion-check"), help="folder (default runs/lesion-check)")
    parser.add_argument("--series", type=int, default=36, help="labelled series to make (default 36)")
    parser.add_argument("--validation", type=int, default=12, help="of them, how many validate (default 12)")
    parser.add_argument("--epochs", type=int, default=6, help="stage-1 epochs (default 6)")
    parser.add_argument("--width", type=float, default=1.0, help="conv width multiplier (default 1, VGG16)")
    parser.add_argument("--seed", type=int, default=0, help="the data's seed (default 0)")
    args = parser.parse_args(argv)
    run_lesion_check(args.out, args.series, args.validation, args.epochs, args.width, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
