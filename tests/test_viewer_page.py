"""`dicom-heatmap view`: the page in a real browser (the distribution's Chromium, headless).

The screenshot is read back: each analysed tile's colour on screen, where the tile is on
the source image, must be the colour of its score; on the demo mosaic, whose tumour layout
is known, the tiles drawn red are the tumour's. Every request the page makes is recorded:
none may leave 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, drawn_box, write_series
from dicom_heatmap.render import colorize

WINDOW = {"width": 1200, "height": 800}
BAR = 44  # the page's toolbar height (viewer.css)
#: Where OpenSeadragon's buttons (upper left, under the bar) and navigator (upper right) cover the image.
COVERED = [(0, BAR, 150, BAR + 40), (WINDOW["width"] - 260, BAR, WINDOW["width"], BAR + 170)]


@contextmanager
def _viewer(folder: Path, *extra: str):
    """``dicom-heatmap view FOLDER --no-browser`` in a child process; yields its URL."""
    child = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "view", str(folder), "--no-browser", *extra],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert match, (line, child.stderr.read() if child.poll() is not None else "")
        yield match[1]
    finally:
        child.terminate()
        child.wait(timeout=30)


def _browse(browser, url: str, hover=()) -> tuple[np.ndarray, str, list[str], list[str]]:
    """Load ``url`` and wait until the overlay is on the page and every tile is loaded;
    the screenshot, the page's HTML, every URL the page asked for and the tip shown with
    the pointer on each point of ``hover``."""
    page = browser.new_page(viewport=WINDOW)
    asked = []
    page.on("request", lambda request: asked.append(request.url))
    try:
        page.goto(url)
        page.wait_for_selector("body[data-ready=yes]", timeout=60_000)
        page.wait_for_load_state("networkidle")
        shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
        tips = []
        for x, y in hover:
            page.mouse.move(x, y)
            page.wait_for_timeout(100)
            tips.append(page.text_content("#tip") if page.is_visible("#tip") else "")
        return shot, page.content(), asked, tips
    finally:
        page.close()


def _image_on_screen(shot: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the image the viewer draws below the toolbar, on the
    page's background (#111)."""
    return drawn_box(np.any(np.abs(shot.astype(int) - 17) > 12, axis=-1), top=BAR)


def _screen_scores(shot, screen_box, image_size, tiles) -> dict[int, float]:
    """The score each tile's colour on screen stands for (nearest colour of the ramp), read
    a quarter into the tile (clear of the lesion outline and the arrow)."""
    left, top, right, bottom = screen_box
    scale = ((right - left) / image_size[0] + (bottom - top) / image_size[1]) / 2
    ramp = colorize(np.linspace(0, 1, 201)).astype(int)
    found = {}
    for tile in tiles:
        y0, x0, y1, x1 = tile["box"]
        x, y = left + (x0 + 0.25 * (x1 - x0)) * scale, top + (y0 + 0.25 * (y1 - y0)) * scale
        if any(a <= x < c and b <= y < d for a, b, c, d in COVERED):
            continue
        colour = shot[int(round(y)), int(round(x))].astype(int)
        found[tile["number"]] = float(np.linspace(0, 1, 201)[np.argmin(np.abs(ramp - colour).sum(axis=1))])
    return found


def _only_here(asked: list[str], url: str) -> None:
    elsewhere = [u for u in asked if not u.startswith(url)]
    assert asked and elsewhere == [], f"the page reached beyond 127.0.0.1: {elsewhere[:5]}"


