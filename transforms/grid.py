"""The grid split (S2): an equal grid of tiles numbered from 1, row-major.

Numbering: slice by slice, and within a slice top to bottom, left to right; tile
``k`` (1-based) of a grid with ``R`` rows and ``C`` columns lies in slice
``(k-1) // (R*C)``, row ``(k-1) % (R*C) // C``, column ``(k-1) % C``.

The grid partitions the image exactly: the edges between tiles are the integer points
of an even split, so tiles differ in size by at most one pixel and every pixel belongs
to exactly one tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from monai.transforms import MapTransform, Transform

from transforms._dictionary import meta_key
from transforms.errors import ConfigurationError, InputError
from transforms.intensity import tissue_mask
from transforms.spatial import pixel_spacing

__all__ = ["TileGrid", "SplitTileGrid", "SplitTileGridd", "MIN_TILE_SIDE"]

#: Smallest tile side, in pixels, the split accepts.
MIN_TILE_SIDE = 8


@dataclass(frozen=True)
class TileGrid:
    """Tile layout over an image of (slices, rows, cols) pixels.

    Attributes:
        row_edges: R + 1 pixel rows where tiles start (the last is the image height).
        col_edges: C + 1 pixel columns, as ``row_edges``.
        slices: number of slices (1 for a 2D image).
        tissue_fraction: (slices, R, C) share of tissue pixels in each tile.
        is_tissue: (slices, R, C) whether the tile is analysed.
        tissue_map: (slices, rows', cols') the tissue map the fractions came from (a
            thumbnail's for a large image), or None.
        tissue_map_scale: pixels of ``tissue_map`` per image pixel.
    """

    row_edges: np.ndarray
    col_edges: np.ndarray
    slices: int
    tissue_fraction: np.ndarray
    is_tissue: np.ndarray
    tissue_map: np.ndarray | None = field(default=None, repr=False, compare=False)
    tissue_map_scale: float = 1.0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, cols) of tiles."""
        return self.slices, len(self.row_edges) - 1, len(self.col_edges) - 1

    @property
    def count(self) -> int:
        return int(np.prod(self.shape))

    def position(self, number: int | np.ndarray) -> tuple[Any, Any, Any]:
        """(slice, row, col) of 1-based tile number(s)."""
        _, rows, cols = self.shape
        index = np.asarray(number) - 1
        return index // (rows * cols), index % (rows * cols) // cols, index % cols

    def number(self, slice_index: int | np.ndarray, row: int | np.ndarray, col: int | np.ndarray) -> Any:
        """1-based tile number at (slice, row, col)."""
        _, rows, cols = self.shape
        return np.asarray(slice_index) * rows * cols + np.asarray(row) * cols + np.asarray(col) + 1

    def box(self, number: int) -> tuple[int, int, int, int]:
        """Pixel box (top, left, bottom, right) of a tile; bottom and right are exclusive."""
        _, row, col = self.position(number)
        return (int(self.row_edges[row]), int(self.col_edges[col]), int(self.row_edges[row + 1]), int(self.col_edges[col + 1]))

    def tiles(self, image: np.ndarray, numbers: Sequence[int], min_side: int | None = None) -> list[np.ndarray]:
        """The pixels of tiles ``numbers`` from an image (slices, rows, cols, channels).

        With ``min_side``, a streamed slide may give the tiles from a coarser pyramid level,
        at least ``min_side`` pixels a side (the network shrinks them anyway); it reads
        neighbouring tiles together.
        """
        boxes = [self.box(int(number)) for number in numbers]
        if min_side is not None and hasattr(image, "regions"):
            return image.regions(boxes, min_side)
        slices = self.position(np.asarray(numbers, dtype=np.int64))[0]
        return [image[int(s), top:bottom, left:right] for s, (top, left, bottom, right) in zip(slices, boxes)]

    def lattice(self, side: tuple[float, float], tissue_threshold: float) -> "TileGrid":
        """Another grid over the same image whose tiles are about ``side`` (rows, cols) pixels:
        ``round(height / side)`` near-equal tiles down (at least one), and across alike. Its
        tissue shares come from this grid's tissue map, so no pixel is read again.

        The analysis uses it for the model's patches: a lattice fixed by the image and the
        model's scale, the same whatever grid a user asks for.

        Args:
            side: wanted tile side along rows and along columns, in image pixels.
            tissue_threshold: least tissue share for a tile of the lattice to be analysed.
        """
        if self.tissue_map is None:
            raise ValueError("this grid keeps no tissue map to share with a lattice")
        height, width = int(self.row_edges[-1]), int(self.col_edges[-1])
        row_edges = _edges(height, max(1, round(height / side[0])))
        col_edges = _edges(width, max(1, round(width / side[1])))
        fraction = _box_means(self.tissue_map, row_edges * self.tissue_map_scale, col_edges * self.tissue_map_scale)
        is_tissue = fraction >= tissue_threshold if tissue_threshold > 0 else np.ones_like(fraction, dtype=bool)
        return TileGrid(row_edges, col_edges, self.slices, fraction, is_tissue, self.tissue_map, self.tissue_map_scale)

    def share(self, mask: np.ndarray) -> np.ndarray:
        """The share of ``mask``'s pixels (slices, rows, cols, on this grid's image) in each
        tile: (slices, R, C) in 0..1 (a lesion mask gives each tile's lesion share)."""
        return _box_means(np.asarray(mask), self.row_edges, self.col_edges)

    def overlaps(self, other: "TileGrid") -> tuple[np.ndarray, np.ndarray]:
        """How many pixel rows of each row of ``other``'s tiles lie in each row of this grid's
        tiles, (R, R'), and the same for columns, (C, C'): the pixels tile (r, c) shares
        with tile (r', c') of ``other`` are ``rows[r, r'] * cols[c, c']``."""
        def shared(mine: np.ndarray, theirs: np.ndarray) -> np.ndarray:
            low = np.maximum(mine[:-1, None], theirs[None, :-1])
            high = np.minimum(mine[1:, None], theirs[None, 1:])
            return np.clip(high - low, 0, None).astype(np.float64)

        return shared(self.row_edges, other.row_edges), shared(self.col_edges, other.col_edges)

    def table(self) -> list[dict[str, Any]]:
        """One record per tile: number, slice, row, col, box, tissue fraction, analysed."""
        slices, rows, cols = (axis.ravel().tolist() for axis in np.indices(self.shape))
        tops, bottoms = self.row_edges[:-1].tolist(), self.row_edges[1:].tolist()
        lefts, rights = self.col_edges[:-1].tolist(), self.col_edges[1:].tolist()
        fractions = self.tissue_fraction.ravel().tolist()
        analysed = self.is_tissue.ravel().tolist()
        return [
            {"number": index + 1, "slice": s, "row": r, "col": c, "box": [int(tops[r]), int(lefts[c]), int(bottoms[r]), int(rights[c])],
             "tissue_fraction": round(fractions[index], 4), "analysed": bool(analysed[index])}
            for index, (s, r, c) in enumerate(zip(slices, rows, cols))
        ]


#: Longest side of the thumbnail a streamed slide's tissue map is made from (at least).
THUMBNAIL_SIDE = 2048


def _box_means(mask: np.ndarray, row_edges: np.ndarray, col_edges: np.ndarray) -> np.ndarray:
    """Mean of ``mask`` (slices, rows, cols) over each tile, edges in ``mask`` pixels
    (rounded; every tile covers at least one pixel), from a summed-area table."""
    table = np.zeros((mask.shape[0], mask.shape[1] + 1, mask.shape[2] + 1))
    table[:, 1:, 1:] = mask.astype(np.float64).cumsum(1).cumsum(2)
    top = np.clip(np.floor(row_edges[:-1] + 1e-9).astype(int), 0, mask.shape[1] - 1)
    bottom = np.maximum(np.clip(np.ceil(row_edges[1:] - 1e-9).astype(int), 0, mask.shape[1]), top + 1)
    left = np.clip(np.floor(col_edges[:-1] + 1e-9).astype(int), 0, mask.shape[2] - 1)
    right = np.maximum(np.clip(np.ceil(col_edges[1:] - 1e-9).astype(int), 0, mask.shape[2]), left + 1)
    sums = (table[:, bottom][:, :, right] - table[:, top][:, :, right]
            - table[:, bottom][:, :, left] + table[:, top][:, :, left])
    return sums / ((bottom - top)[:, None] * (right - left)[None, :])


def _edges(length: int, parts: int) -> np.ndarray:
    return np.round(np.linspace(0, length, parts + 1)).astype(np.int64)


class SplitTileGrid(Transform):
    """Split an image into an equal grid and mark which tiles hold tissue.

    Give at most one of ``grid``, ``tile_size`` or ``tile_size_um``; with none, tiles are
    ``default_tile_size_um`` a side where it is given and the pixel spacing is known (a
    radiology model's field of view), else square-ish with ``default_tiles`` of them
    along the shorter image side.

    Args:
        grid: (rows, cols) of tiles.
        tile_size: wanted tile side in pixels; the grid is the nearest whole number of
            tiles across each side.
        tile_size_um: wanted tile side in micrometres (needs a known pixel spacing).
        tissue_threshold: least tissue share for a tile to be analysed (0 analyses all).
        default_tiles: tiles along the shorter side when no size is given.
        default_tile_size_um: tile side in micrometres when no size is given, for images
            whose pixel spacing is known.
    """

    def __init__(self, grid: tuple[int, int] | None = None, tile_size: int | None = None, tile_size_um: float | None = None,
                 tissue_threshold: float = 0.25, default_tiles: int = 8, default_tile_size_um: float | None = None) -> None:
        given = [v is not None for v in (grid, tile_size, tile_size_um)]
        if sum(given) > 1:
            raise ConfigurationError("give only one of grid, tile_size and tile_size_um")
        if grid is not None and (len(grid) != 2 or min(grid) < 1):
            raise ConfigurationError(f"grid must be two positive numbers (rows, cols), got {grid}")
        if tile_size is not None and tile_size < MIN_TILE_SIDE:
            raise ConfigurationError(f"tile_size must be at least {MIN_TILE_SIDE} pixels, got {tile_size}")
        if tile_size_um is not None and not tile_size_um > 0:
            raise ConfigurationError(f"tile_size_um must be positive, got {tile_size_um}")
        if not 0 <= tissue_threshold <= 1:
            raise ConfigurationError(f"tissue_threshold must lie in 0..1, got {tissue_threshold}")
        self.grid, self.tile_size, self.tile_size_um = grid, tile_size, tile_size_um
        self.tissue_threshold = tissue_threshold
        self.default_tiles = default_tiles
        self.default_tile_size_um = default_tile_size_um

    def _grid_shape(self, height: int, width: int, meta: dict) -> tuple[int, int]:
        source = meta.get("source_path", "input")
        tile_size_um = self.tile_size_um
        if self.grid is None and self.tile_size is None and tile_size_um is None and meta.get("frame") != "IMAGE":
            tile_size_um = self.default_tile_size_um
        if self.grid is not None:
            rows, cols = self.grid
        else:
            if tile_size_um is not None:
                if meta.get("frame") == "IMAGE":
                    raise InputError(source, "the pixel spacing is unknown, so a tile size in micrometres cannot be used; give --grid or --tile-size")
                spacing = pixel_spacing(meta["affine"])
                side_rows, side_cols = tile_size_um / 1000 / spacing[0], tile_size_um / 1000 / spacing[1]  # spacing in mm
            else:
                side = self.tile_size or min(height, width) / self.default_tiles
                side_rows = side_cols = side
            if height < side_rows or width < side_cols:
                raise InputError(source, f"the image ({height} x {width} pixels) is smaller than one tile "
                                 f"({math.ceil(side_rows)} x {math.ceil(side_cols)} pixels); use a smaller tile or a finer level")
            rows, cols = max(1, round(height / side_rows)), max(1, round(width / side_cols))
        if height // rows < MIN_TILE_SIDE or width // cols < MIN_TILE_SIDE:
            raise InputError(source, f"the image ({height} x {width} pixels) is too small for a {rows} x {cols} grid: "
                             f"tiles would be under {MIN_TILE_SIDE} pixels; choose a coarser grid")
        return int(rows), int(cols)

    def __call__(self, image: np.ndarray, meta: dict) -> TileGrid:
        slices, height, width = image.shape[:3]
        rows, cols = self._grid_shape(height, width, meta)
        row_edges, col_edges = _edges(height, rows), _edges(width, cols)
        side = max(THUMBNAIL_SIDE, 8 * max(rows, cols))
        if isinstance(image, np.ndarray) and max(height, width) <= 2 * side:
            mask, scale = tissue_mask(image, meta["tissue_rule"]), 1.0
        elif isinstance(image, np.ndarray):
            # a large picture held whole: its tissue map from every k-th pixel, as a streamed
            # slide's from its thumbnail (the per-pixel map of a 12,000-pixel-square picture
            # took gigabytes)
            step = -(-max(height, width) // side)
            mask, scale = tissue_mask(image[:, ::step, ::step], meta["tissue_rule"], 1.0 / step), 1.0 / step
        else:  # a streamed slide: the tissue map comes from its thumbnail, a few pixels per tile
            thumbnail, scale = image.thumbnail(side)
            mask = tissue_mask(thumbnail[None], meta["tissue_rule"], scale)
        fraction = _box_means(mask, row_edges * scale, col_edges * scale)
        is_tissue = fraction >= self.tissue_threshold if self.tissue_threshold > 0 else np.ones_like(fraction, dtype=bool)
        return TileGrid(row_edges, col_edges, slices, fraction, is_tissue, mask, scale)


class SplitTileGridd(MapTransform):
    """Dictionary form of :class:`SplitTileGrid`: puts the :class:`TileGrid` of ``data[key]``
    under ``data[f"{key}_grid"]``."""

    def __init__(self, keys: str | Sequence[str], *args: Any, allow_missing_keys: bool = False, **kwargs: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self.split = SplitTileGrid(*args, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_grid"] = self.split(d[key], d[meta_key(key)])
        return d
