"""Spread analysis on score fields with known answers."""

import numpy as np
import pytest

from dicom_heatmap.heatmap import Heatmap
from dicom_heatmap.spread import analyze_spread, direction_words, flow_field
from transforms.grid import TileGrid
from transforms.io.common import pixel_affine, plane_affine


def heatmap_of(field: np.ndarray, affine=None, frame="IMAGE", tile=10) -> Heatmap:
    field = field if field.ndim == 3 else field[None]
    s, r, c = field.shape
    grid = TileGrid(np.arange(r + 1) * tile, np.arange(c + 1) * tile, s, np.ones(field.shape), np.ones(field.shape, bool))
    numbers = np.arange(1, field.size + 1)
    return Heatmap.assemble(grid, numbers, field.ravel(), np.zeros((field.size, 13)),
                            pixel_affine() if affine is None else affine, frame, (r * tile, c * tile))


def lesion_with_tail() -> np.ndarray:
    """A round focus at column 4 with a tail three tiles thick running right (+x)."""
    y, x = np.mgrid[0:16, 0:16]
    disk = np.where((x - 4) ** 2 + (y - 8) ** 2 <= 9, 0.9, 0.05)
    tail = np.where((x > 4) & (abs(y - 8) <= 1), 0.85 - 0.025 * (x - 4), 0.0)
    return np.maximum(disk, tail)


