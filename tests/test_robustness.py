"""Untrusted input: a fuzz corpus from real files, property tests, no patient data in logs, kill safety."""

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from conftest import ROOT, write_series
from dicom_heatmap.heatmap import Heatmap
from transforms.grid import SplitTileGrid
from transforms.io.common import pixel_affine

MEMORY_CEILING_KB = 3 * 1024 * 1024  # 3 GiB for the whole corpus in one process
OUTPUT_FILES = {"pm.dcm", "sr.dcm", "preview.png", "result.json"}


def _pixel_offset(raw: bytes) -> int:
    """Where the pixel data element starts (or the middle, when it cannot be found)."""
    index = raw.rfind(b"\xe0\x7f\x10\x00")
    return index if index > 0 else len(raw) // 2


def _save(ds, path: Path) -> Path:
    with pydicom.config.disable_value_validation():
        ds.save_as(path, enforce_file_format=False)
    return path


def build_corpus(folder: Path, data_dir: Path) -> list[Path]:
    """At least 300 broken (and some intact) inputs made from real files; deterministic."""
    rng = random.Random(20261125)
    folder.mkdir(parents=True, exist_ok=True)
    dicom_sources = {
        "ct": data_dir / "CT_small.dcm",
        "mr": data_dir / "MR_small.dcm",
        "wsi": data_dir / "wsi_lymph_node.dcm",
        "rle": Path(get_testdata_file("MR_small_RLE.dcm")),
        "j2k": Path(get_testdata_file("MR_small_jp2klossless.dcm")),
        "rgb": Path(get_testdata_file("SC_rgb_jpeg_gdcm.dcm")),
    }
    cases: list[Path] = []

    def write(name: str, data: bytes) -> None:
        path = folder / name
        path.write_bytes(data)
        cases.append(path)

    for key, source in dicom_sources.items():
        raw = source.read_bytes()
        pixels = _pixel_offset(raw)
        for i in range(15):  # truncated at random offsets
            write(f"{key}_truncated_{i}.dcm", raw[: rng.randrange(1, len(raw))])
        for region, (low, high) in {"header": (132, pixels), "pixels": (pixels, len(raw))}.items():
            for i in range(12):  # flipped bytes
                mutated = bytearray(raw)
                for _ in range(rng.randint(1, 8)):
                    position = rng.randrange(low, max(low + 1, high))
                    mutated[position] ^= 1 << rng.randrange(8)
                write(f"{key}_flip_{region}_{i}.dcm", bytes(mutated))
    for key in ("ct", "mr", "wsi"):
        original = pydicom.dcmread(dicom_sources[key])
        edits = {
            "no_rows": lambda ds: delattr(ds, "Rows"),
            "no_columns": lambda ds: delattr(ds, "Columns"),
            "no_pixels": lambda ds: delattr(ds, "PixelData"),
            "short_pixels": lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 3]),
            "long_pixels": lambda ds: setattr(ds, "PixelData", ds.PixelData + ds.PixelData[:1000]),
            "unknown_syntax": lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.3.4.5.6"),
            "huge": lambda ds: (setattr(ds, "Rows", 65535), setattr(ds, "Columns", 65535), setattr(ds, "NumberOfFrames", 1000),
                                setattr(ds, "TotalPixelMatrixRows", 100000), setattr(ds, "TotalPixelMatrixColumns", 100000)),
        }
        if key != "wsi":
            edits.update({
                "nan_spacing": lambda ds: setattr(ds, "PixelSpacing", ["nan", "nan"]),
                "zero_spacing": lambda ds: setattr(ds, "PixelSpacing", [0, 0]),
                "negative_spacing": lambda ds: setattr(ds, "PixelSpacing", [-1, 1]),
                "bad_orientation": lambda ds: setattr(ds, "ImageOrientationPatient", [1, 1, 0, 0, 0, 0]),
            })
        for name, edit in edits.items():
            ds = copy.deepcopy(original)
            edit(ds)
            cases.append(_save(ds, folder / f"{key}_{name}.dcm"))
    for key in ("ct", "mr"):  # wrong VRs and unreadable values, patched into the explicit-VR bytes
        raw = dicom_sources[key].read_bytes()
        rows = raw.find(b"\x28\x00\x10\x00US")
        write(f"{key}_rows_as_text.dcm", raw[:rows + 4] + b"SH" + raw[rows + 6:])
        spacing = raw.find(b"\x28\x00\x30\x00DS")
        length = int.from_bytes(raw[spacing + 6 : spacing + 8], "little")
        write(f"{key}_spacing_words.dcm", raw[: spacing + 8] + (b"abc\\def" + b" " * length)[:length] + raw[spacing + 8 + length :])
    for name, data in {
        "random.dcm": bytes(rng.randrange(256) for _ in range(4096)),
        "text.dcm": b"Patient report\n" * 50,
        "empty.dcm": b"",
        "preamble_only.dcm": b"\x00" * 128 + b"DICM",
        "png_named.dcm": (data_dir / "idc_mosaic_tail.png").read_bytes()[:5000],
    }.items():
        write(name, data)
    for source, suffix, count in ((data_dir / "idc_mosaic_tail.png", ".png", 12), (data_dir / "cmu_small_region.svs", ".svs", 10)):
        raw = source.read_bytes()
        for i in range(count):
            write(f"truncated_{i}{suffix}", raw[: rng.randrange(1, len(raw))])
        write(f"flipped{suffix}", bytes(b ^ 0xFF if j % 997 == 0 else b for j, b in enumerate(raw)))
    for suffix in (".tif", ".jpg"):
        write(f"not_an_image{suffix}", b"definitely not an image" * 10)
    # series folders: duplicated positions, uneven spacing, a slice of another size
    series = folder / "series_duplicates"
    paths = write_series(series, slices=3)
    ds = pydicom.dcmread(paths[0])
    ds.ImagePositionPatient = pydicom.dcmread(paths[1]).ImagePositionPatient
    ds.save_as(paths[0])
    cases.append(series)
    series = folder / "series_uneven"
    paths = write_series(series, slices=4, spacing=2.0)
    ds = pydicom.dcmread(paths[0])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.7
    ds.save_as(paths[0])
    cases.append(series)
    series = folder / "series_mixed_size"
    paths = write_series(series, slices=3)
    ds = pydicom.dcmread(paths[0])
    ds.Rows, ds.Columns, ds.PixelData = 64, 64, ds.PixelData[: 64 * 64 * 2]
    ds.save_as(paths[0])
    cases.append(series)
    # intact inputs too: the harness must see exit 0 with valid outputs
    for source in (data_dir / "CT_small.dcm", data_dir / "MR_small.dcm", data_dir / "idc_mosaic_tail.png"):
        write("intact_" + source.name, source.read_bytes())
    return cases


