"""Every output kind from every input kind: valid DICOM, readable back, consistent."""

import json
import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from conftest import ROOT
from dicom_heatmap.writers.sr import CONCEPTS

INPUTS = {
    "ct": ("CT_small.dcm", []),
    "mr": ("MR_small.dcm", []),
    "wsi": ("wsi_lymph_node.dcm", []),
    "svs": ("cmu_small_region.svs", []),
    "png": ("idc_mosaic_tail.png", ["--grid", "8x12", "--pixel-size-um", "4"]),  # scored as the model's patches
}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, data_dir, request):
    """Run the CLI once on all inputs; map each input to its result folder."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("outputs")
    folders = {}
    for key, (name, options) in INPUTS.items():
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", "analyze", str(data_dir / name), "--out", str(out / key),
                               "--quiet", *options], capture_output=True, text=True, cwd=data_dir.parent.parent)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        (folder,) = [p for p in (out / key).iterdir() if p.is_dir()]
        folders[key] = folder
        (folder.parent / "stderr.txt").write_text(done.stderr)
    return folders


@pytest.mark.parametrize("key", list(INPUTS))
def test_every_output_is_written_and_valid(analysed, key, dciodvfy):
    folder = analysed[key]
    names = sorted(p.name for p in folder.iterdir())
    # the files for viewers: a volume for CT/MR, GeoJSON for slides and pictures (no lesion here: no SEG)
    viewer = ["scores.nii.gz", "analysed.nii.gz"] if key in ("ct", "mr") else ["heatmap.geojson"]
    assert names == sorted(["pm.dcm", "preview.png", "result.json", "sc-0001.dcm", "sr.dcm", *viewer])
    for name in (n for n in names if n.endswith(".dcm")):
        assert dciodvfy(folder / name) == [], f"{key}/{name}"


@pytest.mark.parametrize("key", list(INPUTS))
def test_outputs_share_the_study_and_say_not_for_diagnosis(analysed, key, data_dir):
    folder = analysed[key]
    objects = [pydicom.dcmread(folder / n) for n in ("sc-0001.dcm", "pm.dcm", "sr.dcm")]
    assert len({str(ds.StudyInstanceUID) for ds in objects}) == 1
    assert len({str(ds.SeriesInstanceUID) for ds in objects}) == 3
    for ds in objects:
        assert "research only" in ds.SeriesDescription  # numbered after the source series where it has a number
    name = INPUTS[key][0]
    if name.endswith(".dcm"):
        source = pydicom.dcmread(data_dir / name, stop_before_pixels=True)
        assert objects[0].StudyInstanceUID == source.StudyInstanceUID
        assert objects[0].PatientID == source.get("PatientID", "")
        assert objects[0].SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert objects[0].BurnedInAnnotation == "YES"


@pytest.mark.parametrize("key", list(INPUTS))
def test_parametric_map_reads_back_with_the_same_scores(analysed, key):
    folder = analysed[key]
    result = json.loads((folder / "result.json").read_text())
    expected = np.array(result["heatmap"], dtype=float)  # None -> nan
    pm = pydicom.dcmread(folder / "pm.dcm")
    frames = pm.pixel_array.reshape(-1, pm.Rows, pm.Columns)
    assert frames.shape == expected.shape
    np.testing.assert_allclose(frames[0], expected[0], atol=1e-6, equal_nan=True)
    assert pm.Rows == result["grid"]["rows"] and pm.Columns == result["grid"]["cols"]


@pytest.mark.parametrize("key", list(INPUTS))
def test_structured_report_carries_the_direction(analysed, key):
    folder = analysed[key]
    result = json.loads((folder / "result.json").read_text())
    report = hd.sr.srread(folder / "sr.dcm")
    groups = report.content.get_image_measurement_groups()
    assert len(groups) == 1
    (evaluation,) = groups[0].get_qualitative_evaluations(name=CONCEPTS["direction"])
    words = result["spread"]["words"]
    assert evaluation.value.value == "DIR-" + words.upper()
    (maximum,) = groups[0].get_measurements(name=CONCEPTS["max_score"])
    assert maximum.value == pytest.approx(result["statistics"]["max_score"], abs=1e-5)
    focus_group, *lesion_groups = report.content.get_planar_roi_measurement_groups()
    assert str(focus_group.tracking_identifier) == "Focus tile"
    if result["spread"]["directed"]:
        (angle,) = groups[0].get_measurements(name=CONCEPTS["angle"])
        assert angle.value == pytest.approx(result["spread"]["angle_deg"], abs=1e-3)
    # one group a lesion, the dominant first, each with its own direction
    lesions = result["spread"]["lesions"]
    assert [str(g.tracking_identifier) for g in lesion_groups] == [f"Lesion {i + 1} of {len(lesions)}" for i in range(len(lesions))]
    for group, lesion in zip(lesion_groups, lesions):
        # counted in the model's patches where the lesions were read on them
        counted = "lesion_patches" if result["patches"]["scored"].startswith("patches") else "lesion_tiles"
        (tiles,) = group.get_measurements(name=CONCEPTS[counted])
        assert tiles.value == lesion["tiles"]
        (evaluation,) = group.get_qualitative_evaluations(name=CONCEPTS["direction"])
        assert evaluation.value.value == "DIR-" + (lesion["words"].upper() if lesion["directed"] else "NONE")


@pytest.mark.parametrize("key", list(INPUTS))
def test_a_ct_or_mr_input_is_flagged_as_outside_the_models_domain(analysed, key):
    """The H&E model on CT or MR: one warning line on the console, in result.json and coded in the SR."""
    folder = analysed[key]
    outside = key in ("ct", "mr")
    result = json.loads((folder / "result.json").read_text())
    warnings = [line for line in (folder.parent / "stderr.txt").read_text().splitlines() if "warning:" in line]
    groups = hd.sr.srread(folder / "sr.dcm").content.get_image_measurement_groups()
    coded = groups[0].get_qualitative_evaluations(name=CONCEPTS["input_domain"])
    if key in ("wsi", "svs"):  # too coarse for the model's patches; skin on which the 13 layers disagree
        words = {"wsi": "too coarse for the model", "svs": "13 layers disagree"}[key]
        assert words in result["input"]["warning"] and len(warnings) == 1 and words in warnings[0]
        assert len(coded) == 1
        return
    if outside:
        assert "H&E-stained breast tissue" in result["input"]["warning"] and key.upper() in result["input"]["warning"]
        assert len(warnings) == 1 and warnings[0].startswith("dicom-heatmap: warning: ")
        assert warnings[0].endswith(f"{INPUTS[key][0]}: {result['input']['warning']}")
        assert len(coded) == 1
    else:
        assert result["input"]["warning"] is None and warnings == [] and coded == []


def test_patient_geometry_reaches_the_outputs(analysed):
    folder = analysed["ct"]
    pm = pydicom.dcmread(folder / "pm.dcm")
    source = pydicom.dcmread(Path(__file__).parent / "data" / "CT_small.dcm")
    assert pm.FrameOfReferenceUID == source.FrameOfReferenceUID
    shared = pm.SharedFunctionalGroupsSequence[0]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == pytest.approx([128 / 8 * 0.661468] * 2, rel=1e-4)
    position = [float(v) for v in pm.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient]
    tile = 16 * 0.661468
    corner = np.array(source.ImagePositionPatient, float)
    assert position == pytest.approx(corner + [(tile - 0.661468) / 2, (tile - 0.661468) / 2, 0], abs=1e-3)


def test_png_heatmap_finds_the_known_lesion(analysed, data_dir):
    """The shipped model against the mosaic's known layout (real tiles from held-out patients)."""
    from pipelines.training.metrics import roc_auc

    result = json.loads((analysed["png"] / "result.json").read_text())
    layout = np.array(json.loads((data_dir / "idc_mosaic_tail.json").read_text())["layout"])
    scores = np.nan_to_num(np.array(result["heatmap"], dtype=float)[0], nan=0.0)
    assert roc_auc(layout.ravel(), scores.ravel()) >= 0.85
    assert result["spread"]["words"] == "right"


