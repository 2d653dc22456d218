"""Does the spread direction hold when the grid changes? The model card's grid table.

Each whole IDC patient's slide is rebuilt (:func:`pipelines.training.whole_slides.rebuild_slide`) and
analysed with grid tiles of 0.75, 0.875, 1, 1.125 and 1.25 times the default tile size
(8 tiles along the shorter side), once with each tile scored whole (no pixel size: the
behaviour before 1.2) and once with the IDC tiles' pixel size declared (4 um: the model
scores its 200 um patches). One line a slide: the annotation's direction and, per grid,
the reported angle and directedness ("-" where undirected).

    python -m pipelines.evaluation.grid_check --csv ../shared/data/idc/labels.csv [--patients FILE]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image

from dicom_heatmap.api import AnalysisSettings, analyze
from dicom_heatmap.scorer import TileScorer
from pipelines.training.whole_slides import TILE, TILE_UM, rebuild_slide, reference_direction, whole_patients
from pipelines.training.tile_data import read_patient_list

__all__ = ["GRID_FACTORS", "grid_readings"]

#: Grid tile sizes, as multiples of the default one
GRID_FACTORS = (0.75, 0.875, 1.0, 1.125, 1.25)


def _reading(spread) -> str:
    return f"{spread.angle_deg:.0f}/{spread.directedness:.2f}" if spread.directed else f"-/{spread.directedness:.2f}"


def grid_readings(labels_csv: str | Path, patient: str, scorer: TileScorer, folder: Path) -> str:
    """One line for ``patient``: reference, then the five grids whole and as patches."""
    slide = rebuild_slide(labels_csv, patient)
    path = folder / f"{patient}.png"
    Image.fromarray(slide.picture).save(path)
    reference = reference_direction(slide.labels)
    default_tile = min(slide.picture.shape[:2]) / 8
    columns = []
    for pixel_size in (None, TILE_UM / TILE):
        readings = [analyze(path, scorer, AnalysisSettings(tile_size=round(default_tile * f), pixel_size_um=pixel_size),
                            progress=False).spread for f in GRID_FACTORS]
        columns.append(" ".join(_reading(spread) for spread in readings))
    shown = f"{reference['angle_deg']:.0f}/{reference['directedness']:.2f}" if reference["angle_deg"] is not None else "no IDC"
    return f"{patient} reference {shown} | whole tiles: {columns[0]} | patches: {columns[1]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", required=True, help="the IDC labels.csv")
    parser.add_argument("--patients", help="only the patients of this list (default: every whole patient)")
    args = parser.parse_args()
    chosen = read_patient_list(args.patients) if args.patients else None
    scorer = TileScorer.load()
    with tempfile.TemporaryDirectory(prefix="dicom-heatmap-grid-") as folder:
        for patient in whole_patients(args.csv, chosen):
            print(grid_readings(args.csv, patient, scorer, Path(folder)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
