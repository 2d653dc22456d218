"""The heatmap as GeoJSON objects on the slide, as QuPath imports them (File > Import objects).

One ``tile`` object per analysed tile - its polygon in the full-resolution level's pixel
coordinates (corner-based: pixel (0, 0) covers [0, 1) x [0, 1)), its number, score, tissue
share and 13 layer probabilities as measurements - and one ``annotation`` per lesion, the
outline of its tiles, dominant first.

Two classes, named for what the model's score says and no more (a tissue type such as
QuPath's ``Tumor`` or ``Stroma`` would read as a pathologist's call): tiles scoring at or
above the threshold, and the lesions, are ``Score at or above threshold`` (red); the other
analysed tiles are ``Score below threshold`` (blue). Tiles not analysed are not written.
"""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry import Polygon, mapping

from dicom_heatmap.heatmap import Heatmap

__all__ = ["build_feature_collection", "HIGH_CLASS", "LOW_CLASS"]

HIGH_CLASS = {"name": "Score at or above threshold", "color": [200, 0, 0]}
LOW_CLASS = {"name": "Score below threshold", "color": [40, 90, 200]}


def _corners(heatmap: Heatmap, pixel_affine: np.ndarray, level0: tuple[tuple[float, float], float]) -> np.ndarray:
    """(rows, cols, 4, 2) corners (x, y) of every tile in level-0 pixel coordinates,
    clockwise from top left, in one matrix product (a slide has tens of thousands)."""
    grid = heatmap.grid
    rows = np.asarray(grid.row_edges, dtype=float) - 0.5  # pixel edges; pixel centres sit at integers
    cols = np.asarray(grid.col_edges, dtype=float) - 0.5
    top, bottom = rows[:-1, None], rows[1:, None]
    left, right = cols[None, :-1], cols[None, 1:]
    top, bottom, left, right = np.broadcast_arrays(top, bottom, left, right)  # each (rows, cols)
    corner_rows = np.stack([top, top, bottom, bottom], axis=-1)
    corner_cols = np.stack([left, right, right, left], axis=-1)
    index = np.stack([np.zeros_like(corner_rows), corner_rows, corner_cols, np.ones_like(corner_rows)], axis=-1)
    frame = index @ pixel_affine.T  # slide or picture axes: x right, y down
    scale, offset = level0
    return np.round(frame[..., :2] * np.asarray(scale, dtype=float) + offset, 3)


def build_feature_collection(heatmap: Heatmap, lesions: list[np.ndarray], pixel_affine: np.ndarray,
                             level0: tuple[tuple[float, float], float], threshold: float) -> dict:
    """The tiles and lesion outlines of a 2D heatmap as a GeoJSON FeatureCollection.

    Args:
        heatmap: the scores (one slice).
        lesions: boolean tile masks of the lesions, dominant first (:func:`dicom_heatmap.lesions.lesion_masks`).
        pixel_affine: the analysed image's pixel index -> frame position map.
        level0: ``((scale_x, scale_y), offset)`` from frame positions to level-0 pixel
            coordinates (the loader's ``level0_pixels``).
        threshold: score at or above which a tile is classified ``Score at or above threshold``.
    """
    if heatmap.scores.shape[0] != 1:
        raise ValueError(f"heatmap must hold one slice, got {heatmap.scores.shape[0]}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must lie in 0..1, got {threshold}")

    corners = _corners(heatmap, pixel_affine, level0)
    features = []
    for row, col in zip(*(axis.tolist() for axis in np.nonzero(heatmap.analysed[0]))):
        ring = corners[row, col].tolist()
        score = float(heatmap.scores[0, row, col])
        number = int(heatmap.grid.number(0, row, col))
        measurements = {"tile number": number, "score": round(score, 6),
                        "tissue share": round(float(heatmap.grid.tissue_fraction[0, row, col]), 6)}
        measurements.update({f"layer {i + 1} probability": round(float(p), 6)
                             for i, p in enumerate(heatmap.layer_probabilities[0, row, col])})
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
            "properties": {"objectType": "tile", "name": f"tile {number}",
                           "classification": HIGH_CLASS if score >= threshold else LOW_CLASS,
                           "measurements": measurements},
        })
    for index, mask in enumerate(lesions):
        tiles = np.nonzero(mask[0] & heatmap.analysed[0])
        outline = shapely.union_all([Polygon(corners[row, col]) for row, col in zip(*tiles)])
        features.append({
            "type": "Feature",
            "geometry": mapping(outline),
            "properties": {"objectType": "annotation", "name": f"lesion {index + 1}" + (" (dominant)" if index == 0 else ""),
                           "classification": HIGH_CLASS, "measurements": {"tiles": len(tiles[0])}},
        })
    return {"type": "FeatureCollection", "features": features}
