"""Crop, zoom and rotate (S2 of the method), keeping ``meta["affine"]`` exact.

All act on uint8 RGB arrays (slices, rows, cols, 3) from :class:`NormalizeByModality`
and change every slice the same way. The affine maps index (slice, row, col, 1) to a
position; each transform composes it with the index map it applies, so positions
computed downstream stay right.
"""

from __future__ import annotations

import numpy as np
from monai.transforms import Transform
from PIL import Image

from transforms._dictionary import dictionary_form
from transforms.errors import ConfigurationError, InputError
from transforms.intensity import tissue_mask

__all__ = [
    "pixel_spacing",
    "CropToTissue", "CropToTissued", "CropTemplate", "CropTemplated",
    "ZoomWithGeometry", "ZoomWithGeometryd", "RotateWithGeometry", "RotateWithGeometryd",
]


def pixel_spacing(affine: np.ndarray) -> np.ndarray:
    """(along rows, along columns) length of one pixel step of a 4x4 index-to-frame
    ``affine`` (mm, or pixels in the ``"IMAGE"`` frame)."""
    return np.linalg.norm(np.asarray(affine)[:3, 1:3], axis=0)


def _index_map(row_scale: float = 1.0, col_scale: float = 1.0, row_offset: float = 0.0, col_offset: float = 0.0,
               swap: np.ndarray | None = None) -> np.ndarray:
    """4x4 map from new index (s, r, c, 1) to old index."""
    m = np.eye(4)
    if swap is not None:
        m[1:3, 1:3] = swap
    else:
        m[1, 1], m[2, 2] = row_scale, col_scale
    m[1, 3], m[2, 3] = row_offset, col_offset
    return m


def _require_array(image, what: str, meta: dict) -> None:
    """Streamed slides are read tile by tile: whole-image operations cannot apply to them."""
    if not isinstance(image, np.ndarray):
        raise ConfigurationError(f"{meta.get('source_path', 'input')}: {what} is not available for a slide level streamed "
                                 "tile by tile; read a coarser level with --resolution-um, or leave it out")


def _crop(image: np.ndarray, meta: dict, top: int, left: int, height: int, width: int) -> tuple[np.ndarray, dict]:
    meta = dict(meta)
    meta["affine"] = meta["affine"] @ _index_map(row_offset=top, col_offset=left)
    return image[:, top : top + height, left : left + width], meta


def _background(meta: dict) -> int:
    return 255 if meta.get("tissue_rule") == "stain" else 0


class CropToTissue(Transform):
    """Crop to the bounding box of tissue over all slices, with a margin.

    Args:
        margin: pixels kept around the box on each side.
    """

    def __init__(self, margin: int = 0) -> None:
        if margin < 0:
            raise ValueError(f"margin must not be negative, got {margin}")
        self.margin = margin

    def __call__(self, image: np.ndarray, meta: dict) -> tuple[np.ndarray, dict]:
        _require_array(image, "cropping", meta)
        mask = tissue_mask(image, meta["tissue_rule"]).any(axis=0)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            raise InputError(meta["source_path"], "no tissue found to crop to; lower the tissue threshold or do not crop")
        top, bottom = max(rows[0] - self.margin, 0), min(rows[-1] + 1 + self.margin, image.shape[1])
        left, right = max(cols[0] - self.margin, 0), min(cols[-1] + 1 + self.margin, image.shape[2])
        return _crop(image, meta, int(top), int(left), int(bottom - top), int(right - left))


class CropTemplate(Transform):
    """The method's crop template: a fixed window placed where it frames the most tissue,
    or, given ``weights`` (e.g. a score map resampled to the image), the most lesion.

    Args:
        size: (rows, cols) of the window in pixels.
    """

    def __init__(self, size: tuple[int, int]) -> None:
        if min(size) < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, image: np.ndarray, meta: dict, weights: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        _require_array(image, "cropping", meta)
        height, width = min(self.size[0], image.shape[1]), min(self.size[1], image.shape[2])
        if weights is None:
            weights = tissue_mask(image, meta["tissue_rule"]).sum(axis=0)
        elif weights.shape != image.shape[1:3]:
            raise ValueError(f"weights of shape {weights.shape} do not match the image {image.shape[1:3]}")
        # summed-area table: every window's total in O(1)
        table = np.zeros((weights.shape[0] + 1, weights.shape[1] + 1))
        table[1:, 1:] = np.asarray(weights, dtype=np.float64).cumsum(0).cumsum(1)
        totals = table[height:, width:] - table[:-height, width:] - table[height:, :-width] + table[:-height, :-width]
        top, left = np.unravel_index(int(np.argmax(totals)), totals.shape)
        return _crop(image, meta, int(top), int(left), height, width)


