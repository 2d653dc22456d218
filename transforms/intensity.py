"""Intensity normalisation per modality, and the tissue (foreground) rule.

After :class:`NormalizeByModality` every input is uint8 RGB (slices, rows, cols, 3): the
space the tile network was trained in and the picture the Secondary Capture shows.
"""

from __future__ import annotations

import numpy as np
from monai.transforms import Transform

from transforms._dictionary import dictionary_form

__all__ = ["NormalizeByModality", "NormalizeByModalityd", "tissue_mask"]


def tissue_mask(image: np.ndarray, rule: str, scale: float = 1.0) -> np.ndarray:
    """Boolean mask (..., rows, cols) of tissue in a uint8 RGB image.

    Args:
        image: uint8 array (..., rows, cols, 3).
        rule: ``"stain"`` for stained slides and pictures (not near-white glass, not
            black padding: coloured or darker than the glass), ``"intensity"`` for CT/MR
            (brighter than air after windowing).
        scale: the image's size against the one the grid lies on (a thumbnail's is
            below 1): the stain mask's closing shrinks with it.
    """
    grey = image.mean(axis=-1)
    if rule == "intensity":
        return grey > 20
    if rule == "stain":
        saturation = image.max(axis=-1).astype(np.int16) - image.min(axis=-1)
        # pale fat is white cells inside thin stained membranes: closing the mask fills
        # them (gaps up to 2 * STAIN_CLOSING_RADIUS pixels) while open glass stays glass
        radius = max(1, round(STAIN_CLOSING_RADIUS * scale))
        return _closing(((saturation > 20) | (grey < 200)) & (grey > 10), radius)
    raise ValueError(f"tissue rule must be 'stain' or 'intensity', got {rule!r}")


#: Radius in pixels of the square closing of the stain mask (see :func:`tissue_mask`)
STAIN_CLOSING_RADIUS = 4


def _square_morphology(mask: np.ndarray, radius: int, erode: bool) -> np.ndarray:
    """Dilation (``erode`` False: pads with background) or erosion (``erode`` True: pads with
    foreground, so the image edge does not eat the mask) by a square of side 2 * radius + 1,
    over the last two axes, as separable running maxima or minima."""
    fill = erode
    combine = np.logical_and if erode else np.logical_or
    for axis in (-2, -1):
        pad = [(0, 0)] * mask.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(mask, pad, constant_values=fill)
        size = mask.shape[axis]

        def window(shift: int, axis: int = axis) -> np.ndarray:
            index = [slice(None)] * mask.ndim
            index[axis] = slice(shift, shift + size)
            return padded[tuple(index)]

        out = window(0).copy()
        for shift in range(1, 2 * radius + 1):
            combine(out, window(shift), out=out)
        mask = out
    return mask


def _closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological closing (dilate, then erode) of a boolean mask by a square."""
    return _square_morphology(_square_morphology(mask, radius, erode=False), radius, erode=True)


class NormalizeByModality(Transform):
    """Map modality values to uint8 RGB and record which tissue rule applies.

    Args:
        ct_window: (centre, width) in HU for CT; soft tissue by default.
        percentiles: lower and upper percentile mapped to 0 and 255 for MR and other
            grey images.
    """

    def __init__(self, ct_window: tuple[float, float] = (40.0, 400.0), percentiles: tuple[float, float] = (1.0, 99.0)) -> None:
        if ct_window[1] <= 0:
            raise ValueError(f"ct_window width must be positive, got {ct_window[1]}")
        if not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ValueError(f"percentiles must rise within 0..100, got {percentiles}")
        self.ct_window = ct_window
        self.percentiles = percentiles

    def __call__(self, image: np.ndarray, meta: dict) -> tuple[np.ndarray, dict]:
        meta = dict(meta)
        if image.shape[-1] == 3:
            if image.dtype != np.uint8:
                image = np.clip(image.astype(np.float32) * 255.0 / max(float(image.max()), 1.0), 0, 255).astype(np.uint8)
            meta["tissue_rule"] = "stain"
            return image, meta
        values = image[..., 0].astype(np.float32)
        if meta.get("modality") == "CT":
            centre, width = self.ct_window
            low, high = centre - width / 2, centre + width / 2
        else:
            low, high = np.percentile(values, self.percentiles)
            if high <= low:
                high = low + 1
        grey = np.clip((values - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
        meta["tissue_rule"] = "intensity"
        meta["intensity_window"] = (float(low), float(high))
        return np.repeat(grey[..., None], 3, axis=-1), meta


NormalizeByModalityd = dictionary_form(NormalizeByModality)
