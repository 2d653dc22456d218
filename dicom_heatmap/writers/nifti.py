"""The score volume as NIfTI, on the source's own patient geometry, for 3D Slicer and ITK tools.

One voxel per tile, placed at the tile's centre with the tile grid's spacing and the
image's direction cosines (SimpleITK works in LPS, as DICOM does; it writes the NIfTI
header's RAS itself). Resampled onto the source series (nearest neighbour), each tile's
value lands on the pixels of that tile.

Tiles not analysed hold :data:`NOT_ANALYSED` (-1), outside the scores' 0..1: ITK reads a
NaN in a NIfTI file as 0 (3D Slicer then shows background as a score of 0), while a
negative value can be thresholded away or coloured apart by any viewer. A label map on the
same geometry beside it (``analysed.nii.gz``: 1 analysed, 0 not) says the same thing
without any convention.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicom_heatmap.heatmap import Heatmap

__all__ = ["write_score_volume", "NOT_ANALYSED"]

#: The value of a tile that was not analysed (background, too little tissue).
NOT_ANALYSED = -1.0


def write_score_volume(heatmap: Heatmap, path: Path, mask_path: Path) -> None:
    """Write the scores of a heatmap in patient coordinates to ``path`` (``.nii.gz``, float32,
    :data:`NOT_ANALYSED` where no score) and which tiles were analysed to ``mask_path``
    (uint8 label map on the same geometry).

    Args:
        heatmap: the scores; its frame must be ``"PATIENT"``.
        path: the score volume to write.
        mask_path: the label map to write.
    """
    import SimpleITK as sitk

    if heatmap.frame != "PATIENT":
        raise ValueError(f"a NIfTI volume needs patient geometry, the heatmap's frame is {heatmap.frame}")
    steps = heatmap.tile_affine[:3, :3]  # columns: one tile along slice, row, col
    along = [steps[:, 2], steps[:, 1], steps[:, 0]]  # ITK's x, y, z: column, row, slice
    spacing = [float(np.linalg.norm(v)) for v in along]
    if min(spacing) <= 0:
        raise ValueError("the tile grid has a zero step")
    analysed = heatmap.analysed & ~np.isnan(heatmap.scores)
    scores = np.where(analysed, heatmap.scores, NOT_ANALYSED).astype(np.float32)
    direction = [float(v) for v in np.column_stack([v / s for v, s in zip(along, spacing)]).ravel()]
    for values, target in ((scores, path), (analysed.astype(np.uint8), mask_path)):
        image = sitk.GetImageFromArray(np.ascontiguousarray(values))  # (z, y, x) order
        image.SetSpacing(spacing)
        image.SetOrigin([float(v) for v in heatmap.tile_affine[:3, 3]])
        image.SetDirection(direction)
        sitk.WriteImage(image, str(target), useCompression=True)
