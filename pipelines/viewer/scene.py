"""What the viewer page shows of one result folder: the source as Deep Zoom pyramids (one
per slice) and the overlay - each analysed tile's outline, number, score and lesion, the
lesions' outlines and the spread arrow - in the pixels of the image shown.

- A slide file OpenSlide reads (SVS, TIFF, ...) is shown at its full-resolution level, and
  the tiles are ``heatmap.geojson``'s, which lie on those pixels whatever level was analysed.
- A DICOM whole-slide image or a PNG/JPEG picture is loaded as the analysis loaded it (the
  same file of a multi-level series) and shown whole; the GeoJSON lies on its pixels too.
- A CT or MR series is preprocessed as it was analysed (window, crop, zoom, rotation), so
  each slice shown is the one the grid was cut on and the tiles are ``result.json``'s boxes.
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openslide
import shapely
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image
from shapely.geometry import Polygon, box, mapping

from dicom_heatmap.api import AnalysisSettings, preprocessing
from dicom_heatmap.errors import ConfigurationError, InputError
from transforms.io.slide import SUFFIXES as SLIDE_SUFFIXES

__all__ = ["Scene", "open_scene", "TILE_SIDE"]

#: Side of the Deep Zoom tiles served (plus one pixel of overlap each side: 256 in all).
TILE_SIDE = 254


@dataclass
class Scene:
    """One result folder, ready to serve.

    Attributes:
        summary: the folder's ``result.json``.
        source: the source file or folder shown.
        pyramids: one Deep Zoom generator per slice.
        overlay: what the page draws over the image (see :func:`open_scene`).
    """

    summary: dict
    source: Path
    pyramids: list[DeepZoomGenerator]
    overlay: dict
    lock: threading.Lock = field(default_factory=threading.Lock)

    def dzi(self, slice_index: int) -> str:
        """The Deep Zoom descriptor of one slice."""
        return self.pyramids[slice_index].get_dzi("jpeg")

    def tile(self, slice_index: int, level: int, col: int, row: int) -> bytes:
        """One JPEG tile of a slice's pyramid; ValueError where there is none."""
        pyramid = self.pyramids[slice_index]
        if not 0 <= level < pyramid.level_count:
            raise ValueError(f"no level {level}")
        cols, rows = pyramid.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise ValueError(f"no tile {col}_{row} at level {level}")
        with self.lock:  # an in-memory picture is one PIL image: one reader at a time
            picture = pyramid.get_tile(level, (col, row))
        out = io.BytesIO()
        picture.convert("RGB").save(out, "JPEG", quality=90)
        return out.getvalue()


def open_scene(folder: str | Path, source: str | Path | None = None) -> Scene:
    """Read a result folder and its source into a :class:`Scene`.

    The overlay is a dict: ``slices``; ``size`` (width, height) of each slice in the pixels
    shown; ``tiles``, one per analysed tile (``number``, ``slice``, ``score``, ``lesion``
    (1 = dominant, or None), ``ring`` (corners x, y)); ``lesions``, one per lesion and
    slice (``number``, ``slice``, ``rings``: its outline); ``arrow`` (``slice``, ``from``,
    ``to``) where the spread is directed, else None; ``threshold``, ``warning``, ``title``
    and ``focus_slice``.

    Args:
        folder: a result folder (``<out>/<UID>/``, holding ``result.json``).
        source: the source image, where it is no longer at the path ``result.json`` names
            (moved, or given relative to another folder).

    Raises:
        InputError: no result folder, or its source cannot be found or read.
    """
    folder = Path(folder)
    summary = _read_summary(folder)
    source = _source_path(folder, summary, source)
    if summary["input"]["frame"] == "PATIENT":
        images, rings = _analysed_slices(source, summary), _boxes(summary)
    else:
        images, rings = [_whole_image(source, summary)], _geojson_rings(folder)
    pyramids = [DeepZoomGenerator(image, tile_size=TILE_SIDE, overlap=1, limit_bounds=False) for image in images]
    size = [list(p.level_dimensions[-1]) for p in pyramids]
    return Scene(summary, source, pyramids, _overlay(summary, rings, size))


def _read_summary(folder: Path) -> dict:
    path = folder / "result.json"
    if not folder.is_dir():
        raise InputError(folder, "no such result folder")
    try:
        summary = json.loads(path.read_text())
        for key in ("input", "tiles", "spread", "settings"):  # what the viewer reads
            summary[key]
    except FileNotFoundError:
        raise InputError(folder, "not a dicom-heatmap result folder (no result.json): give one of the folders "
                                 "`analyze --out DIR` wrote, DIR/<UID>/") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(path, "cannot read the result summary (damaged, or not written by dicom-heatmap)") from None
    return summary


def _source_path(folder: Path, summary: dict, given: str | Path | None) -> Path:
    """The source to show: the one given, else the one result.json names (as given to
    ``analyze``: relative paths are tried from here and from the result folder's parent)."""
    if given is not None:
        if not Path(given).exists():
            raise InputError(given, "no such file or folder")
        return Path(given)
    named = summary["input"].get("path")
    if not named:
        raise InputError(folder / "result.json", "names no input (written by an older version): give it with --source PATH")
    for candidate in (Path(named), folder.parent.parent / named, folder.parent / named):
        if candidate.exists():
            return candidate
    raise InputError(named, f"the source of {folder.name} is not there (moved?): give it with --source PATH")