def test_fuzz_corpus(tmp_path, data_dir, dciodvfy):
    cases = build_corpus(tmp_path / "corpus", data_dir)
    assert len(cases) >= 300
    jobs = [{"input": str(path), "out": str(tmp_path / "out" / f"{i:04d}")} for i, path in enumerate(cases)]
    (tmp_path / "cases.json").write_text(json.dumps(jobs))
    subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz_runner.py"), str(tmp_path / "cases.json"), str(tmp_path / "results.json")],
                   cwd=ROOT, check=True, timeout=1200)
    results = json.loads((tmp_path / "results.json").read_text())
    problems, passed = [], 0
    for job, result in zip(jobs, results):
        name = Path(job["input"]).name
        out = Path(job["out"])
        entries = list(out.iterdir()) if out.exists() else []
        if result["code"] not in (0, 2):
            problems.append(f"{name}: exit {result['code']}")
        if "Traceback" in result["stderr"]:
            problems.append(f"{name}: traceback")
        if result["code"] == 2:
            lines = [line for line in result["stderr"].splitlines() if line.startswith("dicom-heatmap: error:")]
            if len(lines) != 1 or name not in lines[0]:
                problems.append(f"{name}: error line {lines}")
            elif "unexpected failure" in lines[0]:  # the catch-all: the failure escaped the typed errors
                problems.append(f"{name}: untyped {lines[0]}")
            if entries:
                problems.append(f"{name}: left {[e.name for e in entries]}")
        if result["code"] == 0:
            passed += 1
            if len(entries) != 1 or not OUTPUT_FILES <= {p.name for p in entries[0].iterdir()}:
                problems.append(f"{name}: incomplete outputs {entries}")
            else:
                for path in entries[0].glob("*.dcm"):
                    if dciodvfy(path):
                        problems.append(f"{name}: {path.name} fails dciodvfy")
    assert problems == [], "\n".join(problems)
    assert passed >= 3  # the intact inputs at least
    assert max(r["maxrss_kb"] for r in results) < MEMORY_CEILING_KB


def test_huge_declared_size_is_refused_before_decoding(run_cli, data_dir, tmp_path):
    ds = pydicom.dcmread(data_dir / "CT_small.dcm")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000
    path = _save(ds, tmp_path / "bomb.dcm")
    done = run_cli("analyze", path, "--out", tmp_path / "out")
    assert done.returncode == 2 and "more than the limit" in done.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@settings(max_examples=60, deadline=None)
@given(height=st.integers(8, 300), width=st.integers(8, 300), rows=st.integers(1, 40), cols=st.integers(1, 40),
       slices=st.integers(1, 3))
