"""The slide SEG in the IDC's slide viewer library (dicom-microscopy-viewer, the library of
the Slim viewer), read through Orthanc's DICOMweb as a PACS-side viewer would read it.

Orthanc serves the library and a small page (``tests/slide_viewer/``) beside its DICOMweb
(same origin); headless Chromium opens the slide with the SEG series over it. The SEG's
lesion pixels, as highdicom reads them, must be where the viewer paints the segment.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import ROOT, drawn_box
from dicom_heatmap import analyze
from orthanc import Orthanc, free_port
from transforms.io.load import LoadInput

LIBRARY = Path(sys.prefix) / "share" / "dicom-heatmap-test" / "node_modules"
SERVE_FOLDERS = Path("/usr/share/orthanc/plugins/libServeFolders.so")
VIEWPORT = {"width": 1400, "height": 900}
#: How a viewer may turn a matrix whose width stays its width.
TURNS = {"as is": lambda a: a, "half turn": lambda a: a[::-1, ::-1], "mirrored": lambda a: a[:, ::-1],
         "upside down": lambda a: a[::-1]}


def _conformant_slide(data_dir: Path, path: Path) -> pydicom.Dataset:
    """The embedded slide with what the VL Whole Slide Microscopy IOD asks and the sample
    lacks: a valid Frame of Reference UID, where the matrix lies on the glass, an optical path."""
    slide = pydicom.dcmread(data_dir / "wsi_lymph_node.dcm")
    slide.FrameOfReferenceUID = pydicom.uid.generate_uid()
    origin = pydicom.Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.5, 41.25
    slide.TotalPixelMatrixOriginSequence = [origin]
    illumination, colour, optical_path = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    illumination.CodeValue, illumination.CodingSchemeDesignator, illumination.CodeMeaning = "111744", "DCM", "Brightfield illumination"
    colour.CodeValue, colour.CodingSchemeDesignator, colour.CodeMeaning = "414298005", "SCT", "Full Spectrum"
    optical_path.OpticalPathIdentifier = "1"
    optical_path.IlluminationTypeCodeSequence, optical_path.IlluminationColorCodeSequence = [illumination], [colour]
    slide.OpticalPathSequence, slide.NumberOfOpticalPaths = [optical_path], 1
    slide.save_as(path)
    return slide


def test_the_slide_seg_shows_over_the_slide_in_dicom_microscopy_viewer(browser, scorer, data_dir, tmp_path):
    bundle = LIBRARY / "dicom-microscopy-viewer" / "dist"
    if not (bundle / "dicomMicroscopyViewer.bundle.min.js").exists() or not SERVE_FOLDERS.exists():
        pytest.fail("dicom-microscopy-viewer or Orthanc's ServeFolders plugin is missing; `make test` installs both")
    slide = _conformant_slide(data_dir, tmp_path / "wsi.dcm")
    result = analyze(tmp_path / "wsi.dcm", scorer, grid=(5, 8), threshold=0.3, progress=False)
    folder = result.save(tmp_path / "out")
    seg = pydicom.dcmread(folder / "seg.dcm")

    site = tmp_path / "site"
    shutil.copytree(ROOT / "tests" / "slide_viewer", site)
    for name in ("dicomMicroscopyViewer.bundle.min.js", *(p.name for p in bundle.glob("*.wasm"))):
        shutil.copy(bundle / name, site)
    shutil.copy(LIBRARY / "dicomweb-client" / "build" / "dicomweb-client.js", site)
    server = Orthanc(tmp_path / "orthanc", "HEATMAP", free_port())
    config_path = tmp_path / "orthanc" / "orthanc.json"
    config = json.loads(config_path.read_text())
    config["Plugins"].append(str(SERVE_FOLDERS))
    # the bundle loads its frame decoder worker from /static/js/
    config["ServeFolders"] = {"Folders": {"/viewer": str(site), "/static/js": str(bundle / "dynamic-import")},
                              "Extensions": {".wasm": "application/wasm"}, "AllowCache": False}
    config_path.write_text(json.dumps(config))
    server.start()
    try:
        server.upload(tmp_path / "wsi.dcm", folder / "seg.dcm")
        context = browser.new_context(viewport=VIEWPORT, http_credentials={"username": server.USER,
                                                                            "password": server.password})
        page = context.new_page()
        asked = []
        page.on("request", lambda request: asked.append(request.url))
        shots = {}
        for kind, extra in (("slide", ""), ("seg", f"&seg={seg.SeriesInstanceUID}")):
            page.goto(f"{server.url}/viewer/index.html?study={slide.StudyInstanceUID}&slide={slide.SeriesInstanceUID}{extra}")
            page.wait_for_function("document.body.dataset.ready || document.body.dataset.error", timeout=60_000)
            assert page.evaluate("document.body.dataset.error || ''") == "", kind
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(1000)
            shots[kind] = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
        assert page.evaluate("document.body.dataset.shown") == str(len(result.spread.lesions))
        context.close()
    finally:
        server.stop(kill=True)
    assert all(u.startswith(server.url) for u in asked), "the viewer page reached beyond the test Orthanc"

    # where the segments are painted: each view brought back to the slide's own pixels, then
    # the pixels that changed from the plain slide
    size = (int(slide.TotalPixelMatrixColumns), int(slide.TotalPixelMatrixRows))
    on_slide = {}
    for kind, shot in shots.items():
        left, top, right, bottom = drawn_box(shot.max(axis=-1) > 40)  # the slide on the viewer's black
        assert abs((right - left) / (bottom - top) - size[0] / size[1]) < 0.02, (kind, left, top, right, bottom)
        on_slide[kind] = np.asarray(Image.fromarray(shot[top:bottom, left:right]).resize(size, Image.BILINEAR)).astype(int)
    # the viewer shows slide coordinates: with this slide's Image Orientation (Slide) the
    # matrix appears turned (found, not assumed: the turn that makes the plain view the matrix)
    matrix = np.asarray(LoadInput()(tmp_path / "wsi.dcm")[0])[0].astype(int)
    differences = {name: np.abs(turn(matrix) - on_slide["slide"]).mean() for name, turn in TURNS.items()}
    shown_as = min(differences, key=differences.get)
    assert differences[shown_as] < 5 < sorted(differences.values())[1], differences
    turn = TURNS[shown_as]
    painted = np.abs(on_slide["seg"] - on_slide["slide"]).sum(axis=-1) > 90
    expected = turn(hd.seg.segread(folder / "seg.dcm").get_total_pixel_matrix().any(axis=-1))
    overlap = (painted & expected).sum() / (painted | expected).sum()
    assert expected.mean() > 0.05 and overlap > 0.85, overlap
