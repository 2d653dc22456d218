"""The heatmap as GeoJSON objects on the slide, as QuPath imports them (File > Import objects).

One ``tile`` object per analysed tile - its polygon in the full-resolution level's pixel
coordinates (corner-based: pixel (0, 0) covers [0, 1) x [0, 1)), its number, score, tissue
share and 13 layer probabilities as measurements, classified ``Tumor`` at or above the
threshold - and one ``annotation`` per lesion, the outline of its tiles, dominant first.
"""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry import Polygon, mapping

from dicom_heatmap.heatmap import Heatmap

__all__ = ["build_feature_collection"]

_TUMOUR = {"name": "Tumor", "color": [200, 0, 0]}  # QuPath's own class name and colour
_OTHER = {"name": "Stroma", "color": [150, 200, 150]}


def _tile_corners(heatmap: Heatmap, pixel_affine: np.ndarray, level0: tuple[float, float], row: int, col: int) -> list:
    """The tile's four corners (x, y) in level-0 pixel coordinates, clockwise from top left."""
    grid = heatmap.grid
    top, bottom = grid.row_edges[row] - 0.5, grid.row_edges[row + 1] - 0.5  # pixel edges, centres at integers
    left, right = grid.col_edges[col] - 0.5, grid.col_edges[col + 1] - 0.5
    index = np.array([[0, top, left, 1], [0, top, right, 1], [0, bottom, right, 1], [0, bottom, left, 1]], dtype=float)
    frame = (pixel_affine @ index.T).T[:, :2]  # slide or picture axes: x right, y down
    scale, offset = level0
    return [(round(float(x), 3), round(float(y), 3)) for x, y in frame * scale + offset]


def build_feature_collection(heatmap: Heatmap, lesions: list[np.ndarray], pixel_affine: np.ndarray,
                             level0: tuple[float, float], threshold: float) -> dict:
    """The tiles and lesion outlines of a 2D heatmap as a GeoJSON FeatureCollection.

    Args:
        heatmap: the scores (one slice).
        lesions: boolean tile masks of the lesions, dominant first (:func:`lesion_masks`).
        pixel_affine: the analysed image's pixel index -> frame position map.
        level0: ``(scale, offset)`` from frame positions to level-0 pixel coordinates
            (the loader's ``level0_pixels``).
        threshold: score at or above which a tile is classified ``Tumor``.
    """
    if heatmap.scores.shape[0] != 1:
        raise ValueError(f"heatmap must hold one slice, got {heatmap.scores.shape[0]}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must lie in 0..1, got {threshold}")

    features = []
    polygons: dict[tuple[int, int], Polygon] = {}
    rows, cols = np.nonzero(heatmap.analysed[0])
    for row, col in zip(rows.tolist(), cols.tolist()):
        corners = _tile_corners(heatmap, pixel_affine, level0, row, col)
        polygons[row, col] = Polygon(corners)
        score = float(heatmap.scores[0, row, col])
        number = int(heatmap.grid.number(0, row, col))
        measurements = {"tile number": number, "score": round(score, 6),
                        "tissue share": round(float(heatmap.grid.tissue_fraction[0, row, col]), 6)}
        measurements.update({f"layer {i + 1} probability": round(float(p), 6)
                             for i, p in enumerate(heatmap.layer_probabilities[0, row, col])})
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[*map(list, corners), list(corners[0])]]},
            "properties": {"objectType": "tile", "name": f"tile {number}",
                           "classification": _TUMOUR if score >= threshold else _OTHER,
                           "measurements": measurements},
        })
    for index, mask in enumerate(lesions):
        cells = [polygons[row, col] for row, col in zip(*np.nonzero(mask[0])) if (row, col) in polygons]
        outline = shapely.union_all(cells)
        features.append({
            "type": "Feature",
            "geometry": mapping(outline),
            "properties": {"objectType": "annotation", "name": f"lesion {index + 1}" + (" (dominant)" if index == 0 else ""),
                           "classification": _TUMOUR, "measurements": {"tiles": len(cells)}},
        })
    return {"type": "FeatureCollection", "features": features}
