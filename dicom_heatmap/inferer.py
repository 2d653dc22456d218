"""The MONAI inferer that scores the tissue tiles of a grid in batches."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from monai.inferers import Inferer
from tqdm import tqdm

from dicom_heatmap.scorer import TileScorer, TileScores
from transforms.grid import TileGrid

__all__ = ["TileGridInferer"]


class TileGridInferer(Inferer):
    """Score every tissue tile of a :class:`TileGrid`; background tiles are skipped.

    Reading and scoring overlap: a reader thread fetches the next batch of tiles (from an
    array, or region by region from a streamed slide) while the current one is scored.

    Args:
        progress: show a progress bar (only for more than two batches).
    """

    def __init__(self, progress: bool = True) -> None:
        super().__init__()
        self.progress = progress

    def __call__(self, inputs: tuple[np.ndarray, TileGrid], network: TileScorer, *args: Any, what: str = "tiles",
                 **kwargs: Any) -> tuple[np.ndarray, TileScores]:  # type: ignore[override]
        """Score the tissue tiles of ``inputs`` = (image (slices, rows, cols, 3) uint8, grid);
        ``what`` names them on the progress bar ("tiles", or "patches" for the model's lattice).

        Returns:
            the 1-based numbers of the scored tiles and their scores.
        """
        image, grid = inputs
        numbers = np.flatnonzero(grid.is_tissue.ravel()) + 1
        scores = np.empty(len(numbers), dtype=np.float32)
        layers = np.empty((len(numbers), network.network.num_layers), dtype=np.float32)
        batch = network.batch_size
        chunks = [numbers[start : start + batch] for start in range(0, len(numbers), batch)]

        def read(chunk: np.ndarray) -> list[np.ndarray]:
            return grid.tiles(image, chunk, min_side=network.input_size)

        # the next batch is read (openslide and numpy release the GIL) while this one is scored
        with ThreadPoolExecutor(max_workers=1) as reader, tqdm(
            total=len(numbers), desc=f"scoring {what}", unit={"patches": "patch"}.get(what, "tile"), leave=False, disable=not self.progress or len(numbers) <= 2 * batch
        ) as bar:
            pending = reader.submit(read, chunks[0]) if chunks else None
            start = 0
            for index, chunk in enumerate(chunks):
                tiles = pending.result()
                pending = reader.submit(read, chunks[index + 1]) if index + 1 < len(chunks) else None
                result = network.score_details(tiles)
                scores[start : start + len(chunk)] = result.scores
                layers[start : start + len(chunk)] = result.layer_probabilities
                start += len(chunk)
                bar.update(len(chunk))
        return numbers, TileScores(scores, layers)
