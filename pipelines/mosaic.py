"""Build a slide-like mosaic of real IDC tiles with a known tumour layout.

The IDC tile set holds only ~30 tiles per patient, so no real slide can be rebuilt
from it; a mosaic places real tumour (IDC) tiles on a chosen region and real non-IDC
tiles elsewhere, giving a picture whose right answer is known. Tiles are drawn at
random (fixed seed) from the chosen patients only - by default those of
``models/held_out_patients.txt``, which no stage of the shipped model's training used -
with no look at any model's output.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.tile_data import HELD_OUT_PATIENTS_FILE, read_patient_list

__all__ = ["tail_layout", "build_mosaic"]


def tail_layout(rows: int = 8, cols: int = 12) -> np.ndarray:
    """A lesion with a focus on the left and a tail extending to the right (1 = tumour)."""
    layout = np.zeros((rows, cols), dtype=np.int64)
    layout[2:6, 1:4] = 1  # the focus: a 4 x 3 block
    layout[3:5, 4:10] = 1  # the tail: two rows running right
    return layout


def build_mosaic(labels_csv: str | Path, out_png: str | Path, layout: np.ndarray, patients: list[str],
                 tile: int = 50, seed: int = 7) -> dict:
    """Write the mosaic PNG and return its description (also written beside it as JSON).

    Args:
        labels_csv: the IDC ``labels.csv``.
        out_png: the picture to write.
        layout: (rows, cols) array, 1 where a tumour tile goes.
        patients: the patients to draw tiles from.
        tile: tile side in pixels (the IDC tiles are 50 px).
        seed: random seed of the draw.
    """
    labels_csv = Path(labels_csv)
    with labels_csv.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle)
                if r["patient_id"] in patients and int(r["width"]) == tile and int(r["height"]) == tile]
    rng = np.random.default_rng(seed)
    pools = {label: [r for r in rows if int(r["label"]) == label] for label in (0, 1)}
    picture = np.zeros((layout.shape[0] * tile, layout.shape[1] * tile, 3), dtype=np.uint8)
    used = []
    for (r, c), label in np.ndenumerate(layout):
        pool = pools[int(label)]
        choice = pool.pop(int(rng.integers(len(pool))))
        with Image.open(labels_csv.parent / choice["path"]) as image:
            picture[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = np.asarray(image.convert("RGB"))
        used.append(choice["path"])
    Image.fromarray(picture).save(out_png)
    description = {
        "grid": list(layout.shape),
        "tile_pixels": tile,
        "layout": layout.tolist(),
        "tiles": used,
        "source": "IDC breast histopathology tiles (Janowczyk & Madabhushi 2016), patients " + ",".join(patients),
        "truth": "focus on the left, tail extending right: spread direction +x (right, 0 degrees)",
    }
    Path(out_png).with_suffix(".json").write_text(json.dumps(description, indent=1))
    return description


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="IDC labels.csv")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--patients", default=HELD_OUT_PATIENTS_FILE, help="patient list to draw from (default: %(default)s)")
    args = parser.parse_args()
    build_mosaic(args.labels, args.out, tail_layout(), read_patient_list(args.patients))