def test_a_second_run_gives_the_same_objects(run_cli, data_dir, tmp_path):
    uids = []
    for attempt in range(2):
        done = run_cli("analyze", data_dir / "MR_small.dcm", "--out", tmp_path, "--quiet")
        assert done.returncode == 0, done.stderr
        (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
        uids.append(sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in folder.glob("*.dcm")))
    assert uids[0] == uids[1]
    assert len(list(tmp_path.iterdir())) == 1


def test_demo_finds_the_known_direction_and_flags_the_ct(run_cli, tmp_path):
    done = run_cli("demo", "--out", tmp_path / "demo")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "expected direction right (0 deg), found right" in done.stdout
    ct = done.stdout.split("CT_small.dcm:")[1]
    assert "  warning: the model knows only H&E-stained breast tissue" in ct and "on this CT image" in ct
    assert len([p for p in (tmp_path / "demo").iterdir() if p.is_dir()]) == 4
    # the README's example of what the demo prints is what it prints (the bf16 fast path may
    # move a printed score by a unit in the last place on another CPU)
    readme = (ROOT / "README.md").read_text().split("`make demo` prints, for each sample, a line such as")[1]
    example = re.search(r"```\n(.*?)```", readme, flags=re.S).group(1).splitlines()
    printed = [re.sub(r"  \[[0-9.]+ s\]$", "", line) for line in done.stdout.splitlines()]
    assert len(example) >= 3
    for line in example:
        number = r"-?\d+(?:\.\d+)?"
        matches = [p for p in printed if re.sub(number, "#", p) == re.sub(number, "#", line)]
        assert matches, f"README line not printed by the demo: {line!r}"
        for shown, documented in zip(re.findall(number, matches[0]), re.findall(number, line)):
            assert float(shown) == pytest.approx(float(documented), abs=0.002 if "." in documented else 1), (line, matches[0])


