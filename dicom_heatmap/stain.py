"""H&E stain arithmetic in optical density: colour deconvolution and per-tile normalisation.

Colour deconvolution (Ruifrok & Johnston 2001) writes each pixel's optical density as a
mix of three stain vectors: haematoxylin (nuclei), eosin (cytoplasm, stroma) and a third
(DAB, absent from H&E; it takes up what the other two do not explain). Training jitters the
stain amounts (:func:`jitter_stains`); a network may also take its tiles with the amount of
each stain normalised per tile (:func:`normalise_stains`), so that a paler or darker batch
of slides reaches it at one intensity.
"""

from __future__ import annotations

import torch

__all__ = ["RGB_FROM_HED", "HED_FROM_RGB", "stain_amounts", "from_stain_amounts", "jitter_stains",
           "stain_percentiles", "normalise_stains", "STAIN_PERCENTILE", "STAIN_SCALE_LIMIT"]

#: Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) in optical density per RGB channel.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
#: Percentile of a tile's haematoxylin and eosin amounts that :func:`normalise_stains` matches
#: (Macenko et al. 2009 match the 99th: the densest stain, not the share of tissue in the tile).
STAIN_PERCENTILE = 99.0
#: :func:`normalise_stains` scales a stain by at most this factor or its inverse, so that a tile of
#: glass or fat, whose percentile is near 0, is not blown up into noise.
STAIN_SCALE_LIMIT = 3.0


def stain_amounts(tiles: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB values in 0..255 -> (N, 3, H, W) haematoxylin, eosin and DAB amounts."""
    density = -torch.log(tiles.float().clamp(min=1.0) / 255.0)
    return torch.einsum("nchw,cs->nshw", density, HED_FROM_RGB.to(tiles.device))


def from_stain_amounts(stains: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`stain_amounts`: RGB values in 0..255 (float)."""
    density = torch.einsum("nshw,sc->nchw", stains, RGB_FROM_HED.to(stains.device))
    return (255.0 * torch.exp(-density)).clamp_(0, 255)


def jitter_stains(tiles: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Scale and shift each stain's amount by U(1 - sigma, 1 + sigma) and U(-sigma, sigma), per
    tile (Tellez et al. 2018); float NCHW 0..255 in and out."""
    n = tiles.shape[0]
    stains = stain_amounts(tiles)
    scale = 1 - sigma + 2 * sigma * torch.rand(n, 3, 1, 1, generator=generator)
    shift = sigma * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    return from_stain_amounts(stains * scale + shift)


def stain_percentiles(tiles: torch.Tensor) -> torch.Tensor:
    """(N, 2): each tile's :data:`STAIN_PERCENTILE` of haematoxylin and of eosin amount."""
    return _percentiles(stain_amounts(tiles))


def _percentiles(stains: torch.Tensor) -> torch.Tensor:
    return torch.quantile(stains[:, :2].flatten(2), STAIN_PERCENTILE / 100.0, dim=2)


def normalise_stains(tiles: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Scale each tile's haematoxylin and eosin so that their :data:`STAIN_PERCENTILE` becomes
    ``reference`` (2,), within :data:`STAIN_SCALE_LIMIT`; DAB is left as it is.

    Args:
        tiles: (N, 3, H, W) RGB values in 0..255, any dtype.
        reference: the target percentile of haematoxylin and of eosin (from the training tiles).

    Returns:
        (N, 3, H, W) float RGB values in 0..255.
    """
    stains = stain_amounts(tiles)
    found = _percentiles(stains)
    scale = (reference.to(found) / found.clamp(min=1e-3)).clamp(1 / STAIN_SCALE_LIMIT, STAIN_SCALE_LIMIT)
    scale = torch.cat([scale, torch.ones_like(scale[:, :1])], dim=1)
    return from_stain_amounts(stains * scale[:, :, None, None])
