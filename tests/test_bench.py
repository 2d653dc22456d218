"""The bench's race: the MONAI peer scores the very patches the project scored, and the race
prints its table. (Speed itself is the bench's to show, never a test's.)"""

from __future__ import annotations

import json

import numpy as np

from pipelines.evaluation.bench import _slide_race, make_synthetic_slide
from pipelines.evaluation.monai_peer import score_slide


def test_the_monai_peer_scores_the_patches_the_project_scored(tmp_path, run_cli):
    slide = make_synthetic_slide(tmp_path / "slide.tif", 6144, mpp=0.25)
    done = run_cli("analyze", slide, "--out", tmp_path / "out", "--quiet")
    assert done.returncode == 0, done.stderr
    result_json = next((tmp_path / "out").glob("*/result.json"))
    raw = json.loads(result_json.read_text())["patches"]["raw_scores"]
    project = np.array([value for row in raw for value in row if value is not None])

    count = score_slide(slide, result_json, tmp_path / "peer")

    peer = np.load(tmp_path / "peer" / "scores.npy")
    assert count == len(project) >= 20
    # the same weights on the same pixels: only bf16 (torch) against bf16 (OpenVINO) differs
    assert np.abs(peer - project).max() <= 0.02


def test_the_race_prints_the_ratio_of_whole_processes(capsys):
    rows = _slide_race((4096,), rounds=1)
    printed = capsys.readouterr().out
    assert [row["side"] for row in rows] == [4096]
    assert rows[0]["patches"] > 0 and rows[0]["project_s"] > 0 and rows[0]["monai_s"] > 0
    assert abs(rows[0]["ratio"] - rows[0]["monai_s"] / rows[0]["project_s"]) < 1e-9
    assert "| 4k x 4k |" in printed and "MONAI / project" in printed