def test_pictures_carry_a_scale_bar_where_the_spacing_is_known(scorer, data_dir):
    """The bar is a round length; it is drawn (lower left only) when the spacing is given."""
    from dicom_heatmap import analyze
    from dicom_heatmap.render import _scale_bar_length, render_slice

    assert _scale_bar_length(0.004, 1000) == (pytest.approx(125.0), "500 um")  # 4 um pixels: a fifth is 0.8 mm
    assert _scale_bar_length(0.5, 512) == (pytest.approx(100.0), "50 mm")  # a fifth is 51.2 mm
    result = analyze(data_dir / "idc_mosaic_tail.png", scorer, progress=False)
    plain, scale = render_slice(result.image[0], result.tile_map, result.spread, 0, "caption")
    with_bar, _ = render_slice(result.image[0], result.tile_map, result.spread, 0, "caption", pixel_mm=0.004)
    rows, cols = np.nonzero((plain != with_bar).any(axis=2))
    assert rows.size > 0
    height, width = result.image.shape[1:3]
    assert rows.min() > 0.8 * height * scale and cols.max() < 0.5 * width * scale



def test_tile_numbers_stand_on_dark_labels_on_white_glass(scorer, data_dir):
    """On glass (white, not analysed) a number must not vanish: its label is dark, its text white."""
    from dicom_heatmap import analyze
    from dicom_heatmap.render import NUMBER_LABEL, render_slice

    result = analyze(data_dir / "wsi_lymph_node.dcm", scorer, progress=False)
    picture, scale = render_slice(result.image[0], result.tile_map, result.spread, 0, "caption")
    grid = result.tile_map.grid
    assert not result.tile_map.analysed[0, 0, 0]  # tile 1 is glass
    label = picture[int(grid.row_edges[0] * scale) + 1 : int(grid.row_edges[0] * scale) + 10,
                    int(grid.col_edges[0] * scale) + 1 : int(grid.col_edges[0] * scale) + 8]
    dark = np.all(label == NUMBER_LABEL, axis=-1).mean()
    white = np.all(label >= 230, axis=-1).mean()
    assert dark > 0.3 and white > 0.05, (dark, white)


def test_caption_carries_the_scale_notice_and_the_domain_warning(scorer, data_dir):
    from dicom_heatmap import analyze
    from dicom_heatmap.result_folder import slice_caption

    unknown_scale = analyze(data_dir / "idc_mosaic_tail.png", scorer, progress=False)
    assert unknown_scale.scale_notice and f"NOTE: {unknown_scale.scale_notice}" in slice_caption(unknown_scale, 0)
    too_coarse = analyze(data_dir / "wsi_lymph_node.dcm", scorer, progress=False)
    assert "too coarse" in too_coarse.domain_warning
    assert slice_caption(too_coarse, 0).startswith(f"WARNING: {too_coarse.domain_warning}")