def _whole_image(source: Path, summary: dict) -> openslide.AbstractSlide:
    """A slide's full-resolution level, or the image the analysis loaded, as OpenSlide's
    interface (which the Deep Zoom generator reads)."""
    if source.is_file() and source.suffix.lower() in SLIDE_SUFFIXES:
        try:
            return openslide.OpenSlide(str(source))
        except (openslide.OpenSlideError, OSError) as error:
            raise InputError(source, f"cannot open the slide ({type(error).__name__})") from None
    load = _preprocessing(summary).transforms[0]  # the loader, as the analysis configured it
    loaded = load({"image": source})["image"]
    return openslide.ImageSlide(Image.fromarray(np.asarray(loaded)[0]))


def _analysed_slices(source: Path, summary: dict) -> list[openslide.ImageSlide]:
    """Each slice of a CT/MR series as the analysis saw it (window, crop, zoom, rotation)."""
    image = np.asarray(_preprocessing(summary)({"image": source})["image"])
    return [openslide.ImageSlide(Image.fromarray(np.ascontiguousarray(plane))) for plane in image]


def _preprocessing(summary: dict):
    try:
        settings = AnalysisSettings(**summary["settings"])
    except (TypeError, ConfigurationError) as error:
        raise InputError("result.json", f"its settings are not this version's ({error})") from None
    return preprocessing(settings)


def _boxes(summary: dict) -> dict[int, list[list[float]]]:
    """Each tile's corners from its pixel box (CT/MR: the slice shown is the analysed one)."""
    rings = {}
    for tile in summary["tiles"]:
        top, left, bottom, right = tile["box"]
        rings[tile["number"]] = [[left, top], [right, top], [right, bottom], [left, bottom]]
    return rings


def _geojson_rings(folder: Path) -> dict[int, list[list[float]]]:
    """Each analysed tile's corners in full-resolution pixels, from ``heatmap.geojson``."""
    path = folder / "heatmap.geojson"
    try:
        features = json.loads(path.read_text())["features"]
    except FileNotFoundError:
        raise InputError(folder, "has no heatmap.geojson (analysed with --no-viewer-files?): analyse again "
                                 "without it to view the slide") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(path, "cannot read the tile outlines (damaged)") from None
    return {int(f["properties"]["measurements"]["tile number"]): f["geometry"]["coordinates"][0][:4]
            for f in features if f["properties"].get("objectType") == "tile"}


def _overlay(summary: dict, rings: dict[int, list[list[float]]], size: list[list[int]]) -> dict:
    tiles = [{"number": t["number"], "slice": t["slice"], "score": t["score"], "lesion": t.get("lesion"),
              "ring": [[round(float(x), 2), round(float(y), 2)] for x, y in rings[t["number"]]]}
             for t in summary["tiles"] if t["analysed"] and t["score"] is not None and t["number"] in rings]
    lesions = []
    for number in sorted({t["lesion"] for t in tiles if t["lesion"]}):
        for slice_index in sorted({t["slice"] for t in tiles if t["lesion"] == number}):
            outline = shapely.union_all([Polygon(t["ring"]) for t in tiles
                                         if t["lesion"] == number and t["slice"] == slice_index])
            lesions.append({"number": number, "slice": slice_index, "rings": _rings(outline)})
    spread = summary["spread"]
    by_number = {t["number"]: t for t in tiles}
    focus = by_number.get(spread.get("focus_tile"))
    arrow = None
    if spread.get("directed") and focus is not None:
        corners = np.array(focus["ring"])
        centre = corners.mean(axis=0)
        side = float(np.ptp(corners[:, 0]))
        _, down, right = spread["direction_image"]  # image axes: (slice, row, col)
        in_plane = np.array([right, down], dtype=float)
        if np.linalg.norm(in_plane) > 1e-6:
            tip = centre + 3 * side * in_plane / np.linalg.norm(in_plane)
            arrow = {"slice": focus["slice"], "from": centre.round(2).tolist(), "to": tip.round(2).tolist()}
    return {
        "slices": len(size), "size": size, "tiles": tiles, "lesions": lesions, "arrow": arrow,
        "threshold": summary["settings"]["threshold"], "warning": summary["input"].get("warning"),
        "words": spread.get("words"), "focus_slice": focus["slice"] if focus else 0,
        "title": f"{Path(str(summary['input'].get('path', ''))).name} - dicom-heatmap {summary['software']['version']}",
    }


def _rings(outline) -> list[list[list[float]]]:
    """Exterior and interior rings of a (multi)polygon, as lists of (x, y)."""
    geometry = mapping(outline if not outline.is_empty else box(0, 0, 0, 0))
    polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
    return [[list(point) for point in ring] for polygon in polygons for ring in polygon]
