"""Training: a fixed seed gives the same model; a killed run resumes to the same model; class-balanced sampling."""

import os
import signal
import subprocess
import sys
import time

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

    from pipelines.train import epoch_order

    labels = np.array([1] * 270 + [0] * 730)  # the IDC tiles' share of tumour
    generator = torch.Generator().manual_seed(0)
    plain = epoch_order(labels, False, generator)
    assert sorted(plain.tolist()) == list(range(len(labels)))  # every tile once
    drawn = torch.cat([epoch_order(labels, True, generator) for _ in range(20)]).numpy()
    assert len(drawn) == 20 * len(labels)
    assert abs(labels[drawn].mean() - 0.5) < 0.02