def test_any_grid_tiles_any_image_exactly_once(height, width, rows, cols, slices):
    rows, cols = min(rows, height // 8), min(cols, width // 8)
    image = np.zeros((slices, height, width, 3), dtype=np.uint8)
    meta = {"tissue_rule": "stain", "affine": pixel_affine(), "frame": "IMAGE", "source_path": "p"}
    grid = SplitTileGrid(grid=(rows, cols), tissue_threshold=0)(image, meta)
    coverage = np.zeros((slices, height, width), dtype=np.int32)
    for number in range(1, grid.count + 1):
        s, r, c = (int(v) for v in grid.position(number))
        assert int(grid.number(s, r, c)) == number
        top, left, bottom, right = grid.box(number)
        coverage[s, top:bottom, left:right] += 1
    assert np.all(coverage == 1)
    values = np.arange(1, grid.count + 1, dtype=np.float32)
    heat = Heatmap.assemble(grid, values.astype(int), values, np.zeros((grid.count, 13)), pixel_affine(), "IMAGE", (height, width))
    np.testing.assert_array_equal(heat.scores.ravel(), values)


MARKERS = {"PatientName": "MARKERNAME^QX", "PatientID": "MARKERID77", "PatientBirthDate": "19011231",
           "OtherPatientIDs": "MARKEROTHER", "PatientAddress": "MARKERSTREET", "InstitutionName": "MARKERHOSPITAL"}


def test_no_patient_data_in_logs_errors_or_file_names(run_cli, data_dir, tmp_path):
    ds = pydicom.dcmread(data_dir / "CT_small.dcm")
    for keyword, value in MARKERS.items():
        setattr(ds, keyword, value)
    ds.SeriesDescription = "../../etc/MARKERSERIES/\x00x"
    good = _save(ds, tmp_path / "inputs" / "good.dcm") if (tmp_path / "inputs").mkdir() is None else None
    broken = copy.deepcopy(ds)
    broken.PixelData = broken.PixelData[:100]
    bad = _save(broken, tmp_path / "inputs" / "bad.dcm")
    odd = copy.deepcopy(ds)
    odd.ImageOrientationPatient = [1, 1, 0, 0, 0, 0]
    weird = _save(odd, tmp_path / "inputs" / "weird.dcm")
    out = tmp_path / "out"
    done = run_cli("analyze", good, bad, weird, "--out", out)
    assert done.returncode == 2
    text = done.stdout + done.stderr
    names = " ".join(str(p.relative_to(out)) for p in out.rglob("*"))
    for marker in [*MARKERS.values(), "MARKERSERIES"]:
        assert marker not in text, marker
        assert marker not in names, marker
    assert len([p for p in out.iterdir() if p.is_dir()]) == 1  # the good one, in a folder named by UID
    assert all(p.name.startswith("2.25.") for p in out.iterdir())


def test_killed_runs_leave_complete_sets_only(data_dir, tmp_path):
    inputs = [data_dir / "MR_small.dcm", data_dir / "CT_small.dcm", data_dir / "idc_mosaic_tail.png", data_dir / "wsi_lymph_node.dcm"]
    out = tmp_path / "out"
    rng = random.Random(3)
    checked = 0
    for attempt in range(6):
        process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "analyze", *map(str, inputs), "--out", str(out), "--quiet"],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # later kills while none has yet met a result folder: a slow or busy machine writes its first later
        time.sleep(rng.uniform(2.5, 6.0) + (0.0 if checked else 1.5 * attempt))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        for folder in out.iterdir() if out.exists() else []:
            if folder.name.startswith("."):
                continue  # a killed run's staging folder: never a result
            names = {p.name for p in folder.iterdir()}
            assert OUTPUT_FILES <= names and any(n.startswith("sc-") for n in names), (attempt, folder.name, names)
            checked += 1
    assert checked, "no result folder existed at any kill: the kills came too early to test anything"
    # a run to the end completes every input and clears what killed runs left behind
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "analyze", *map(str, inputs), "--out", str(out), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert len(list(out.iterdir())) == len(inputs)


def test_a_replaced_result_is_swapped_whole_and_leftovers_are_cleared(run_cli, data_dir, tmp_path):
    """A rerun replaces a result folder in one atomic exchange; a killed replace (old result
    moved aside, new one not yet in place) is put back by the next run; stale leftovers of
    dead processes, and version 1.0's .replaced-* folders, are removed."""
    out = tmp_path / "out"
    first = run_cli("analyze", data_dir / "CT_small.dcm", "--out", out, "--quiet")
    assert first.returncode == 0, first.stderr
    (result,) = [p for p in out.iterdir()]
    dead = 2 ** 22 + 12345  # above the kernel's pid_max: no such process
    os.replace(result, out / f".replaced-{dead}-{result.name}")  # killed between the two moves
    (out / ".replaced-abc123" / "old").mkdir(parents=True)  # a 1.0 leftover
    (out / f".partial-{dead}-xyz").mkdir()
    second = run_cli("analyze", data_dir / "MR_small.dcm", "--out", out, "--quiet")  # any run clears the folder
    assert second.returncode == 0, second.stderr
    assert result.is_dir() and (result / "sr.dcm").is_file()  # the moved-aside result is back
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    before = (result / "sr.dcm").stat().st_ino
    third = run_cli("analyze", data_dir / "CT_small.dcm", "--out", out, "--quiet")
    assert third.returncode == 0 and (result / "sr.dcm").stat().st_ino != before  # replaced, same name
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
