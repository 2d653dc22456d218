"""The grid split: numbering, exact partition, heatmap round trip."""

import numpy as np
import pytest

from dicom_heatmap.heatmap import Heatmap
from transforms.errors import InputError
from transforms.grid import SplitTileGrid, SplitTileGridd, TileGrid
from transforms.io.common import pixel_affine


def _meta(rule="stain"):
    return {"tissue_rule": rule, "affine": pixel_affine(), "frame": "IMAGE", "source_path": "test"}


@pytest.mark.parametrize("height,width,rows,cols", [(97, 131, 7, 5), (64, 64, 8, 8), (101, 33, 3, 4), (50, 51, 1, 6)])
def test_grid_tiles_every_pixel_exactly_once(height, width, rows, cols):
    image = np.zeros((1, height, width, 3), dtype=np.uint8)
    grid = SplitTileGrid(grid=(rows, cols), tissue_threshold=0)(image, _meta())
    assert grid.shape == (1, rows, cols)
    coverage = np.zeros((height, width), dtype=int)
    for number in range(1, grid.count + 1):
        top, left, bottom, right = grid.box(number)
        coverage[top:bottom, left:right] += 1
    assert np.all(coverage == 1)
    sizes_r, sizes_c = np.diff(grid.row_edges), np.diff(grid.col_edges)
    assert sizes_r.max() - sizes_r.min() <= 1 and sizes_c.max() - sizes_c.min() <= 1


def test_numbering_is_row_major_from_one_and_round_trips():
    image = np.zeros((2, 70, 90, 3), dtype=np.uint8)
    grid = SplitTileGrid(grid=(7, 9), tissue_threshold=0)(image, _meta())
    rows, cols = 7, 9
    for k in (1, 2, 9, 10, 63, 64, 126):
        s, r, c = (int(v) for v in grid.position(k))
        assert (s, r, c) == ((k - 1) // (rows * cols), (k - 1) % (rows * cols) // cols, (k - 1) % cols)
        assert int(grid.number(s, r, c)) == k
    # tile 10 of slice 0 is row 1, column 0: its box starts one tile down at the left edge
    assert grid.box(10)[:2] == (10, 0)


def test_heatmap_places_each_tile_by_number():
    image = np.zeros((1, 55, 77, 3), dtype=np.uint8)
    grid = SplitTileGrid(grid=(5, 7), tissue_threshold=0)(image, _meta())
    numbers = np.arange(1, grid.count + 1)
    rng = np.random.default_rng(0)
    order = rng.permutation(numbers)  # scored in any order
    heat = Heatmap.assemble(grid, order, order.astype(np.float32), np.zeros((len(order), 13)), pixel_affine(), "IMAGE", (55, 77))
    for k in numbers:
        assert heat.scores[0, (k - 1) // 7, (k - 1) % 7] == k


def test_tissue_fraction_marks_background_tiles():
    image = np.full((1, 40, 40, 3), 245, dtype=np.uint8)  # white glass
    image[0, :20, :20] = (150, 60, 140)  # stained tissue in the top-left quarter
    grid = SplitTileGrid(grid=(2, 2))(image, _meta())
    assert grid.is_tissue[0].tolist() == [[True, False], [False, False]]
    assert grid.tissue_fraction[0, 0, 0] == pytest.approx(1.0)


def test_image_smaller_than_one_tile_is_refused():
    image = np.zeros((1, 30, 30, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="smaller than one tile"):
        SplitTileGrid(tile_size=64)(image, _meta())
    with pytest.raises(InputError, match="too small"):
        SplitTileGrid(grid=(8, 8))(image, _meta())


def test_dictionary_form_adds_the_grid():
    image = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    data = SplitTileGridd("image", grid=(4, 4))({"image": image, "image_meta_dict": _meta("intensity")})
    assert data["image_grid"].shape == (1, 4, 4)


def test_tiles_pool_the_model_patches_they_overlap():
    """A tile's value is the mean of the scored patches it overlaps, weighted by the pixels
    they share and the patches' tissue share; a tile no scored patch reaches is not analysed."""
    mask = np.ones((1, 40, 40), bool)
    mask[0, 30:, 30:] = False  # the last patch is glass
    mask[0, :10, 10:15] = False  # half of patch (0, 1) is glass
    tiles = TileGrid(np.array([0, 20, 40]), np.array([0, 15, 40]), 1, np.ones((1, 2, 2)), np.ones((1, 2, 2), bool), mask, 1.0)
    patches = tiles.lattice((10, 10), tissue_threshold=0.25)
    assert patches.shape == (1, 4, 4) and patches.tissue_fraction[0, 0, 1] == 0.5 and not patches.is_tissue[0, 3, 3]
    scores = np.arange(16, dtype=np.float32).reshape(1, 4, 4) / 16
    numbers = np.flatnonzero(patches.is_tissue.ravel()) + 1
    fine = Heatmap.assemble(patches, numbers, scores.ravel()[numbers - 1], np.zeros((len(numbers), 13), np.float32),
                            np.eye(4), "IMAGE", (40, 40))
    pooled = Heatmap.pooled(fine, tiles, np.eye(4), (40, 40))
    # tile (0, 0) holds columns 0-14: all of patches (r, 0) and half of patches (r, 1), rows 0-1
    weight = np.array([[10, 5 * 0.5], [10, 5]])
    expected = (weight * scores[0, :2, :2]).sum() / weight.sum()
    assert abs(pooled.scores[0, 0, 0] - expected) < 1e-6
    # tile (1, 1) holds rows 20-39, columns 15-39: the glass patch (3, 3) counts nothing
    weight = np.array([[5, 10, 10], [5, 10, 0]])
    expected = (weight * scores[0, 2:, 1:]).sum() / weight.sum()
    assert abs(pooled.scores[0, 1, 1] - expected) < 1e-6
    assert pooled.patches is fine