def angle_between(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


def test_tail_toward_plus_x_is_reported_as_right():
    summary = analyze_spread(heatmap_of(lesion_with_tail()))
    assert summary.directed
    assert angle_between(summary.angle_deg, 0.0) <= 10
    assert summary.words == "right"
    assert summary.focus_index[1] in (7, 8, 9) and summary.focus_index[2] <= 5  # in the disk (columns 1-7), not on the tail
    # the tail's end (column 15) lies about ten tiles of 10 px from the focus, which the tail pulls a little right
    assert 95.0 <= summary.reach <= 110.0


def test_a_focus_with_a_missed_tile_still_points_along_its_tail():
    """The demo mosaic's shape: a 4 x 3 focus with one tile scored low, a 2-row tail to the
    right. No erosion leaves anything of it, so the focus tile is its core."""
    field = np.full((8, 12), 0.05)
    field[2:6, 1:4] = 0.9
    field[3:5, 4:10] = 0.85
    field[3, 3] = 0.2  # a tumour tile the model missed
    summary = analyze_spread(heatmap_of(field))
    assert summary.directed and summary.words == "right"
    # the thickest part: in the focus block (columns 1-3) or where it meets the tail, never out on the tail
    assert summary.focus_index[2] in (1, 2, 3, 4)
    # the same lesion without its tail is symmetric enough to have no direction
    field[3:5, 4:10] = 0.05
    assert not analyze_spread(heatmap_of(field)).directed


def test_a_focus_with_two_missed_tiles_still_points_along_its_tail():
    """The 0.5.0 model on the demo mosaic: two missed tiles side by side in the focus and two
    in the tail. Not even the forgiving erosion leaves anything; the lesion's tiles around the
    smoothed maximum are the core (the whole lesion as its core put the focus on the centroid:
    undirected)."""
    field = np.full((8, 12), 0.05)
    field[2:6, 1:4] = 0.9
    field[3:5, 4:10] = 0.85
    field[3, 2:4] = (0.49, 0.22)  # tumour tiles the model missed
    field[4, 4] = field[4, 7] = 0.45
    summary = analyze_spread(heatmap_of(field))
    assert summary.directed and summary.words.startswith("right")
    assert angle_between(summary.angle_deg, 0.0) <= 20  # the core sits a little low: the misses are in its top row
    assert summary.focus_index[2] in (1, 2, 3)


def test_symmetric_lesion_has_no_dominant_direction():
    y, x = np.mgrid[0:15, 0:15]
    disk = np.where((x - 7) ** 2 + (y - 7) ** 2 <= 12, 0.9, 0.05)
    summary = analyze_spread(heatmap_of(disk))
    assert not summary.directed
    assert summary.words == "none"
    assert summary.extent_tiles == int((disk >= 0.5).sum())


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_rotating_the_input_rotates_the_direction(turns):
    base = analyze_spread(heatmap_of(lesion_with_tail()))
    turned = analyze_spread(heatmap_of(np.rot90(lesion_with_tail(), turns)))
    assert angle_between(turned.angle_deg, (base.angle_deg + 90 * turns) % 360) <= 1e-6


def test_flat_field_reports_nothing():
    for value in (0.2, 0.8):
        summary = analyze_spread(heatmap_of(np.full((6, 6), value)))
        assert not summary.directed and summary.flow_count == 0 and summary.focus_tile is None


def test_flow_field_follows_the_patents_rule():
    field = np.array([[[0.9, 0.5, 0.1]]])
    per_tile, pairs = flow_field(field)
    # both horizontal pairs flow to the right, from the larger value to the smaller
    assert per_tile[0, 0, 0, 2] == pytest.approx(0.9) and per_tile[0, 0, 1, 2] == pytest.approx(0.5)
    assert per_tile[0, 0, 2].tolist() == [0, 0, 0]
    horizontal = [sign for offset, sign, _ in pairs if tuple(offset) == (0, 0, 1)][0]
    assert horizontal[0, 0, :2].tolist() == [1.0, 1.0]


def test_patient_frame_gives_anatomical_words():
    # axial slice: rows run posterior (+y), columns run left (+x); tail toward +column = left
    affine = plane_affine(2.0, 2.0, (0, 1, 0), (1, 0, 0), (0, 0, 0))
    summary = analyze_spread(heatmap_of(lesion_with_tail(), affine, "PATIENT"))
    assert summary.words == "left"
    assert summary.direction_frame[0] == pytest.approx(1.0, abs=0.02)
    assert summary.unit == "mm"
    assert direction_words(np.array([-0.2, -0.9, 0.4]), "PATIENT") == "anterior-superior"
    assert direction_words(np.array([0.8, 0.1, -0.6]), "PATIENT") == "left-inferior"


def test_isolated_high_tiles_neither_join_nor_steer_the_lesion():
    """False positives scattered around a symmetric lesion: alone among low tiles, each
    falls under the threshold once the field is smoothed, so the lesion stays undirected."""
    y, x = np.mgrid[0:15, 0:15]
    field = np.where((x - 7) ** 2 + (y - 7) ** 2 <= 12, 0.9, 0.05)
    clean = analyze_spread(heatmap_of(field))
    for r, c in [(7, 12), (2, 11), (12, 12), (7, 13)]:  # right of the lesion, one touching it diagonally
        field[r, c] = 0.95
    noisy = analyze_spread(heatmap_of(field))
    assert not noisy.directed and noisy.lesion_tiles == clean.lesion_tiles
    assert noisy.extent_tiles == clean.extent_tiles + 4  # the extent still counts every tile at or above threshold


def test_a_bridge_one_tile_wide_does_not_join_two_lesions():
    field = np.full((12, 24), 0.05)
    field[3:9, 2:8] = 0.9  # the larger lesion, left
    field[4:8, 16:20] = 0.8  # a smaller one, right
    field[6, 8:16] = 0.9  # a one-tile bridge between them
    summary = analyze_spread(heatmap_of(field))
    assert len(summary.lesions) == 2
    first, second = summary.lesions
    assert first["tiles"] >= 30 and first["focus_index"][2] < 8  # the dominant lesion first
    assert 12 <= second["tiles"] <= 20 and second["focus_index"][2] >= 16
    assert summary.lesion_tiles == first["tiles"] + second["tiles"]
    # the whole points from the larger lesion toward the smaller one
    assert summary.directed and angle_between(summary.angle_deg, 0.0) <= 10
