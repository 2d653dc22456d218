"""Shared fixtures: the sample data, the shipped model, a CLI runner and dciodvfy."""

from __future__ import annotations

import copy
import csv
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session", autouse=True)
def converted_network_cache(tmp_path_factory) -> Path:
    """The tests keep converted networks in a folder of their own (children inherit it)."""
    import os

    folder = tmp_path_factory.mktemp("cache")
    os.environ["DICOM_HEATMAP_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def scorer():
    from dicom_heatmap import TileScorer

    return TileScorer.load()


@pytest.fixture
def run_cli():
    """Run ``dicom-heatmap`` in a child process, as a user would."""

    def run(*args: str, timeout: float = 300) -> CliRun:
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        return CliRun(done.returncode, done.stdout, done.stderr)

    return run


@pytest.fixture(scope="session")
def dciodvfy():
    """Errors dciodvfy reports for a file (an empty list means valid)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy (Debian dicom3tools) is not installed; `make test` installs it")

    def errors(path: Path) -> list[str]:
        done = subprocess.run([tool, str(path)], capture_output=True, text=True, errors="replace")
        return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]

    return errors


def write_series(folder: Path, slices: int = 4, spacing: float = 2.5, series_uid: str | None = None,
                 reverse_files: bool = True, photometric: str = "MONOCHROME2", study_uid: str | None = None) -> list[Path]:
    """Write a CT series built from pydicom's CT_small: real pixels, new positions and UIDs.

    Files are written in reverse order of position so a loader must sort them.
    """
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(DATA / "CT_small.dcm")
    series_uid = series_uid or generate_uid()
    paths = []
    order = list(range(slices))[::-1] if reverse_files else list(range(slices))
    for index in order:
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID = series_uid
        if study_uid:
            ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = index + 1
        position = np.array(template.ImagePositionPatient, dtype=float) + [0, 0, index * spacing]
        ds.ImagePositionPatient = [f"{v:.3f}" for v in position]
        ds.PhotometricInterpretation = photometric
        path = folder / f"file{len(paths):03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


#: The IDC patient whose rebuilt slide is in tests/data (idc_slide_14082.jpg and .csv)
SLIDE_PATIENT = "14082"


@pytest.fixture(scope="session")
def slide_table(tmp_path_factory, data_dir):
    """The slide cut back into its 50 px tiles, with a labels table as the IDC set has it."""
    folder = tmp_path_factory.mktemp("idc")
    picture = np.asarray(Image.open(data_dir / f"idc_slide_{SLIDE_PATIENT}.jpg"))
    with (data_dir / f"idc_slide_{SLIDE_PATIENT}.csv").open(newline="") as handle:
        tiles = list(csv.DictReader(handle))
    rows = []
    for tile in tiles:
        x, y, label = int(tile["x"]), int(tile["y"]), int(tile["label"])
        path = f"images/{SLIDE_PATIENT}/{label}/{SLIDE_PATIENT}_idx5_x{x}_y{y}_class{label}.png"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture[y - 1 : y + 49, x - 1 : x + 49]).save(folder / path)
        rows.append({"path": path, "patient_id": SLIDE_PATIENT, "x": x, "y": y, "label": label, "width": 50, "height": 50, "fold": 2})
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "labels.csv"


@pytest.fixture(scope="module")
def browser():
    """The distribution's Chromium, headless, driven by Playwright (which downloads no browser
    of its own); one per test module, so no event loop of Playwright's outlives its tests."""
    from playwright.sync_api import sync_playwright

    tool = shutil.which("chromium")
    if tool is None:
        pytest.fail("Chromium is not installed; `make test` installs it (Debian package chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=tool, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


def drawn_box(drawn: np.ndarray, top: int = 0) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the rectangle a viewer draws, from the mask of what
    differs from its background: where lines through the middle of the view below ``top``
    (a toolbar) enter and leave it. The lines cross no overview or navigator in a corner."""
    middle_row, middle_col = (top + drawn.shape[0]) // 2, drawn.shape[1] // 2
    cols = np.flatnonzero(drawn[middle_row])
    rows = np.flatnonzero(drawn[top + 1 :, middle_col]) + top + 1
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1
