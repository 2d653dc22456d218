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

* lesion - the tiles at or above the threshold connected to the tile whose
  repeatedly neighbourhood-averaged score is highest (the thick part of the lesion
  wins over a thin tail or an isolated spike);
* focus - the lesion's core: what survives the most erosions by the 3x3 (3x3x3)
  neighbourhood; its score-weighted centre is the focus position (between tile centres
  where the lesion's centre is), its best tile the focus tile. When not one erosion
  leaves anything, one that forgives a single missing neighbour is used (a thick focus
  with one missed tile), and when that leaves nothing either, the lesion's tiles around
  the smoothed maximum (a lesion that is its own core would have its focus on its
  centroid, and so be undirected whatever its shape);
* dominant direction - from the focus position toward the score-weighted centroid of
  the lesion, in physical units where the source has them;
* directedness - the length of that offset divided by the lesion's mean distance
  from the focus: 0 for a lesion symmetric about its focus, 1 when all of it lies
  on one ray. Below :data:`MIN_DIRECTEDNESS` there is no dominant direction;
* extent - all analysed tiles at or above the threshold (count and area or volume);
  reach - the farthest lesion tile centre from the focus along the direction.

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

__all__ = ["SpreadSummary", "analyze_spread", "COMPASS", "direction_words"]

#: The 8 bins of the in-plane flow histogram, counter-clockwise from "right" on screen.
COMPASS = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")
#: Below this directedness the field has no dominant direction.
MIN_DIRECTEDNESS = 0.2
#: Value differences below this are not flows (score noise).
MIN_DIFFERENCE = 1e-3

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
        focus_tile: 1-based number of the highest-scoring tile (None if none analysed).
        focus_index: its (slice, row, col).
        focus_position: its centre in the frame.
        threshold: score at or above which a tile counts toward the extent.
        extent_tiles: analysed tiles at or above ``threshold``.
        extent_area: their area (2D) or volume (3D) in frame units squared/cubed.
        reach: farthest distance from the focus centre along the direction (or in any
            direction, when undirected) among the lesion's tiles, in frame units.
        unit: "mm" or "px".
        lesion_tiles: tiles of the lesion (at or above threshold, connected to the focus).
        lesion_ellipsoid: the lesion as an ellipsoid in the frame - ``centre`` and three
            semi-axis vectors ``axes`` (from the principal axes of its tile centres, each
            at least half a tile long) - or None without a lesion of two tiles or more.
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


def _neighbourhood_mean(scores: np.ndarray) -> np.ndarray:
    """Mean of the analysed tiles in each tile's 3x3 (2D) or 3x3x3 (3D) neighbourhood; -inf where not analysed."""
    finite = np.isfinite(scores)
    values = np.where(finite, scores, 0.0)
    pad = [(1, 1) if n > 1 else (0, 0) for n in scores.shape]
    padded_values, padded_count = np.pad(values, pad), np.pad(finite.astype(float), pad)
    total, count = np.zeros_like(values), np.zeros_like(values)
    ranges = [range(3) if n > 1 else range(1) for n in scores.shape]
    for ds, dr, dc in itertools.product(*ranges):
        window = (slice(ds, ds + scores.shape[0]), slice(dr, dr + scores.shape[1]), slice(dc, dc + scores.shape[2]))
        total += padded_values[window]
        count += padded_count[window]
    return np.where(finite, total / np.maximum(count, 1), -np.inf)


def _focus(scores: np.ndarray, passes: int = 3) -> tuple[int, int, int]:
    """The lesion's core: the maximum of the scores smoothed ``passes`` times by the
    neighbourhood mean (so the thick part of a lesion wins over a thin tail or a spike);
    among equal maxima, the one nearest their centroid."""
    smoothed = scores
    for _ in range(passes):
        smoothed = _neighbourhood_mean(np.where(np.isfinite(smoothed), smoothed, np.nan))
    smoothed = np.where(np.isfinite(scores), smoothed, -np.inf)
    ties = np.argwhere(smoothed >= smoothed.max() - 1e-9)
    nearest = np.argmin(np.linalg.norm(ties - ties.mean(axis=0), axis=1))
    return tuple(int(v) for v in ties[nearest])


def _erode(mask: np.ndarray, missing: int = 0) -> np.ndarray:
    """Tiles of ``mask`` with at most ``missing`` of their 3x3 (2D) or 3x3x3 (3D)
    neighbours outside ``mask``."""
    pad = [(1, 1) if n > 1 else (0, 0) for n in mask.shape]
    padded = np.pad(mask, pad, constant_values=False)
    ranges = [range(3) if n > 1 else range(1) for n in mask.shape]
    outside = np.zeros(mask.shape, dtype=np.int64)
    for ds, dr, dc in itertools.product(*ranges):
        outside += ~padded[ds : ds + mask.shape[0], dr : dr + mask.shape[1], dc : dc + mask.shape[2]]
    return mask & (outside <= missing)


def _core(lesion: np.ndarray, focus: tuple[int, int, int]) -> np.ndarray:
    """The deepest part of a lesion: the last non-empty result of repeated erosion. When
    not one erosion leaves anything, an erosion that forgives one missing neighbour is
    tried first (a single missed tile in a thick focus), then the lesion's tiles around
    ``focus`` (the smoothed maximum, so the thick part): a lesion that is its own core
    would put the focus on its centroid and be undirected whatever its shape."""
    core = _erode(lesion)
    if not core.any():
        core = _erode(lesion, missing=1)
        if not core.any():
            around = tuple(slice(max(v - 1, 0), v + 2) for v in focus)
            core = np.zeros_like(lesion)
            core[around] = lesion[around]
            return core
    while True:
        eroded = _erode(core)
        if not eroded.any():
            return core
        core = eroded


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


def _component(mask: np.ndarray, seed: tuple[int, int, int]) -> np.ndarray:
    """Tiles of ``mask`` connected to ``seed`` (26-connectivity; 8 within a slice)."""
    component = np.zeros_like(mask)
    if not mask[seed]:
        return component
    steps = [o for o in itertools.product((-1, 0, 1), repeat=3) if any(o)]
    stack = [seed]
    component[seed] = True
    while stack:
        s, r, c = stack.pop()
        for ds, dr, dc in steps:
            n = (s + ds, r + dr, c + dc)
            if all(0 <= v < size for v, size in zip(n, mask.shape)) and mask[n] and not component[n]:
                component[n] = True
                stack.append(n)
    return component


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
    steps_frame = heatmap.tile_affine[:3, :3]  # columns: one tile step along slice, row, col
    in_plane_area = float(np.linalg.norm(np.cross(steps_frame[:, 1], steps_frame[:, 2])))
    tile_measure = in_plane_area * (heatmap.tile_spacing[0] if scores.shape[0] > 1 else 1.0)
    extent = analysed & (np.nan_to_num(scores, nan=-1.0) >= threshold)
    summary = dict(
        directed=False, directedness=0.0, direction_image=[0.0] * 3, angle_deg=None, direction_frame=[0.0] * 3,
        words="none", frame=heatmap.frame, histogram={n: round(float(v), 4) for n, v in zip(COMPASS, histogram)},
        flow_count=flow_count, focus_tile=None, focus_index=None, focus_position=None, threshold=threshold,
        extent_tiles=int(extent.sum()), extent_area=round(float(extent.sum()) * tile_measure, 3), reach=0.0, unit=unit,
        flow=flow,
    )
    if not analysed.any() or flow_count == 0:
        return SpreadSummary(**summary)  # nothing analysed, or a flat field: nothing to report

    focus = _focus(scores)
    lesion = _component(extent, focus)
    if lesion.sum() < 2:
        summary.update(focus_tile=int(heatmap.grid.number(*focus)), focus_index=list(focus),
                       focus_position=[round(float(v), 3) for v in heatmap.centre(focus)])
        return SpreadSummary(**summary)
    # the focus position: the score-weighted centre of the lesion's core (what survives
    # the most erosions), which lies between tile centres where the lesion's centre does
    core = _core(lesion, focus)
    core_indices = np.argwhere(core)
    core_weights = scores[core]
    focus_position = (core_weights[:, None] * np.array([heatmap.centre(i) for i in core_indices])).sum(0) / core_weights.sum()
    if not core[focus]:
        focus = tuple(int(v) for v in core_indices[np.argmax(core_weights)])
    summary.update(focus_tile=int(heatmap.grid.number(*focus)), focus_index=list(focus),
                   focus_position=[round(float(v), 3) for v in focus_position])
    indices = np.argwhere(lesion)
    weights = scores[lesion]
    centres = np.array([heatmap.centre(i) for i in indices])
    summary.update(lesion_tiles=int(len(indices)), lesion_ellipsoid=_ellipsoid(centres, steps_frame))
    offsets_frame = centres - focus_position
    mean_offset = (weights[:, None] * offsets_frame).sum(0) / weights.sum()
    mean_distance = float((weights * np.linalg.norm(offsets_frame, axis=1)).sum() / weights.sum())
    directedness = float(np.linalg.norm(mean_offset) / mean_distance) if mean_distance else 0.0
    summary["directedness"] = round(directedness, 4)
    if directedness < MIN_DIRECTEDNESS:
        summary["reach"] = round(float(np.linalg.norm(offsets_frame, axis=1).max()), 3)
        return SpreadSummary(**summary)
    direction_frame = mean_offset / np.linalg.norm(mean_offset)
    focus_index_position = (core_weights[:, None] * core_indices).sum(0) / core_weights.sum()
    offsets_index = indices - focus_index_position
    mean_index = (weights[:, None] * offsets_index).sum(0) / weights.sum()
    direction_image = mean_index / np.linalg.norm(mean_index) if np.any(mean_index) else np.zeros(3)
    angle = None
    if abs(direction_image[1]) > 1e-9 or abs(direction_image[2]) > 1e-9:
        angle = round(math.degrees(math.atan2(-direction_image[1], direction_image[2])) % 360.0, 2)
    summary.update(
        directed=True,
        direction_image=[round(float(v), 4) for v in direction_image],
        angle_deg=angle,
        direction_frame=[round(float(v), 4) for v in direction_frame],
        words=direction_words(direction_frame, heatmap.frame),
        reach=round(max(float((offsets_frame @ direction_frame).max()), 0.0), 3),
    )
    return SpreadSummary(**summary)
