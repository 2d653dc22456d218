"""Whole IDC slides rebuilt from their annotated tiles: `evaluate --slides` and the spread's
stability on a real slide.

tests/data/idc_slide_14082.jpg is IDC patient 14082's downsampled slide, rebuilt by pasting
every one of its 478 tiles at (x - 1, y - 1) (pipelines.slides.rebuild_slide);
idc_slide_14082.csv holds each tile's x, y and label (the pathologist's IDC outline).
"""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from dicom_heatmap.api import AnalysisSettings, analyze
from pipelines.slides import reference_direction

PATIENT = "14082"


@pytest.fixture(scope="module")
def slide_table(tmp_path_factory, data_dir):
    """The slide cut back into its 50 px tiles, with a labels table as the IDC set has it."""
    folder = tmp_path_factory.mktemp("idc")
    picture = np.asarray(Image.open(data_dir / f"idc_slide_{PATIENT}.jpg"))
    with (data_dir / f"idc_slide_{PATIENT}.csv").open(newline="") as handle:
        tiles = list(csv.DictReader(handle))
    rows = []
    for tile in tiles:
        x, y, label = int(tile["x"]), int(tile["y"]), int(tile["label"])
        path = f"images/{PATIENT}/{label}/{PATIENT}_idx5_x{x}_y{y}_class{label}.png"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture[y - 1 : y + 49, x - 1 : x + 49]).save(folder / path)
        rows.append({"path": path, "patient_id": PATIENT, "x": x, "y": y, "label": label, "fold": 2})
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "labels.csv"


def test_evaluate_slides_compares_heatmap_and_direction_with_the_annotation(run_cli, slide_table, tmp_path):
    done = run_cli("evaluate", "--csv", slide_table, "--slides", "--out", tmp_path / "eval")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"| {PATIENT} | 478 |" in done.stdout  # the table, one row a slide
    (record,) = json.loads((tmp_path / "eval" / "slides.json").read_text())
    labels = np.full((47, 58), -1)
    for row in csv.DictReader(slide_table.open()):
        labels[(int(row["y"]) - 1) // 50, (int(row["x"]) - 1) // 50] = int(row["label"])
    assert record["reference"] == json.loads(json.dumps(reference_direction(labels)))
    assert record["tiles"] == 478 and record["tumour_tiles"] == int((labels == 1).sum())
    assert record["analysed_share"] >= 0.9
    assert record["tile_auc"] >= 0.9
    assert record["reference"]["directed"] and record["direction_error_deg"] is not None
    with Image.open(tmp_path / "eval" / "slides" / f"{PATIENT}.png") as picture:
        assert picture.width > 3 * picture.height  # slide, annotation and heatmap side by side


def test_evaluate_slides_without_slides_to_rebuild_is_refused_before_scoring(run_cli, data_dir, slide_table, tmp_path):
    cases = [
        # a table without tile positions
        ([data_dir / "tiny_tiles" / "labels.csv"], "labels.csv: the labels table lacks the column(s) x, y that rebuild slides"),
        # a whole patient, but not among those asked for
        ([slide_table, "--folds", "0"], "labels.csv: none of the patients chosen has a whole slide"),
    ]
    for arguments, words in cases:
        done = run_cli("evaluate", "--csv", *arguments, "--slides", "--out", tmp_path / "eval")
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines() == [f"dicom-heatmap: error: {done.stderr.split('error: ', 1)[1].strip()}"]
        assert words in done.stderr, done.stderr
        assert not (tmp_path / "eval").exists()


def test_the_lesion_reads_the_same_when_the_grid_is_a_quarter_finer_or_coarser(scorer, data_dir):
    """On a real slide, grid tiles of 0.75x to 1.25x the annotation's 50 px find the focus in
    the same place (within one annotated tile) and read the same directedness.

    What this slide does not show: a stable angle. Model 1.0's heatmap of this tumour is only
    weakly directed (directedness 0.07-0.24 over these grids, the annotation's 0.37), so the
    angle swings where it crosses the 0.2 threshold; the spread issue's 20-degree target is
    not met here (see the model card)."""
    source = data_dir / f"idc_slide_{PATIENT}.jpg"
    results = [analyze(source, scorer, AnalysisSettings(tile_size=size), progress=False) for size in (38, 44, 50, 56, 62)]
    focus = np.array([r.spread.focus_position[:2] for r in results])
    assert max(np.linalg.norm(a - b) for a in focus for b in focus) <= 50 * 1.25, focus
    directedness = [r.spread.directedness for r in results]
    assert max(directedness) - min(directedness) <= 0.2, directedness
    assert all(len(r.spread.lesions) <= 2 for r in results)  # one tumour, at most a speck beside it


def test_the_evaluation_bundle_writes_the_slide_table(slide_table, tmp_path):
    from test_bundle import bundle

    bundle("run", "--config_file", "configs/evaluate.json", "--data_csv", slide_table, "--slides", "True",
           "--output_dir", tmp_path / "eval")
    (record,) = json.loads((tmp_path / "eval" / "slides.json").read_text())
    assert record["patient"] == PATIENT and record["tiles"] == 478
    assert f"| {PATIENT} | 478 |" in (tmp_path / "eval" / "slides.md").read_text()
