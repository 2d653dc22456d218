"""Bad inputs: exit 2, one clear line naming the input, no traceback, nothing written."""

import numpy as np
import pydicom
from PIL import Image

from conftest import write_series


def assert_refused(done, out_dir, *words):
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("dicom-heatmap: error:")]
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_truncated_dicom(run_cli, data_dir, tmp_path):
    broken = tmp_path / "truncated.dcm"
    raw = (data_dir / "CT_small.dcm").read_bytes()
    broken.write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "out"
    assert_refused(run_cli("analyze", broken, "--out", out), out, str(broken))


def test_text_file_named_dcm(run_cli, tmp_path):
    fake = tmp_path / "notes.dcm"
    fake.write_text("this is not DICOM\n" * 20)
    out = tmp_path / "out"
    assert_refused(run_cli("analyze", fake, "--out", out), out, str(fake), "not a DICOM file")


def test_empty_folder(run_cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert_refused(run_cli("analyze", empty, "--out", out), out, str(empty), "empty")


def test_image_smaller_than_one_tile(run_cli, tmp_path):
    small = tmp_path / "small.png"
    Image.fromarray(np.full((20, 20, 3), 120, dtype=np.uint8)).save(small)
    out = tmp_path / "out"
    assert_refused(run_cli("analyze", small, "--out", out, "--tile-size", "64"), out, str(small), "smaller than one tile")


def test_folder_with_two_series_needs_a_choice(run_cli, tmp_path):
    folder = tmp_path / "study"
    write_series(folder / "a", slices=2)
    write_series(folder / "b", slices=3)
    out = tmp_path / "out"
    done = run_cli("analyze", folder, "--out", out)
    assert_refused(done, out, str(folder), "2 image series", "--series")
    # naming one of them analyses it
    uid = str(pydicom.dcmread(next((folder / "b").iterdir())).SeriesInstanceUID)
    done = run_cli("analyze", folder, "--out", out, "--series", uid, "--quiet")
    assert done.returncode == 0, done.stderr


def test_missing_input_and_missing_model(run_cli, data_dir, tmp_path):
    out = tmp_path / "out"
    assert_refused(run_cli("analyze", tmp_path / "nowhere.dcm", "--out", out), out, "nowhere.dcm", "no such file")
    assert_refused(run_cli("analyze", data_dir / "CT_small.dcm", "--out", out, "--model", tmp_path / "none.pt"), out,
                   "none.pt", "model file does not exist")


def test_bad_input_does_not_stop_the_others(run_cli, data_dir, tmp_path):
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\x00" * 300)
    out = tmp_path / "out"
    done = run_cli("analyze", fake, data_dir / "MR_small.dcm", "--out", out, "--quiet")
    assert done.returncode == 2
    assert str(fake) in done.stderr
    assert len([p for p in out.iterdir() if p.is_dir()]) == 1
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_a_full_disk_is_one_line_and_leaves_nothing(data_dir, tmp_path):
    """Files may not grow past 64 kB (RLIMIT_FSIZE; the SC is larger), as on a full disk:
    one line with the system's reason, no traceback text from pydicom inside it, and no
    folder left behind."""
    import resource
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "analyze", str(data_dir / "CT_small.dcm"), "--out", str(out),
                           "--quiet", "--backend", "torch", "--precision", "fp32"], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=limited, timeout=300)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if "warning:" not in line]
    assert len(lines) == 1 and "cannot write the results (File too large)" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() or list(out.iterdir()) == []
