"""Lesions: where a heatmap marks tumour, cut into connected parts, the most confident first.

The scores are smoothed by a Gaussian of :data:`LESION_SIGMA` tiles over the analysed
tiles (a normalised convolution: tiles not analysed neither lower nor raise their
neighbours); the analysed tiles whose smoothed score is at or above the threshold, split
into connected parts of at least :data:`MIN_LESION_TILES` tiles, are the lesions. The
smoothing keeps an isolated high tile or a bridge one tile wide from joining or steering
a lesion. Each lesion's confident mass (:func:`confident_mass`) orders them; the main
lesions (:func:`main_lesions`) are the dominant one and those holding at least
:data:`JOIN_SHARE` of its mass. Where tiles were pooled from the model's patches, lesions
are read on the patches (:func:`reading_map`). :mod:`dicom_heatmap.spread` reads focus and
direction on them; the SEG and GeoJSON outputs outline them (:func:`lesion_masks`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np

from dicom_heatmap.calibration import LOGIT_CLIP, logit
from dicom_heatmap.heatmap import Heatmap

__all__ = ["find_lesions", "main_lesions", "lesion_masks", "reading_map", "confident_mass", "smooth", "LESION_SIGMA",
           "MIN_LESION_TILES", "JOIN_SHARE"]

#: Gaussian (in tiles) smoothing the scores before the lesions are taken.
LESION_SIGMA = 1.0
#: Fewest tiles of a lesion.
MIN_LESION_TILES = 2
#: A lesion joins the dominant one in the summary when it holds this share of its confident mass
JOIN_SHARE = 0.2


def smooth(values: np.ndarray, sigma: float, weights: np.ndarray | None = None) -> np.ndarray:
    """Gaussian smoothing (``sigma`` in tiles) along every axis longer than one tile.

    Without ``weights`` the field is padded with zeros (what lies outside counts as no
    tumour); with them it is a normalised convolution, the weighted mean of the
    neighbourhood, so that tiles not analysed neither lower nor raise their neighbours.
    """
    radius = max(1, int(math.ceil(3 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()

    def convolve(field: np.ndarray) -> np.ndarray:
        for axis, size in enumerate(field.shape):
            if size > 1:
                field = np.apply_along_axis(lambda v: np.convolve(v, kernel)[radius : radius + size], axis, field)
        return field

    if weights is None:
        return convolve(values.astype(np.float64))
    total, norm = convolve(values * weights), convolve(weights.astype(np.float64))
    return np.where(norm > 1e-12, total / np.maximum(norm, 1e-12), 0.0)


def _connected_parts(mask: np.ndarray) -> list[np.ndarray]:
    """Connected parts of ``mask`` (26-connectivity; 8 within a slice), each as a mask."""
    seen = np.zeros_like(mask)
    steps = [o for o in itertools.product((-1, 0, 1), repeat=3) if any(o)]
    parts = []
    for seed in map(tuple, np.argwhere(mask)):
        if seen[seed]:
            continue
        part = np.zeros_like(mask)
        stack = [seed]
        part[seed] = seen[seed] = True
        while stack:
            s, r, c = stack.pop()
            for ds, dr, dc in steps:
                n = (s + ds, r + dr, c + dc)
                if all(0 <= v < size for v, size in zip(n, mask.shape)) and mask[n] and not seen[n]:
                    part[n] = seen[n] = True
                    stack.append(n)
        parts.append(part)
    return parts


def confident_mass(values: np.ndarray, part: np.ndarray, threshold: float) -> float:
    """How much confident tumour a lesion holds: the sum over its tiles of their log-odds
    above the threshold's (at most :data:`LOGIT_CLIP` a tile). A thin halo just over the
    threshold weighs little; a tile at 0.99 weighs as much as many at 0.55."""
    margin = logit(values[part], clip=None) - float(logit(threshold, clip=None))
    return float(np.clip(margin, 0.0, LOGIT_CLIP).sum())


def find_lesions(heatmap: Heatmap, threshold: float) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """The lesion tiles - the analysed tiles whose scores, smoothed by :data:`LESION_SIGMA`
    over the analysed tiles, reach ``threshold`` - and their connected parts of at least
    :data:`MIN_LESION_TILES` with each one's confident mass (:func:`confident_mass`), the
    dominant one (most confident tumour) first."""
    analysed = heatmap.analysed
    values = np.nan_to_num(heatmap.scores.astype(np.float64), nan=0.0)
    mask = analysed & (smooth(values, LESION_SIGMA, analysed.astype(np.float64)) >= threshold)
    parts = [part for part in _connected_parts(mask) if part.sum() >= MIN_LESION_TILES]
    masses = [confident_mass(values, part, threshold) for part in parts]
    order = np.argsort([-m for m in masses], kind="stable")
    return mask, [parts[i] for i in order], [masses[i] for i in order]


def main_lesions(parts: list[np.ndarray], masses: list[float]) -> np.ndarray:
    """The tiles the summary is read on: the dominant lesion and every other lesion holding
    at least :data:`JOIN_SHARE` of its confident mass; scattered false positives and small
    second regions are left to the lesion list."""
    return np.logical_or.reduce([part for part, mass in zip(parts, masses) if mass >= JOIN_SHARE * masses[0]])


def lesion_masks(heatmap: Heatmap, threshold: float = 0.5) -> list[np.ndarray]:
    """Boolean (slices, rows, cols) tile mask of each lesion, the dominant one first: the
    lesions :func:`analyze_spread` reports, for the segmentation and outline outputs.

    Where the lesions were read on the model's patches, a tile belongs to a lesion when at
    least half of the scored patch pixels it holds do; a lesion that fills no tile so is left out.
    """
    parts = find_lesions(reading_map(heatmap), threshold)[1]
    if heatmap.patches is None:
        return parts
    rows, cols = heatmap.grid.overlaps(heatmap.patches.grid)
    scored = heatmap.patches.analysed.astype(np.float64)
    held = np.einsum("ri,sij,cj->src", rows, scored, cols)
    masks = [heatmap.analysed & (np.einsum("ri,sij,cj->src", rows, part * scored, cols) >= 0.5 * np.maximum(held, 1e-9))
             for part in parts]
    return [mask for mask in masks if mask.any()]


def reading_map(heatmap: Heatmap) -> Heatmap:
    """The map the lesions are read on: the model's patches where the tiles were pooled from
    them (the same whatever grid was asked for), else the tiles; and on the tile model's own
    patch scores where the whole-slide stage changed them. The refined map is tighter and
    marks less stroma (the extent counts it), but on the development slides left out it
    turned or lost more directions than the raw one (docs/model_card.md)."""
    if heatmap.patches is None:
        return heatmap
    patches = heatmap.patches
    return patches if patches.raw_scores is None else replace(patches, scores=patches.raw_scores, raw_scores=None)
