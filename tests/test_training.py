"""Training: a fixed seed gives the same model; a killed run resumes to the same model; class-balanced sampling."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

TINY = ROOT / "tests" / "data" / "tiny_tiles" / "labels.csv"


def train_command(out, epochs=3):
    return [sys.executable, "-m", "pipelines.cli", "train", "--data", str(TINY), "--out", str(out), "--epochs", str(epochs),
            "--input-size", "32"]


def state(path):
    return torch.load(path, weights_only=True)


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fixed_seed_gives_the_same_model_and_a_killed_run_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the same order of sums in every run
    for name in ("a", "b"):
        done = subprocess.run(train_command(tmp_path / name), cwd=ROOT, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    first, second = state(tmp_path / "a" / "model.pt"), state(tmp_path / "b" / "model.pt")
    assert same(first, second)
    # kill a run as soon as its first epoch's checkpoint exists, then start it again
    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while not (killed / "checkpoint.pt").exists() and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["epoch"] < 3
    done = subprocess.run(train_command(killed), cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "resuming from" in done.stdout, done.stderr[-2000:]
    assert same(state(killed / "model.pt"), first)


def test_balanced_sampling_draws_both_classes_equally_often():
    import numpy as np

    from pipelines.training.train import epoch_order

    labels = np.array([1] * 270 + [0] * 730)  # the IDC tiles' share of tumour
    generator = torch.Generator().manual_seed(0)
    plain = epoch_order(labels, False, generator)
    assert sorted(plain.tolist()) == list(range(len(labels)))  # every tile once
    drawn = torch.cat([epoch_order(labels, True, generator) for _ in range(20)]).numpy()
    assert len(drawn) == 20 * len(labels)
    assert abs(labels[drawn].mean() - 0.5) < 0.02


def test_stages_get_patients_of_their_own():
    import itertools

    import numpy as np

    from pipelines.training.tile_data import load_tile_table
    from pipelines.training.plan import TrainSettings, fold_plan, stage_sets

    table = load_tile_table(TINY)
    held_out = ["12875", "9291"]  # two fold-3 patients of the tiny table
    sets = stage_sets(table, TrainSettings(**{**fold_plan(None), "held_out_patients": held_out}))
    patients = {name: set(part.patients) for name, part in sets.items()}
    for a, b in itertools.combinations(patients, 2):
        assert not patients[a] & patients[b], (a, b)
    assert patients["test"] == set(held_out)
    assert set.union(*patients.values()) == set(table.patients)
    # without a test fold, heads and fusion get 2/3 of the last two folds' patients: a third of all, as in a CV run
    pool = set(table.patients[table.folds >= 2]) - set(held_out)
    assert len(patients["heads"] | patients["fusion"]) == round(len(pool) * 2 / 3)
    assert {0, 1} <= set(sets["extractor"].folds)

    # head_share: the head fold's patients not kept for the heads and the fusion train the extractor
    plain = stage_sets(table, TrainSettings(**fold_plan(0)))
    shared = stage_sets(table, TrainSettings(**{**fold_plan(0), "head_share": 0.5}))
    head_fold = set(table.patients[table.folds == 3])
    kept = set(shared["heads"].patients) | set(shared["fusion"].patients)
    assert len(kept) == round(0.5 * len(head_fold)) and kept < head_fold
    assert set(shared["extractor"].patients) == set(plain["extractor"].patients) | (head_fold - kept)
    assert np.array_equal(shared["test"].labels, plain["test"].labels)


def test_training_without_patients_for_a_stage_is_refused(run_cli, tmp_path):
    lines = TINY.read_text().splitlines()
    no_head_folds = tmp_path / "labels.csv"  # the shipped plan's heads and fusion take folds 2 and 3
    no_head_folds.write_text("\n".join([lines[0]] + [l for l in lines[1:] if l.rstrip()[-2:] not in (",2", ",3")]) + "\n")
    (tmp_path / "images").symlink_to(TINY.parent / "images")
    out = tmp_path / "out"
    done = run_cli("train", "--data", no_head_folds, "--out", out, "--epochs", "1", "--input-size", "32")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(no_head_folds) in done.stderr and "for the heads" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("option, value, setting", [("--label-smoothing", "0.7", "label_smoothing"),
                                                     ("--epochs", "0", "epochs"), ("--stain-jitter", "nan", "stain_jitter")])
def test_a_training_setting_out_of_range_is_refused_before_any_work(run_cli, tmp_path, option, value, setting):
    out = tmp_path / "out"
    done = run_cli("train", "--data", TINY, "--out", out, option, value)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and setting in lines[0] and value in lines[0], done.stderr
    assert not out.exists()


def test_stain_jitter_scales_and_shifts_each_stain_within_sigma():
    from dicom_heatmap.stain import HED_FROM_RGB, jitter_stains

    generator = torch.Generator().manual_seed(3)
    tiles = 60 + 140 * torch.rand(8, 3, 6, 6, generator=generator)  # mid-tones: nothing is clipped
    assert torch.allclose(jitter_stains(tiles, 0.0, generator), tiles, atol=1e-3)
    sigma = 0.05
    jittered = jitter_stains(tiles, sigma, generator)

    def stains(x):
        return torch.einsum("nchw,cs->nshw", -torch.log(x / 255.0), HED_FROM_RGB).flatten(2)

    before, after = stains(tiles), stains(jittered)
    # per tile and stain, after = scale * before + shift: recover both from two pixels
    scale = (after[..., 0] - after[..., 1]) / (before[..., 0] - before[..., 1])
    shift = after[..., 0] - scale * before[..., 0]
    assert torch.allclose(after, scale[..., None] * before + shift[..., None], atol=2e-3)
    assert ((scale - 1).abs() <= sigma + 1e-3).all() and (shift.abs() <= sigma + 1e-3).all()
    assert (scale - 1).abs().max() > sigma / 4  # it did change the stains


def test_evaluation_of_patients_or_folds_not_in_the_table_is_refused(run_cli, tmp_path):
    unknown = tmp_path / "patients.txt"
    unknown.write_text("no-such-patient\n")
    for arguments, words in [(["--patients", unknown], "no tile of the table belongs to the 1 patient IDs asked for"),
                             (["--patients", tmp_path / "missing.txt"], "cannot read the patient list"),
                             (["--folds", "9"], "no tile of the table is in the folds asked for (9)")]:
        done = run_cli("evaluate", "--csv", TINY, *arguments, "--out", tmp_path / "eval")
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert words in done.stderr, done.stderr
    assert not (tmp_path / "eval").exists()


def test_cross_fitting_gives_the_fusion_every_kept_patient(run_cli, tmp_path):
    import json

    records = {}
    for name, extra in [("plain", []), ("cross", ["--cross-fit"])]:
        done = run_cli("train", "--data", TINY, "--out", tmp_path / name, "--epochs", "1", "--input-size", "32", *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        records[name] = json.loads((tmp_path / name / "training.json").read_text())
    plain, cross = records["plain"], records["cross"]
    assert plain["tiles_fit"] == {"heads": plain["tiles"]["heads"], "fusion": plain["tiles"]["fusion"]}
    both = plain["tiles"]["heads"] + plain["tiles"]["fusion"]
    assert cross["tiles_fit"] == {"heads": both, "fusion": both}
    first, second = state(tmp_path / "plain" / "model.pt"), state(tmp_path / "cross" / "model.pt")
    extractor = [k for k in first if not k.startswith(("heads.", "fusion."))]
    assert all(torch.equal(first[k], second[k]) for k in extractor)  # stage 1 is the same
    assert not torch.equal(first["fusion.0.weight"], second["fusion.0.weight"])


def test_a_checkpoint_from_before_the_field_of_view_resumes(tmp_path):
    # checkpoints written before version 1.2 lack the field_of_view_um buffer; resuming one (to
    # refit stages 2-3 on a finished stage 1) must read it as the IDC tile's 200 um, not fail
    out = tmp_path / "old"
    done = subprocess.run(train_command(out, epochs=1), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    del checkpoint["network"]["field_of_view_um"]
    torch.save(checkpoint, out / "checkpoint.pt")
    done = subprocess.run(train_command(out, epochs=1), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "resuming from" in done.stdout, done.stderr[-2000:]
    assert float(state(out / "model.pt")["field_of_view_um"]) == 200.0
