"""Spread analysis (S9): which way the high scores extend.

The patent's rule, kept exactly as the evidence: every pair of neighbouring analysed
tiles (8-neighbourhood in 2D, 26 in 3D) whose values differ gives a flow from the
larger value to the smaller. :func:`flow_field` returns the per-tile flow and the
summary carries its histogram over the 8 in-plane compass directions.

Why the summary does not simply add the flows up: over any lesion that lies inside
the image the flows of its boundary cancel (the sum of a gradient over a closed
region is zero), and a uniformly scored lesion of any shape has flows only on its
boundary. What a reader means by "it spreads to the right" is an asymmetry of the
lesion about its focus. So:

* lesions (:mod:`dicom_heatmap.lesions`) - the scores are first smoothed by a Gaussian of
  :data:`~dicom_heatmap.lesions.LESION_SIGMA` tiles over the analysed tiles (a normalised
  convolution: tiles not analysed neither lower nor raise their neighbours); the analysed
  tiles whose smoothed score is at or above the threshold, split into connected parts of
  at least :data:`~dicom_heatmap.lesions.MIN_LESION_TILES` tiles, are the lesions. The smoothing is what keeps an isolated high tile or a bridge
  one tile wide from joining or steering a lesion: alone among low neighbours it falls
  under the threshold, while a lesion two tiles thick stays. The dominant lesion (the
  most confident tumour, below) comes first;
* focus - the maximum of the lesion tiles (each counting 1) smoothed by a Gaussian of
  :data:`FOCUS_SIGMA` tiles (the thick part of a lesion wins over a thin tail or a
  spike); its tile is the focus tile, and the maximum placed between tile centres (a
  parabola through the neighbours) the focus position;
* dominant direction - from the focus toward the centroid of the lesion tiles (each
  counting the same: score noise inside a lesion would move both about), in physical
  units where the source has them;
* directedness - the length of that offset divided by the lesion tiles' mean distance
  from the focus: 0 for a lesion symmetric about its focus, 1 when all of it lies
  on one ray; a ratio of lengths, so it reads the same on a finer or coarser grid.
  Below :data:`MIN_DIRECTEDNESS` there is no dominant direction;
* extent - all analysed tiles at or above the threshold (count and area or volume);
  reach - the farthest lesion tile centre from the focus along the direction.

Where the tiles were pooled from patches at the model's scale (see
:meth:`dicom_heatmap.heatmap.Heatmap.pooled`), lesions, focus, direction, directedness
and reach are read on the patches - the finest map there is, and the same whatever grid
was asked for - and told in the grid's tiles: the focus tile is the tile holding the
focus patch, the image direction is in tile-index axes. A lesion's ``tiles`` then count
its patches; its area is in mm^2 either way. The flow field and the extent stay on the
grid's tiles.

The summary reads the main lesions: the dominant one - the most confident tumour, the sum
of its tiles' log-odds above the threshold's (:func:`~dicom_heatmap.lesions.confident_mass`), so a thin halo just
over the threshold weighs little - joined by every other lesion holding at least
:data:`~dicom_heatmap.lesions.JOIN_SHARE` of that mass. Scattered false-positive regions and small second regions
take neither the focus nor the direction; ``lesions`` repeats focus, direction,
directedness, extent and reach for each lesion alone, the dominant one first.

Directions are reported in image axes (angle counter-clockwise from "right" as seen on
screen) and in the frame of the source: DICOM patient coordinates (LPS) with
anatomical words, or slide coordinates.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from dicom_heatmap.heatmap import Heatmap
from dicom_heatmap.lesions import find_lesions, main_lesions, reading_map, smooth

__all__ = ["SpreadSummary", "analyze_spread", "COMPASS", "direction_words", "MIN_DIRECTEDNESS"]

#: The 8 bins of the in-plane flow histogram, counter-clockwise from "right" on screen.
COMPASS = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")
#: Below this directedness the field has no dominant direction.
MIN_DIRECTEDNESS = 0.2
#: Value differences below this are not flows (score noise).
MIN_DIFFERENCE = 1e-3
#: Gaussian (in tiles) smoothing the lesion mask before its maximum, the focus, is taken.
FOCUS_SIGMA = 2.0

_PATIENT_WORDS = (("right", "left"), ("anterior", "posterior"), ("inferior", "superior"))  # -/+ along L, P, S
_SLIDE_WORDS = (("left", "right"), ("up", "down"), ("", ""))  # slide x right, y down


@dataclass
class SpreadSummary:
    """What the spread analysis found.

    Attributes:
        directed: whether there is a dominant direction at all.
        directedness: 0 (lesion symmetric about its focus) to 1 (all on one side).
        direction_image: unit vector (slice, row, col) in tile-index axes; zeros if none.
        angle_deg: in-plane angle of the direction, counter-clockwise from right on
            screen, in [0, 360); None if none or purely through-plane.
        direction_frame: unit vector in the source frame (x, y, z); zeros if none.
        words: the direction in words ("left-anterior", "right-down"), main component
            first; "none" without a dominant direction.
        frame: "PATIENT", "SLIDE" or "IMAGE".
        histogram: weighted in-plane flow per compass bin (see :data:`COMPASS`).
        flow_count: number of neighbour pairs with a flow.
        focus_tile: 1-based number of the focus tile: where the lesion scores smoothed by
            :data:`FOCUS_SIGMA` tiles are highest (without a lesion, the scores themselves);
            not always the single highest-scoring tile. None if nothing was analysed.
        focus_index: its (slice, row, col).
        focus_position: its centre in the frame.
        threshold: score at or above which a tile counts toward the extent.
        extent_tiles: analysed tiles at or above ``threshold``.
        extent_area: their area (2D) or volume (3D) in frame units squared/cubed.
        reach: farthest distance from the focus centre along the direction (or in any
            direction, when undirected) among the lesion's tiles, in frame units.
        unit: "mm" or "px".
        lesion_tiles: tiles of all lesions (smoothed score at or above threshold); the
            model's patches where the lesions were read on them (see the module docstring).
        lesion_ellipsoid: the lesion tiles as an ellipsoid in the frame - ``centre`` and
            three semi-axis vectors ``axes`` (from the principal axes of their centres,
            each at least half a tile long) - or None without a lesion.
        lesions: each lesion alone, the dominant one first: ``focus_tile``,
            ``focus_index``, ``focus_position``, ``tiles``, ``area``, ``directed``,
            ``directedness``, ``direction_image``, ``angle_deg``, ``direction_frame``,
            ``words``, ``reach`` and ``ellipsoid``, as above.
        flow: (slices, rows, cols, 3) the patent's per-tile outgoing flow in index axes
            (slice, row, col), each flow a unit step weighted by the larger value.
    """

    directed: bool
    directedness: float
    direction_image: list[float]
    angle_deg: float | None
    direction_frame: list[float]
    words: str
    frame: str
    histogram: dict[str, float]
    flow_count: int
    focus_tile: int | None
    focus_index: list[int] | None
    focus_position: list[float] | None
    threshold: float
    extent_tiles: int
    extent_area: float
    reach: float
    unit: str
    lesion_tiles: int = 0
    lesion_ellipsoid: dict | None = None
    lesions: list[dict] = field(default_factory=list)
    flow: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """Everything but the per-tile ``flow`` field (the result's tile table carries it)."""
        summary = asdict(self)
        del summary["flow"]
        return summary


def direction_words(vector: np.ndarray, frame: str, share: float = 0.3) -> str:
    """Words for a unit vector: components of at least ``share`` of the largest, largest first.

    In the patient frame (LPS): +x left, +y posterior, +z superior; in slide and image
    frames: +x right, +y down.
    """
    vector = np.asarray(vector, dtype=float)
    if not np.any(vector):
        return "none"
    names = _PATIENT_WORDS if frame == "PATIENT" else _SLIDE_WORDS
    largest = np.abs(vector).max()
    order = np.argsort(-np.abs(vector), kind="stable")
    words = [names[i][int(vector[i] > 0)] for i in order if abs(vector[i]) >= share * largest and names[i][0]]
    return "-".join(words) or "none"


def flow_field(scores: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """The patent's neighbour comparison.

    Returns:
        per-tile outgoing flow (slices, rows, cols, 3) in index axes, each flow a unit
        offset weighted by the larger value; and per neighbour offset the arrays
        (offset, sign, weight) where ``sign`` is +1 where the flow runs along the offset,
        -1 against it, 0 for no flow.
    """
    slices = scores.shape[0]
    steps = [o for o in itertools.product((-1, 0, 1), repeat=3) if o > (0, 0, 0)]
    if slices == 1:
        steps = [o for o in steps if o[0] == 0]
    # padded by one tile so that a neighbour's share can be added at index + offset
    padded_field = np.zeros(tuple(n + 2 for n in scores.shape) + (3,))
    padded = np.pad(scores, 1, constant_values=np.nan)
    s, r, c = scores.shape
    own = padded_field[1 : 1 + s, 1 : 1 + r, 1 : 1 + c]
    pairs = []
    for offset in steps:
        ds, dr, dc = offset
        neighbour = padded[1 + ds : 1 + ds + s, 1 + dr : 1 + dr + r, 1 + dc : 1 + dc + c]
        difference = scores - neighbour
        valid = np.isfinite(difference) & (np.abs(difference) > MIN_DIFFERENCE)
        sign = np.where(valid, np.sign(np.nan_to_num(difference)), 0.0)
        weight = np.where(valid, np.fmax(scores, neighbour), 0.0)
        unit = np.asarray(offset, dtype=float) / np.linalg.norm(offset)
        # the larger tile sends the flow: this tile when sign > 0, the neighbour when sign < 0
        own += np.where(sign > 0, weight, 0.0)[..., None] * unit
        padded_field[1 + ds : 1 + ds + s, 1 + dr : 1 + dr + r, 1 + dc : 1 + dc + c] -= np.where(sign < 0, weight, 0.0)[..., None] * unit
        pairs.append((np.asarray(offset), sign, weight))
    field = padded_field[1 : 1 + s, 1 : 1 + r, 1 : 1 + c].copy()
    return field, pairs


def _peak(field: np.ndarray, within: np.ndarray) -> tuple[int, int, int]:
    """The tile of ``within`` where ``field`` is largest; among equal maxima, the one
    nearest their centroid."""
    values = np.where(within, field, -np.inf)
    ties = np.argwhere(values >= values.max() - 1e-9)
    nearest = np.argmin(np.linalg.norm(ties - ties.mean(axis=0), axis=1))
    return tuple(int(v) for v in ties[nearest])


def _ellipsoid(points: np.ndarray, steps: np.ndarray) -> dict:
    """Centre and semi-axes of the ellipsoid with the points' second moments.

    A solid ellipsoid of semi-axis a has variance a^2/5 along it; every axis is at least
    half a tile step long so a flat or thin lesion still has a volume.
    """
    centre = points.mean(axis=0)
    covariance = np.cov((points - centre).T) if len(points) > 1 else np.zeros((3, 3))
    values, vectors = np.linalg.eigh(covariance)
    half_tile = 0.5 * np.linalg.norm(steps, axis=0)
    floor = float(np.min(half_tile[half_tile > 0])) if np.any(half_tile > 0) else 0.5
    axes = [vectors[:, i] * max(float(np.sqrt(5 * max(values[i], 0.0))), floor) for i in range(3)][::-1]
    return {"centre": [round(float(v), 3) for v in centre], "axes": [[round(float(v), 3) for v in axis] for axis in axes]}


def _refine(field: np.ndarray, peak: tuple[int, int, int]) -> np.ndarray:
    """The peak's position between tile centres: a parabola through it and its two
    neighbours along each axis (at most half a tile from the peak tile's centre)."""
    position = np.asarray(peak, dtype=np.float64)
    for axis, size in enumerate(field.shape):
        if not 0 < peak[axis] < size - 1:
            continue
        before, after = list(peak), list(peak)
        before[axis] -= 1
        after[axis] += 1
        low, mid, high = field[tuple(before)], field[peak], field[tuple(after)]
        curvature = low - 2 * mid + high
        if curvature < -1e-12:
            position[axis] += float(np.clip(0.5 * (low - high) / curvature, -0.5, 0.5))
    return position


def _lesion_geometry(heatmap: Heatmap, scores: np.ndarray, tiles: np.ndarray, focus_field: np.ndarray, tile_measure: float) -> dict:
    """Focus, direction, directedness, reach, area (``tile_measure`` a tile) and ellipsoid
    of a set of lesion tiles.

    The focus tile is the maximum of ``focus_field`` over ``tiles``, the focus position
    that maximum between tile centres; the direction runs from the focus position to the
    centroid of ``tiles`` weighted by ``scores``; directedness is the length of that offset over
    the tiles' mean distance from the focus.
    """
    focus = _peak(focus_field, tiles)
    focus_index = _refine(focus_field, focus)
    indices = np.argwhere(tiles)
    weights = scores[tiles]
    focus_position = heatmap.centre(focus_index)
    centres = np.array([heatmap.centre(i) for i in indices])
    offsets_frame = centres - focus_position
    mean_offset = (weights[:, None] * offsets_frame).sum(0) / weights.sum()
    mean_distance = float((weights * np.linalg.norm(offsets_frame, axis=1)).sum() / weights.sum())
    directedness = float(np.linalg.norm(mean_offset) / mean_distance) if mean_distance else 0.0
    steps_frame = heatmap.tile_affine[:3, :3]
    found = dict(
        focus_tile=int(heatmap.grid.number(*focus)), focus_index=list(focus),
        focus_position=[round(float(v), 3) for v in focus_position], tiles=int(len(indices)),
        area=round(len(indices) * tile_measure, 3), directed=False, directedness=round(directedness, 4),
        direction_image=[0.0] * 3, angle_deg=None, direction_frame=[0.0] * 3, words="none",
        reach=round(float(np.linalg.norm(offsets_frame, axis=1).max()), 3),
        ellipsoid=_ellipsoid(centres, steps_frame) if len(indices) > 1 else None,
    )
    if directedness < MIN_DIRECTEDNESS:
        return found
    direction_frame = mean_offset / np.linalg.norm(mean_offset)
    mean_index = (weights[:, None] * (indices - focus_index)).sum(0) / weights.sum()
    direction_image = mean_index / np.linalg.norm(mean_index) if np.any(mean_index) else np.zeros(3)
    angle = None
    if abs(direction_image[1]) > 1e-9 or abs(direction_image[2]) > 1e-9:
        angle = round(math.degrees(math.atan2(-direction_image[1], direction_image[2])) % 360.0, 2)
    found.update(
        directed=True,
        direction_image=[round(float(v), 4) for v in direction_image],
        angle_deg=angle,
        direction_frame=[round(float(v), 4) for v in direction_frame],
        words=direction_words(direction_frame, heatmap.frame),
        reach=round(max(float((offsets_frame @ direction_frame).max()), 0.0), 3),
    )
    return found


def _tile_measure(heatmap: Heatmap) -> float:
    """Area (2D) or volume (3D) of one tile in frame units."""
    steps_frame = heatmap.tile_affine[:3, :3]  # columns: one tile step along slice, row, col
    in_plane_area = float(np.linalg.norm(np.cross(steps_frame[:, 1], steps_frame[:, 2])))
    return in_plane_area * (heatmap.tile_spacing[0] if heatmap.scores.shape[0] > 1 else 1.0)


def _in_grid_tiles(heatmap: Heatmap, reading: Heatmap, found: dict) -> dict:
    """A lesion read on ``reading`` told in ``heatmap``'s tiles: the focus tile is the tile
    holding the focus patch's centre, and the image direction is in tile-index axes."""
    if reading is heatmap:
        return found
    s, r, c = found["focus_index"]
    fine, coarse = reading.grid, heatmap.grid
    row = int(np.searchsorted(coarse.row_edges, 0.5 * (fine.row_edges[r] + fine.row_edges[r + 1]), "right")) - 1
    col = int(np.searchsorted(coarse.col_edges, 0.5 * (fine.col_edges[c] + fine.col_edges[c + 1]), "right")) - 1
    row, col = min(max(row, 0), coarse.shape[1] - 1), min(max(col, 0), coarse.shape[2] - 1)
    found = dict(found, focus_index=[s, row, col], focus_tile=int(coarse.number(s, row, col)))
    if found["directed"]:
        # one patch step is this many tile steps along (slice, row, col)
        ratio = np.array([1.0, np.diff(fine.row_edges).mean() / np.diff(coarse.row_edges).mean(),
                          np.diff(fine.col_edges).mean() / np.diff(coarse.col_edges).mean()])
        vector = np.asarray(found["direction_image"]) * ratio
        found["direction_image"] = [round(float(v), 4) for v in vector / np.linalg.norm(vector)]
    return found


def analyze_spread(heatmap: Heatmap, threshold: float = 0.5) -> SpreadSummary:
    """Run the spread analysis of a heatmap (see the module docstring).

    Args:
        heatmap: scores with NaN for tiles not analysed.
        threshold: score at or above which a tile belongs to the extent.
    """
    scores = heatmap.scores.astype(np.float64)
    flow, pairs = flow_field(scores)
    histogram = np.zeros(len(COMPASS))
    flow_count = 0
    for offset, sign, weight in pairs:
        flow_count += int((sign != 0).sum())
        if offset[1] or offset[2]:
            along = int(round(math.atan2(-offset[1], offset[2]) / (math.pi / 4))) % 8  # on screen, up is -row
            histogram[along] += float(weight[sign > 0].sum())
            histogram[(along + 4) % 8] += float(weight[sign < 0].sum())

    analysed = heatmap.analysed
    unit = "px" if heatmap.frame == "IMAGE" else "mm"
    tile_measure = _tile_measure(heatmap)
    values = np.nan_to_num(scores, nan=0.0)
    extent = analysed & (values >= threshold)
    summary = dict(
        directed=False, directedness=0.0, direction_image=[0.0] * 3, angle_deg=None, direction_frame=[0.0] * 3,
        words="none", frame=heatmap.frame, histogram={n: round(float(v), 4) for n, v in zip(COMPASS, histogram)},
        flow_count=flow_count, focus_tile=None, focus_index=None, focus_position=None, threshold=threshold,
        extent_tiles=int(extent.sum()), extent_area=round(float(extent.sum()) * tile_measure, 3), reach=0.0, unit=unit,
        flow=flow,
    )
    if not analysed.any() or flow_count == 0:
        return SpreadSummary(**summary)  # nothing analysed, or a flat field: nothing to report

    reading = reading_map(heatmap)
    lesion_mask, parts, masses = find_lesions(reading, threshold)
    # every lesion tile counts the same from here on: the scores' noise inside a lesion
    # would otherwise move the maximum about on the plateau of a large one
    lesion_scores = lesion_mask.astype(np.float64)
    focus_field = smooth(lesion_scores, FOCUS_SIGMA)
    if not parts:  # no lesion: the focus is where the scores are highest, smoothed the same way
        focus = _peak(smooth(values, FOCUS_SIGMA), analysed)
        summary.update(focus_tile=int(heatmap.grid.number(*focus)), focus_index=list(focus),
                       focus_position=[round(float(v), 3) for v in heatmap.centre(focus)])
        return SpreadSummary(**summary)
    reading_measure = tile_measure if reading is heatmap else _tile_measure(reading)
    lesions = [_in_grid_tiles(heatmap, reading, _lesion_geometry(reading, lesion_scores, part, focus_field, reading_measure))
               for part in parts]
    main = main_lesions(parts, masses)
    # the focus is sought on the main lesions alone: a false-positive patch elsewhere cannot take it
    whole = _in_grid_tiles(heatmap, reading,
                     _lesion_geometry(reading, lesion_scores, main, smooth(main.astype(np.float64), FOCUS_SIGMA), reading_measure))
    summary.update(
        {key: whole[key] for key in ("focus_tile", "focus_index", "focus_position", "directed", "directedness",
                                     "direction_image", "angle_deg", "direction_frame", "words", "reach")},
        lesion_tiles=int(sum(part.sum() for part in parts)), lesion_ellipsoid=whole["ellipsoid"], lesions=lesions,
    )
    return SpreadSummary(**summary)
