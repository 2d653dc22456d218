"""The score volume as NIfTI, on the source's own patient geometry, for 3D Slicer and ITK tools.

One voxel per tile, placed at the tile's centre with the tile grid's spacing and the
image's direction cosines (SimpleITK works in LPS, as DICOM does; it writes the NIfTI
header's RAS itself). Tiles not analysed hold NaN. Resampled onto the source series
(nearest neighbour), each tile's value lands on the pixels of that tile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicom_heatmap.heatmap import Heatmap

__all__ = ["write_score_volume"]


def write_score_volume(heatmap: Heatmap, path: Path) -> None:
    """Write the scores of a heatmap in patient coordinates to ``path`` (``.nii.gz``).

    Args:
        heatmap: the scores; its frame must be ``"PATIENT"``.
        path: the file to write.
    """
    import SimpleITK as sitk

    if heatmap.frame != "PATIENT":
        raise ValueError(f"a NIfTI volume needs patient geometry, the heatmap's frame is {heatmap.frame}")
    steps = heatmap.tile_affine[:3, :3]  # columns: one tile along slice, row, col
    along = [steps[:, 2], steps[:, 1], steps[:, 0]]  # ITK's x, y, z: column, row, slice
    spacing = [float(np.linalg.norm(v)) for v in along]
    if min(spacing) <= 0:
        raise ValueError("the tile grid has a zero step")
    image = sitk.GetImageFromArray(np.ascontiguousarray(heatmap.scores.astype(np.float32)))  # (z, y, x) order
    image.SetSpacing(spacing)
    image.SetOrigin([float(v) for v in heatmap.tile_affine[:3, 3]])
    image.SetDirection([float(v) for v in np.column_stack([v / s for v, s in zip(along, spacing)]).ravel()])
    sitk.WriteImage(image, str(path), useCompression=True)