def test_the_page_draws_each_tile_where_it_lies_on_the_slide(browser, scorer, data_dir, tmp_path):
    from dicom_heatmap import analyze

    folder = analyze(data_dir / "idc_mosaic_tail.png", scorer, grid=(8, 12), pixel_size_um=4,
                     progress=False).save(tmp_path / "out")
    summary = json.loads((folder / "result.json").read_text())
    width, height = 600, 400
    analysed = [t for t in summary["tiles"] if t["analysed"]]
    with _viewer(folder) as url:
        shot, _, asked, _ = _browse(browser, url + "?opacity=1")
        screen_box = _image_on_screen(shot)
        # the pointer on a tile names it and its score (the same layout: the same window)
        left, top, right, _ = screen_box
        scale = (right - left) / width
        probes = [t for t in analysed if t["number"] in (41, 53, 66)]
        points = [(left + (t["box"][1] + t["box"][3]) / 2 * scale, top + (t["box"][0] + t["box"][2]) / 2 * scale)
                  for t in probes]
        _, _, _, tips = _browse(browser, url, hover=points)
        if os.environ.get("VIEWER_SCREENSHOT"):  # the README's picture: VIEWER_SCREENSHOT=docs/viewer.jpg
            picture, _, _, _ = _browse(browser, url)
            Image.fromarray(picture).save(ROOT / os.environ["VIEWER_SCREENSHOT"], quality=85)
    _only_here(asked, url)
    assert any("/dzi/0_files/" in u for u in asked) and any(u.endswith("openseadragon.min.js") for u in asked)
    for tile, tip in zip(probes, tips):
        assert tip.startswith(f"tile {tile['number']}: score {tile['score']:.3f}"), (tile["number"], tip)
    assert abs((screen_box[2] - screen_box[0]) / (screen_box[3] - screen_box[1]) - width / height) < 0.02, screen_box
    found = _screen_scores(shot, screen_box, (width, height), analysed)
    errors = [abs(found[t["number"]] - t["score"]) for t in analysed if t["number"] in found]
    assert len(errors) > 0.8 * len(analysed)
    assert np.median(errors) < 0.03 and np.mean(np.array(errors) < 0.1) > 0.95, sorted(errors)[-5:]
    # the tumour is where the page draws high scores
    layout = np.array(json.loads((data_dir / "idc_mosaic_tail.json").read_text())["layout"])
    tumour = [found[t["number"]] for t in analysed if t["number"] in found and layout[t["row"], t["col"]]]
    other = [found[t["number"]] for t in analysed if t["number"] in found and not layout[t["row"], t["col"]]]
    pairs = np.array([[a > b for b in other] for a in tumour])
    assert pairs.mean() > 0.9, pairs.mean()


def test_the_page_steps_through_a_ct_series(browser, scorer, tmp_path):
    from dicom_heatmap import analyze

    write_series(tmp_path / "ct", slices=4, spacing=3.0)
    result = analyze(tmp_path / "ct", scorer, grid=(6, 6), threshold=0.05, progress=False)
    folder = result.save(tmp_path / "out")
    summary = json.loads((folder / "result.json").read_text())
    focus_slice = summary["spread"]["focus_index"][0]
    shown = {}
    with _viewer(folder) as url:
        for slice_number in (focus_slice + 1, 1 if focus_slice else 2):
            shown[slice_number] = _browse(browser, url + f"?opacity=1&slice={slice_number}")[:3]
        _, opened, _, _ = _browse(browser, url)
    assert re.search(r'<span id="slices">', opened), "the slice stepper is shown for a series"
    assert f"{focus_slice + 1} / 4" in opened  # it opens on the focus slice
    for slice_number, (shot, _, asked) in shown.items():
        _only_here(asked, url)
        tiles = [t for t in summary["tiles"] if t["analysed"] and t["slice"] == slice_number - 1]
        found = _screen_scores(shot, _image_on_screen(shot), tuple(result.image.shape[2:0:-1]), tiles)
        errors = [abs(found[t["number"]] - t["score"]) for t in tiles if t["number"] in found]
        assert len(errors) >= 3 and np.median(errors) < 0.03, (slice_number, errors)


@pytest.mark.parametrize("case", ["no result.json", "source moved", "no such folder"])
def test_view_refuses_what_it_cannot_show_in_one_line(case, run_cli, scorer, data_dir, tmp_path):
    if case == "no result.json":
        target = tmp_path
    elif case == "no such folder":
        target = tmp_path / "nothing"
    else:
        picture = tmp_path / "moved.png"
        shutil.copy(data_dir / "idc_mosaic_tail.png", picture)
        from dicom_heatmap import analyze

        target = analyze(picture, scorer, progress=False).save(tmp_path / "out")
        picture.unlink()
    done = run_cli("view", target, "--no-browser", timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("dicom-heatmap: error: ")
    assert {"no result.json": "not a dicom-heatmap result folder", "no such folder": "no such result folder",
            "source moved": "is not there (moved?): give it with --source PATH"}[case] in done.stderr


def test_the_page_names_no_other_host():
    """Nothing the page is made of points elsewhere: no absolute URL in the page, its
    script or its style (OpenSeadragon is served from here too)."""
    for name in ("index.html", "viewer.js", "viewer.css"):
        text = (ROOT / "pipelines" / "viewer" / "page" / name).read_text()
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, flags=re.I), name


def test_the_server_answers_its_own_address_only(scorer, data_dir, tmp_path):
    import urllib.request

    from dicom_heatmap import analyze

    folder = analyze(data_dir / "CT_small.dcm", scorer, progress=False).save(tmp_path / "out")
    with _viewer(folder) as url:
        page = urllib.request.urlopen(url, timeout=10)
        assert "default-src 'self'" in page.headers["Content-Security-Policy"]
        forged = urllib.request.Request(url + "scene.json", headers={"Host": "attacker.example:80"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(forged, timeout=10)
        assert refused.value.code == 403
        for path in ("osd/../../../../etc/passwd", "dzi/9.dzi", "dzi/0_files/99/0_0.jpeg", "result.json"):
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(url + path, timeout=10)
            assert missing.value.code == 404, path
