"""Build a slide-like mosaic of real IDC tiles with a known tumour layout.

The IDC tile set holds only ~30 tiles per patient, so no real slide can be rebuilt
from it; a mosaic places real tumour (IDC) tiles on a chosen region and real non-IDC
tiles elsewhere, giving a picture whose right answer is known. Tiles are drawn at
random (fixed seed) from the chosen patients only - by default those of
``models/held_out_patients.txt``, which no stage of the shipped model's training used -
with no look at any model's output.

Run by ``dicom-heatmap evaluate --mosaics N`` (:func:`evaluate_mosaics`); ``python -m
pipelines.evaluation.mosaics --labels labels.csv --out DIR`` builds one, as the demo's was.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from dicom_heatmap.errors import InputError
from pipelines.training.tile_data import HELD_OUT_PATIENTS_FILE, read_patient_list

__all__ = ["tail_layout", "spread_layout", "symmetric_layout", "mosaic_layouts", "mosaic_rows", "paste_mosaic", "build_mosaic",
           "evaluate_mosaics"]


def tail_layout(rows: int = 8, cols: int = 12) -> np.ndarray:
    """A lesion with a focus on the left and a tail extending to the right (1 = tumour)."""
    layout = np.zeros((rows, cols), dtype=np.int64)
    layout[2:6, 1:4] = 1  # the focus: a 4 x 3 block
    layout[3:5, 4:10] = 1  # the tail: two rows running right
    return layout


def mosaic_rows(labels_csv: str | Path, patients: list[str], tile: int = 50) -> list[dict]:
    """The rows of ``labels_csv`` a mosaic may draw from: tiles of ``patients``, ``tile`` px square.

    Raises:
        InputError: when the table lacks the columns this needs.
    """
    labels_csv = Path(labels_csv)
    with labels_csv.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("path", "patient_id", "label", "width", "height") if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(labels_csv, f"the labels table lacks the column(s) {', '.join(missing)} that mosaics are drawn by")
        wanted = set(patients)
        # sizes compared as text: a damaged cell is no 50 px tile, not a crash
        return [r for r in reader if r["patient_id"] in wanted and r["width"].strip() == str(tile)
                and r["height"].strip() == str(tile)]


def paste_mosaic(rows: list[dict], root: Path, layout: np.ndarray, tile: int = 50, seed: int = 7) -> tuple[np.ndarray, list[str]]:
    """The mosaic picture of ``layout`` (1 where a tumour tile goes) from ``rows``
    (:func:`mosaic_rows`, paths relative to ``root``), and the paths of the tiles used.

    Tiles are drawn without replacement while the chosen patients' tiles last, then again.
    """
    rng = np.random.default_rng(seed)
    everyone = {label: [r for r in rows if int(r["label"]) == label] for label in (0, 1)}
    for label, kind in ((0, "non-IDC"), (1, "IDC")):
        if (layout == label).any() and not everyone[label]:
            raise InputError(root, f"the patients chosen have no {kind} tile of {tile} px to build a mosaic from")
    pools = {label: list(tiles) for label, tiles in everyone.items()}
    picture = np.zeros((layout.shape[0] * tile, layout.shape[1] * tile, 3), dtype=np.uint8)
    used = []
    for (r, c), label in np.ndenumerate(layout):
        pool = pools[int(label)]
        if not pool:  # a few patients may hold fewer tiles than a mosaic: draw them again
            pool.extend(everyone[int(label)])
        choice = pool.pop(int(rng.integers(len(pool))))
        with Image.open(root / choice["path"]) as image:
            picture[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = np.asarray(image.convert("RGB"))
        used.append(choice["path"])
    return picture, used


def build_mosaic(labels_csv: str | Path, out_png: str | Path, layout: np.ndarray, patients: list[str],
                 tile: int = 50, seed: int = 7) -> dict:
    """Write the mosaic PNG of the demo's tail layout and return its description (also
    written beside it as JSON).

    Args:
        labels_csv: the IDC ``labels.csv``.
        out_png: the picture to write.
        layout: (rows, cols) array, 1 where a tumour tile goes.
        patients: the patients to draw tiles from.
        tile: tile side in pixels (the IDC tiles are 50 px).
        seed: random seed of the draw.
    """
    labels_csv = Path(labels_csv)
    picture, used = paste_mosaic(mosaic_rows(labels_csv, patients, tile), labels_csv.parent, layout, tile, seed)
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


def spread_layout(angle_deg: float, size: int = 24, focus_radius: float = 4.0, tail_length: float = 11.0,
                  tail_half_width: float = 1.5) -> np.ndarray:
    """A (size, size) lesion with a round focus and a tail three tiles wide running at
    ``angle_deg`` (counter-clockwise from right on screen); the focus sits off centre, away
    from the tail, so the whole lesion fits (1 = tumour)."""
    direction = np.array([-np.sin(np.radians(angle_deg)), np.cos(np.radians(angle_deg))])  # (row, col): up is -row
    centre = size // 2 - direction * tail_length / 2
    points = np.indices((size, size)).reshape(2, -1).T.astype(float)
    offsets = points - centre
    along = np.clip(offsets @ direction, 0.0, tail_length)
    across = np.linalg.norm(offsets - along[:, None] * direction, axis=1)
    tumour = (np.linalg.norm(offsets, axis=1) <= focus_radius) | (across <= tail_half_width)
    return tumour.reshape(size, size).astype(np.int64)


def symmetric_layout(size: int = 24, radius: float = 5.0) -> np.ndarray:
    """A (size, size) round lesion centred on the middle tile: no spread direction (1 = tumour)."""
    points = np.indices((size, size)).transpose(1, 2, 0) - size // 2
    return (np.linalg.norm(points, axis=-1) <= radius).astype(np.int64)


def mosaic_layouts(count: int) -> list[tuple[str, np.ndarray]]:
    """``count`` named layouts: every fourth a symmetric lesion, the others a focus with a
    tail, their directions spread evenly round the compass."""
    symmetric = count // 4
    directed = count - symmetric
    layouts = [(f"tail-{angle:03.0f}", spread_layout(angle)) for angle in np.arange(directed) * 360.0 / max(directed, 1)]
    layouts += [(f"round-{index + 1}", symmetric_layout()) for index in range(symmetric)]
    return layouts


def evaluate_mosaics(labels_csv: str | Path, patients: list[str], scorer, count: int = 16,
                     out_dir: str | Path | None = None, threshold: float = 0.5) -> list[dict]:
    """Build ``count`` mosaics of real tiles of ``patients`` (see :func:`mosaic_layouts`),
    analyse each through the real :func:`dicom_heatmap.api.analyze` path with its pixel size
    declared (the IDC tiles' 4 um), and compare with the layout, as the whole slides are
    compared with their annotation (:func:`pipelines.training.whole_slides.reference_direction`).

    Args:
        labels_csv: the IDC table.
        patients: the patients the tiles are drawn from (patients the model never saw).
        scorer: the loaded model.
        count: how many mosaics.
        out_dir: where ``mosaics/<name>.png`` (mosaic, layout, heatmap) go; none when ``None``.
        threshold: the analysis's lesion threshold.

    Returns:
        one record a mosaic, as :func:`pipelines.evaluation.slides.evaluate_slides` gives for a slide
        (``patient`` holds the mosaic's name).
    """
    from pipelines.evaluation.slides import comparison_record, draw_slide
    from pipelines.training.whole_slides import TILE, RebuiltSlide, analyze_picture, lattice_settings

    folder = Path(out_dir) / "mosaics" if out_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    settings = lattice_settings(threshold)
    rows = mosaic_rows(labels_csv, patients, TILE)
    records = []
    for seed, (name, layout) in enumerate(mosaic_layouts(count)):
        picture, _ = paste_mosaic(rows, Path(labels_csv).parent, layout, TILE, seed)
        result = analyze_picture(picture, scorer, settings)
        mosaic = RebuiltSlide(name, picture, layout.astype(np.int8))
        record = comparison_record(mosaic, result)
        records.append(record)
        if folder is not None:
            draw_slide(mosaic, result.heatmap, record, folder / f"{name}.png", title=f"mosaic {name}")
    return records


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="IDC labels.csv")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--patients", default=HELD_OUT_PATIENTS_FILE, help="patient list to draw from (default: %(default)s)")
    args = parser.parse_args()
    build_mosaic(args.labels, args.out, tail_layout(), read_patient_list(args.patients))
