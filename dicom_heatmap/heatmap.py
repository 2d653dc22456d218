"""The heatmap (S8): tile scores arranged by tile number, with the grid's geometry."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from transforms.grid import TileGrid

__all__ = ["Heatmap"]


@dataclass
class Heatmap:
    """Scores on the tile grid.

    Attributes:
        grid: the tile layout and tissue flags.
        scores: (slices, rows, cols) float32 fused score; NaN where not analysed.
        layer_probabilities: (slices, rows, cols, 13) float32; NaN where not analysed.
        tile_affine: 4x4 map from tile index (slice, row, col, 1) to the position of the
            tile centre in ``frame`` (mm, or pixels when ``frame`` is ``"IMAGE"``).
        frame: ``"PATIENT"``, ``"SLIDE"`` or ``"IMAGE"``, as the loaders name it.
        patches: where the tiles were pooled from patches at the model's scale (see
            :meth:`pooled`), the heatmap of those patches; None where each tile was scored
            whole.
        raw_scores: where the whole-slide stage changed the scores (context and per-slide
            calibration, see :meth:`with_scores`), the tile model's own scores, shaped like
            ``scores``; None where the scores are the tile model's.
    """

    grid: TileGrid
    scores: np.ndarray
    layer_probabilities: np.ndarray
    tile_affine: np.ndarray
    frame: str
    patches: "Heatmap | None" = None
    raw_scores: np.ndarray | None = None

    def with_scores(self, scores: np.ndarray) -> "Heatmap":
        """This heatmap with ``scores`` (same shape) in place of its scores; the old ones
        are kept as :attr:`raw_scores` (the first ones, if they were replaced before)."""
        if scores.shape != self.scores.shape:
            raise ValueError(f"scores must have the heatmap's shape {self.scores.shape}, got {scores.shape}")
        raw = self.raw_scores if self.raw_scores is not None else self.scores
        return replace(self, scores=np.where(self.analysed, scores, np.nan).astype(np.float32), raw_scores=raw)

    @classmethod
    def assemble(cls, grid: TileGrid, numbers: np.ndarray, scores: np.ndarray, layer_probabilities: np.ndarray,
                 pixel_affine: np.ndarray, frame: str, image_shape: tuple[int, int]) -> "Heatmap":
        """Place per-tile values by tile number; tiles not listed stay NaN (not analysed).

        Args:
            grid: the tile layout.
            numbers: (N,) 1-based tile numbers of the scored tiles.
            scores: (N,) their fused scores.
            layer_probabilities: (N, 13) their per-layer probabilities.
            pixel_affine: 4x4 map of pixel index (slice, row, col, 1) to position.
            frame: coordinate frame of ``pixel_affine``.
            image_shape: (rows, cols) of the image in pixels.
        """
        shape = grid.shape
        heat = np.full(shape, np.nan, dtype=np.float32)
        layers = np.full(shape + (layer_probabilities.shape[1],), np.nan, dtype=np.float32)
        s, r, c = grid.position(np.asarray(numbers, dtype=np.int64))
        heat[s, r, c] = scores
        layers[s, r, c] = layer_probabilities
        tile_rows, tile_cols = image_shape[0] / shape[1], image_shape[1] / shape[2]
        # mean tile size: tile r's centre sits at pixel (r + 0.5) * tile_rows - 0.5
        to_pixels = np.array([
            [1, 0, 0, 0],
            [0, tile_rows, 0, 0.5 * tile_rows - 0.5],
            [0, 0, tile_cols, 0.5 * tile_cols - 0.5],
            [0, 0, 0, 1],
        ])
        return cls(grid, heat, layers, pixel_affine @ to_pixels, frame)

    @classmethod
    def pooled(cls, patches: "Heatmap", grid: TileGrid, pixel_affine: np.ndarray, image_shape: tuple[int, int]) -> "Heatmap":
        """The heatmap of ``grid`` whose tile values are pooled from a heatmap of patches.

        A tile's value is the mean of the scored patches it overlaps, each weighted by the
        pixels it shares with the tile times its tissue share: the share of cancerous tissue
        in the tile (S6), read at the model's scale. A tile of too little tissue, or that no
        scored patch overlaps, stays NaN (not analysed).

        Args:
            patches: scores on a lattice over the same image (:meth:`TileGrid.lattice`).
            grid: the grid the user asked for.
            pixel_affine: 4x4 map of pixel index (slice, row, col, 1) to position.
            image_shape: (rows, cols) of the image in pixels.
        """
        rows, cols = grid.overlaps(patches.grid)
        scored = patches.analysed
        weight = np.where(scored, patches.grid.tissue_fraction, 0.0)
        values = np.concatenate([patches.scores[..., None], patches.layer_probabilities], axis=-1)
        values = np.where(scored[..., None], values, 0.0) * weight[..., None]

        def pool(field: np.ndarray) -> np.ndarray:  # (slices, R', C', k) -> (slices, R, C, k)
            return np.einsum("ri,sijk,cj->srck", rows, field, cols, optimize=True)

        totals = pool(weight[..., None])[..., 0]
        means = pool(values) / np.where(totals > 0, totals, 1.0)[..., None]
        analysed = grid.is_tissue & (totals > 0)
        means[~analysed] = np.nan
        numbers = np.flatnonzero(analysed.ravel()) + 1
        flat = means.reshape(-1, means.shape[-1])[numbers - 1].astype(np.float32)
        return replace(cls.assemble(grid, numbers, flat[:, 0], flat[:, 1:], pixel_affine, patches.frame, image_shape),
                       patches=patches)

    @property
    def analysed(self) -> np.ndarray:
        """(slices, rows, cols) bool: tiles that were scored."""
        return np.isfinite(self.scores)

    @property
    def tile_spacing(self) -> np.ndarray:
        """Length of one tile step along (slice, row, col), in frame units."""
        return np.linalg.norm(self.tile_affine[:3, :3], axis=0)

    def centre(self, index: tuple[int, int, int] | np.ndarray) -> np.ndarray:
        """Position of the centre of tile (slice, row, col) in the frame."""
        return (self.tile_affine @ np.append(np.asarray(index, dtype=float), 1.0))[:3]

    def statistics(self, threshold: float) -> dict[str, float | int | None]:
        """Max and mean score over analysed tiles and the count above ``threshold``."""
        values = self.scores[self.analysed]
        if values.size == 0:
            return {"analysed_tiles": 0, "max_score": None, "mean_score": None, "tiles_above_threshold": 0}
        return {
            "analysed_tiles": int(values.size),
            "max_score": float(values.max()),
            "mean_score": float(values.mean()),
            "tiles_above_threshold": int((values >= threshold).sum()),
        }
