"""The whole-slide stage: the context network, the per-slide calibration, `--no-context`,
`train-context` and the domain check, run as a user runs them."""

import json

import numpy as np
import pytest
import torch

from dicom_heatmap import TileScorer
from dicom_heatmap.calibration import THRESHOLD_CEILING, THRESHOLD_FLOOR, calibrate, slide_threshold
from dicom_heatmap.context import MAX_CHANGE, PatchContext, context_inputs
from dicom_heatmap.domain import DISAGREEMENT_LIMIT, layer_disagreement


def test_the_slide_threshold_splits_two_groups_within_its_floor_and_ceiling():
    rng = np.random.default_rng(0)
    low, high = rng.uniform(0.01, 0.1, 300), rng.uniform(0.93, 0.99, 100)
    lifted = np.concatenate([np.clip(low + 0.6, 0, 1), high])  # the stroma of a shifted patient at 0.6-0.7
    threshold = slide_threshold(lifted)
    assert 0.7 < threshold < 0.93  # between the lifted stroma and the tumour
    assert ((calibrate(lifted, threshold) >= 0.5) == (lifted >= threshold)).all()  # the slide's cut reads 0.5
    assert slide_threshold(low) == THRESHOLD_FLOOR  # one group of noise: never below the floor
    assert slide_threshold(np.concatenate([low, np.full(50, 0.9999)])) <= THRESHOLD_CEILING
    assert slide_threshold(np.array([np.nan, 0.3])) == THRESHOLD_FLOOR
    with pytest.raises(ValueError, match="floor and ceiling"):
        slide_threshold(low, floor=0.9, ceiling=0.5)


def test_the_context_moves_a_patch_by_at_most_its_bound_and_leaves_glass_alone():
    probabilities = np.full((6, 7, 14), 0.2, dtype=np.float32)
    probabilities[2:4, 2:4] = 0.95
    probabilities[0, :] = np.nan  # glass
    context = PatchContext()
    assert np.allclose(context.refine(probabilities)[1:], probabilities[1:, :, 0], atol=1e-5) and np.isnan(context.refine(probabilities)[0]).all()
    with torch.no_grad():
        context.body[-1].bias.fill_(100.0)  # a stage that would push everything up
    raised = context.refine(probabilities)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert np.allclose(logit(raised[1:]) - logit(probabilities[1:, :, 0]), MAX_CHANGE, atol=1e-3)
    assert context_inputs(probabilities).shape == (1, 16, 6, 7)


def test_the_domain_statistic_is_the_heads_disagreement():
    agree = np.full((4, 4, 13), 0.7)
    assert layer_disagreement(agree) == pytest.approx(0.0)
    disagree = agree.copy()
    disagree[..., ::2] = 0.1
    assert layer_disagreement(disagree) > DISAGREEMENT_LIMIT
    assert layer_disagreement(np.full((2, 2, 13), np.nan)) is None


def test_the_shipped_model_carries_a_trained_context_stage_and_old_files_none(scorer, tmp_path):
    assert scorer.network.context.is_trained
    from dicom_heatmap.scorer import DEFAULT_MODEL_PATH

    state = torch.load(DEFAULT_MODEL_PATH, weights_only=True)
    old = {k: v for k, v in state.items() if not k.startswith("context.")}  # a file written before 1.5
    torch.save(old, tmp_path / "old.pt")
    assert not TileScorer.load(tmp_path / "old.pt").network.context.is_trained


def test_no_context_keeps_the_raw_scores_and_result_json_holds_both(run_cli, data_dir, tmp_path):
    source = data_dir / "idc_slide_14082.jpg"
    outputs = {}
    for flag in ([], ["--no-context"]):
        out = tmp_path / ("raw" if flag else "refined")
        done = run_cli("analyze", source, "--pixel-size-um", "4", "--tile-size", "50", "--out", out, "--quiet", *flag)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        (folder,) = [p for p in out.iterdir() if p.is_dir()]
        outputs[bool(flag)] = json.loads((folder / "result.json").read_text())
    refined, raw = outputs[False]["patches"], outputs[True]["patches"]
    assert refined["whole_slide_stage"]["ran"] and refined["whole_slide_stage"]["context"]
    assert not raw["whole_slide_stage"]["ran"] and raw["scores"] == raw["raw_scores"]
    assert refined["raw_scores"] == raw["scores"]  # the tile model's scores, kept beside the refined ones
    assert refined["scores"] != refined["raw_scores"]
    assert outputs[False]["outputs"]["uids"]["sr"] != outputs[True]["outputs"]["uids"]["sr"]  # a setting: other UIDs


def test_the_command_warns_on_tissue_outside_the_models_domain(run_cli, data_dir, tmp_path):
    for source, warns in [("cmu_small_region.svs", "13 layers disagree"), ("wsi_lymph_node.dcm", "too coarse for the model"),
                          ("idc_slide_14082.jpg", None)]:
        extra = ["--pixel-size-um", "4"] if source.endswith(".jpg") else []
        done = run_cli("analyze", data_dir / source, "--out", tmp_path / source, "--quiet", *extra)
        assert done.returncode == 0, done.stderr
        lines = done.stderr.strip().splitlines()
        (folder,) = [p for p in (tmp_path / source).iterdir() if p.is_dir()]
        result = json.loads((folder / "result.json").read_text())
        if warns is None:
            assert lines == [] and result["input"]["warning"] is None
            assert result["input"]["layer_disagreement"] < DISAGREEMENT_LIMIT
        else:
            assert len(lines) == 1 and lines[0].startswith("dicom-heatmap: warning: ") and warns in lines[0], lines
            assert warns in result["input"]["warning"]


def test_train_context_fits_the_stage_and_writes_a_model_that_loads(run_cli, slide_table, tmp_path):
    done = run_cli("train-context", "--data", slide_table, "--out", tmp_path / "ctx", "--epochs", "2", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    model = TileScorer.load(tmp_path / "ctx" / "model.pt")
    assert model.network.context.is_trained
    report = json.loads((tmp_path / "ctx" / "context.json").read_text())
    assert [r["patient"] for r in report["leave_slides_out"]] == ["14082"]
    assert "| 14082 |" in (tmp_path / "ctx" / "context.md").read_text()
    bad = run_cli("train-context", "--data", slide_table, "--out", tmp_path / "bad", "--epochs", "0")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "epochs" in bad.stderr
    assert not (tmp_path / "bad").exists()
