"""Training on one's own CT/MR: a datalist of series with SEG or NIfTI labels, a model that
declares its domain, the analysis and the evaluation that read it (issue #34)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dicom_heatmap.domain import HE_DOMAIN, ModelDomain, domain_warning
from dicom_heatmap.errors import ModelError
from dicom_heatmap.network import HeadedVGG16
from dicom_heatmap.scorer import TileScorer
from pipelines.evaluation.synthetic_lesions import make_lesion_datalist
from pipelines.training.datalist import read_datalist
from pipelines.training.lesion_labels import read_lesion_mask
from transforms.io.load import LoadInput

ROOT = Path(__file__).resolve().parent.parent
QUICK = ("--epochs", "1", "--width-multiplier", "0.125", "--field-of-view-mm", "10", "--quiet")


@pytest.fixture(scope="module")
def lesions(tmp_path_factory) -> Path:
    """Five labelled series (CT and MR; SEG and NIfTI labels); the last validates."""
    return make_lesion_datalist(tmp_path_factory.mktemp("lesions"), series=5, validation=1, mr_every=3, nifti_every=4)


@pytest.fixture(scope="module")
def trained(lesions, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--datalist", lesions, "--out", out, *QUICK],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"model written to {out / 'model.pt'}" in done.stdout
    return out / "model.pt"


def test_the_trained_model_declares_its_domain_and_its_card_says_how_it_was_made(trained):
    scorer = TileScorer.load(trained)
    domain = scorer.domain
    assert domain.modalities == ("CT", "MR") and domain.is_radiology
    assert scorer.field_of_view_um == 10_000 and domain.lesion_fraction == 0.25
    assert domain.training_data["series"] == 5 and domain.training_data["validation_series"] == 1
    assert 0 < domain.disagreement_limit <= 0.5
    card = (trained.parent / "model_card.md").read_text()
    assert "Modalities: CT, MR" in card and "| validation[0] |" in card and "Tile AUC on the validation series" in card
    record = json.loads((trained.parent / "training.json").read_text())
    assert record["domain"]["modalities"] == ["CT", "MR"] and {p["fold"] for p in record["pairs"]} == {0, 1, 2}


def test_a_ct_analysed_with_it_has_no_domain_warning_while_the_he_model_warns(trained, lesions, run_cli, tmp_path):
    (validation,) = [e for e in read_datalist(lesions) if e.validation]
    mine = run_cli("analyze", validation.image, "--model", trained, "--out", tmp_path / "mine", "--quiet")
    assert mine.returncode == 0, mine.stderr
    assert "warning" not in mine.stderr
    result = json.loads(next((tmp_path / "mine").glob("*/result.json")).read_text())
    assert result["software"]["model_domain"]["modalities"] == ["CT", "MR"]
    # the grid is the model's field of view (10 mm) where no grid is asked for
    tile = result["tiles"][0]
    spacing = float(LoadInput()(validation.image)[1]["affine"][1, 1])
    assert abs((tile["box"][2] - tile["box"][0]) * spacing - 10) < 1.0
    shipped = run_cli("analyze", validation.image, "--out", tmp_path / "he", "--quiet")
    assert shipped.returncode == 0 and "warning: " in shipped.stderr and "model knows only H&E" in shipped.stderr
    picture = run_cli("analyze", ROOT / "tests/data/idc_mosaic_tail.png", "--model", trained, "--out", tmp_path / "png",
                      "--quiet")
    assert picture.returncode == 0 and "on this OT image its scores are not findings" in picture.stderr


def test_evaluate_datalist_prints_the_table_of_the_validation_series(trained, lesions, run_cli, tmp_path):
    done = run_cli("evaluate", "--datalist", lesions, "--model", trained, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| series | modality | tiles | positive | AUC |" in done.stdout and "tile AUC" in done.stdout
    report = json.loads((tmp_path / "datalist_evaluation.json").read_text())
    assert report["summary"]["series"] == 1 and report["summary"]["lesions"] >= 1
    assert report["series"][0]["positive"] > 0 and report["series"][0]["warning"] is None


def _copy(lesions: Path, tmp_path: Path) -> Path:
    shutil.copytree(lesions.parent, tmp_path / "d")
    return tmp_path / "d" / "datalist.json"


def _edit(datalist: Path, change) -> None:
    raw = json.loads(datalist.read_text())
    change(raw, datalist.parent)
    datalist.write_text(json.dumps(raw))


def _other_series_seg(raw, folder):
    raw["training"][0]["label"], raw["training"][1]["label"] = raw["training"][1]["label"], raw["training"][0]["label"]


def _nifti_of_other_geometry(raw, folder):
    path = folder / raw["training"][3]["label"]
    image = sitk.ReadImage(str(path))
    image.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(image, str(path))


def _empty_mask(raw, folder):
    path = folder / raw["training"][3]["label"]
    image = sitk.ReadImage(str(path))
    empty = sitk.GetImageFromArray(np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8))
    empty.CopyInformation(image)
    sitk.WriteImage(empty, str(path))


@pytest.mark.parametrize("change,expected", [
    (_other_series_seg, "training[0]: the Segmentation references series"),
    (_nifti_of_other_geometry, "training[3]: the mask's voxel grid (origin, spacing, direction) is not the image's"),
    (_empty_mask, "training[3]: the mask marks no lesion voxel"),
    (lambda raw, folder: raw["training"][2].update(lable="x"), "training.2: unknown key 'lable'"),
    (lambda raw, folder: raw["training"][2].update(label="missing.dcm"), "training[2].label:"),
    (lambda raw, folder: (raw["validation"][0].update(patient="P1"), raw["training"][0].update(patient="P1")),
     "entries that train and entries that validate"),
    (lambda raw, folder: raw["training"][2].update(segment=2), "training[2]: no segment 2"),
])
def test_a_pair_that_does_not_fit_is_refused_in_one_line_and_nothing_is_trained(lesions, run_cli, tmp_path, change, expected):
    datalist = _copy(lesions, tmp_path)
    _edit(datalist, change)
    done = run_cli("train", "--datalist", datalist, "--out", tmp_path / "out", *QUICK)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dicom-heatmap: error: ") and expected in lines[0], done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out" / "model.pt").exists()


def test_a_nifti_mask_in_another_axis_order_reads_as_the_seg(lesions, tmp_path):
    entry = next(e for e in read_datalist(lesions) if e.label.suffix == ".dcm")
    meta = LoadInput()(entry.image)[1]
    shape = LoadInput()(entry.image)[0].shape[:3]
    from_seg = read_lesion_mask(entry, meta, shape)
    # the same voxels stored with the columns reversed and rows and columns swapped
    stored = np.ascontiguousarray(from_seg.transpose(0, 2, 1)[:, ::-1, :])  # array axes (slice, col reversed, row)
    image = sitk.GetImageFromArray(stored.astype(np.uint8))  # i = row, j = reversed column, k = slice
    spacing = np.linalg.norm(meta["affine"][:3, :3], axis=0)  # (slice, row, col)
    slice_dir, row_dir, col_dir = (meta["affine"][:3, a] / spacing[a] for a in range(3))
    image.SetDirection(tuple(np.stack([row_dir, -col_dir, slice_dir], axis=1).ravel()))
    image.SetSpacing((spacing[1], spacing[2], spacing[0]))
    image.SetOrigin(tuple(meta["affine"][:3, 3] + (shape[2] - 1) * meta["affine"][:3, 2]))
    path = tmp_path / "mask.nii.gz"
    sitk.WriteImage(image, str(path))
    from dataclasses import replace
    assert np.array_equal(read_lesion_mask(replace(entry, label=path), meta, shape), from_seg) and from_seg.any()


def test_the_domain_warning_compares_the_input_with_the_declared_domain():
    ct = ModelDomain(modalities=("CT",), description="CT of the liver", body_part="ABDOMEN", disagreement_limit=0.08)
    assert domain_warning(ct, "CT", "ABDOMEN", None, 0.05, 10_000) is None
    assert domain_warning(ct, "CT", None, None, 0.05, 10_000) is None  # an input that does not say
    assert "trained on ABDOMEN only" in domain_warning(ct, "CT", "HEAD", None, 0.05, 10_000)
    assert "on this MR image" in domain_warning(ct, "MR", "ABDOMEN", None, 0.05, 10_000)
    assert "above 0.08" in domain_warning(ct, "CT", "ABDOMEN", None, 0.09, 10_000)
    assert "model knows only H&E" in domain_warning(HE_DOMAIN, "CT", None, None, None, 200)
    assert ModelDomain.from_json(ct.to_json()) == ct


def test_a_model_file_without_a_domain_is_the_he_model_and_a_damaged_one_is_refused(tmp_path):
    assert TileScorer.load().domain == HE_DOMAIN  # the shipped model declares none
    state = HeadedVGG16(width_multiplier=0.125).state_dict()
    state["domain"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    torch.save(state, tmp_path / "damaged.pt")
    with pytest.raises(ModelError, match="domain record is damaged"):
        TileScorer.load(tmp_path / "damaged.pt")


def test_the_training_bundle_takes_a_datalist(lesions, tmp_path):
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json",
                           "--datalist", str(lesions), "--max_epochs", "1", "--field_of_view_mm", "10",
                           "--output_dir", str(tmp_path / "bundle")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert TileScorer.load(tmp_path / "bundle" / "model.pt").domain.is_radiology


def test_training_can_start_from_given_weights_of_the_same_width(trained, lesions, run_cli, tmp_path):
    done = run_cli("train", "--datalist", lesions, "--out", tmp_path / "again", "--init", trained, *QUICK)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "from " + str(trained) in (tmp_path / "again" / "model_card.md").read_text()
    wider = run_cli("train", "--datalist", lesions, "--out", tmp_path / "wide", "--init", "models/model.pt", *QUICK)
    assert wider.returncode == 2 and "models/model.pt: the starting weights are not of this network's shape" in wider.stderr


def test_a_single_ct_slice_is_tiled_at_the_models_field_of_view_not_called_too_coarse(trained):
    from pydicom.data import get_testdata_file

    from dicom_heatmap import analyze

    result = analyze(get_testdata_file("CT_small.dcm"), TileScorer.load(trained), progress=False)
    assert "too coarse" not in (result.domain_warning or "")
    assert result.tile_map.grid.shape[1:] == (8, 8)  # 128 px at 0.66 mm in 10 mm tiles


def test_every_positive_tile_is_kept_and_negatives_are_drawn_up_to_their_share(lesions, monkeypatch):
    from pipelines.training import radiology

    monkeypatch.setattr(radiology, "NEGATIVES_PER_POSITIVE", 2)
    monkeypatch.setattr(radiology, "MIN_NEGATIVES", 10)
    net = HeadedVGG16(input_size=32, width_multiplier=0.125, field_of_view_um=10_000,
                      domain=ModelDomain(modalities=("CT", "MR")))
    tiles = radiology.datalist_tiles(lesions, TileScorer(net, "test", precision="fp32", backend="torch"), 0.25, 0, False)
    for pair in tiles.pairs:
        assert pair["positive"] > 0 and pair["tiles"] - pair["positive"] == min(max(10, 2 * pair["positive"]),
                                                                               pair["tissue_tiles"] - pair["positive"])
    assert len(tiles.table) == sum(p["tiles"] for p in tiles.pairs) and tiles.table.labels.sum() == sum(p["positive"] for p in tiles.pairs)