class ZoomWithGeometry(Transform):
    """Resample by ``factor`` in rows and columns (bilinear); spacing shrinks by it."""

    def __init__(self, factor: float) -> None:
        if not factor > 0:
            raise ValueError(f"zoom factor must be positive, got {factor}")
        self.factor = float(factor)

    def __call__(self, image: np.ndarray, meta: dict) -> tuple[np.ndarray, dict]:
        if self.factor == 1.0:
            return image, meta
        _require_array(image, "zooming", meta)
        rows = max(1, int(round(image.shape[1] * self.factor)))
        cols = max(1, int(round(image.shape[2] * self.factor)))
        out = np.stack([np.asarray(Image.fromarray(s).resize((cols, rows), Image.BILINEAR)) for s in image])
        row_scale, col_scale = image.shape[1] / rows, image.shape[2] / cols
        meta = dict(meta)
        # pixel centres: old index = (new + 0.5) * scale - 0.5
        meta["affine"] = meta["affine"] @ _index_map(row_scale, col_scale, 0.5 * row_scale - 0.5, 0.5 * col_scale - 0.5)
        return out, meta


class RotateWithGeometry(Transform):
    """Rotate counter-clockwise as seen on screen by ``angle`` degrees about the centre.

    Multiples of 90 degrees are exact (the canvas turns with the image); other angles
    resample bilinearly on the same canvas, corners filled with background.
    """

    def __init__(self, angle: float) -> None:
        self.angle = float(angle) % 360.0

    def __call__(self, image: np.ndarray, meta: dict) -> tuple[np.ndarray, dict]:
        meta = dict(meta)
        height, width = image.shape[1:3]
        quarter = self.angle / 90.0
        if abs(quarter - round(quarter)) < 1e-9:
            k = int(round(quarter)) % 4
            if k == 0:
                return image, meta
            _require_array(image, "rotation", meta)
            out = np.ascontiguousarray(np.rot90(image, k, axes=(1, 2)))
            # new (r', c') -> old (r, c), for one counter-clockwise quarter turn applied k times
            index = np.eye(4)
            h, w = height, width
            for _ in range(k):
                # np.rot90 once: new[r', c'] = old[c', w - 1 - r']
                step = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, w - 1], [0, 0, 0, 1]], dtype=float)
                index = index @ step
                h, w = w, h
            meta["affine"] = meta["affine"] @ index
            return out, meta
        _require_array(image, "rotation", meta)
        theta = np.deg2rad(self.angle)
        centre_r, centre_c = (height - 1) / 2, (width - 1) / 2
        fill = (_background(meta),) * 3
        # PIL measures from pixel corners: the centre of pixel (r, c) is (c + 0.5, r + 0.5)
        out = np.stack([
            np.asarray(Image.fromarray(s).rotate(self.angle, resample=Image.BILINEAR, center=(centre_c + 0.5, centre_r + 0.5), fillcolor=fill))
            for s in image
        ])
        # content turns counter-clockwise on screen (rows point down): output (r', c')
        # shows input c = cc + cos*(c'-cc) - sin*(r'-cr), r = cr + sin*(c'-cc) + cos*(r'-cr)
        cos, sin = np.cos(theta), np.sin(theta)
        m = np.eye(4)
        m[1, 1:3] = [cos, sin]
        m[2, 1:3] = [-sin, cos]
        m[1, 3] = centre_r - cos * centre_r - sin * centre_c
        m[2, 3] = centre_c + sin * centre_r - cos * centre_c
        meta["affine"] = meta["affine"] @ m
        return out, meta


CropToTissued = dictionary_form(CropToTissue)
CropTemplated = dictionary_form(CropTemplate)
ZoomWithGeometryd = dictionary_form(ZoomWithGeometry)
RotateWithGeometryd = dictionary_form(RotateWithGeometry)
