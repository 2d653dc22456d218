"""The loading transform: any supported input path to ``(image, meta)``, by its reader.

Each input kind is one reader module with ``SUFFIXES`` and ``read(path, options)``
(:mod:`~transforms.io.picture`, :mod:`~transforms.io.slide`); a folder, and any file no
reader claims, is read as DICOM (:mod:`~transforms.io.dicom_series`, which hands
whole-slide images to :mod:`~transforms.io.dicom_wsi`). A new input kind is a new module
and one entry in :data:`READERS`. The metadata is described in :mod:`transforms.io.common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from monai.transforms import MapTransform, Transform

from transforms._dictionary import meta_key
from transforms.errors import InputError
from transforms.io import dicom_series, picture, slide
from transforms.io.common import LoadOptions
from transforms.io.guards import DEFAULT_MAX_VALUES

__all__ = ["LoadInput", "LoadInputd", "READERS"]

#: The readers of files by suffix, tried in order; DICOM reads folders and every other file.
READERS = (picture, slide)


class LoadInput(Transform):
    """Load any supported input path: a DICOM folder or file, a slide, a picture.

    Args:
        series_uid: which series to load from a folder holding several.
        resolution_um: wanted pixel spacing for slides in micrometres (the nearest level is read).
        max_values: most pixel values the input may decode to, checked on its header
            before decoding.
        level: for SVS/TIFF slides, the pyramid level to read (instead of choosing one).
        pixel_size_um: the pixel size of a PNG/JPEG picture in micrometres, which the file
            cannot say; refused for other inputs, which say their own.
        model_scale_um: micrometres per pixel of the model's input: without
            ``resolution_um`` or ``level``, slides are read at a level that suits it.

    Returns ``(image, meta)``; see :mod:`transforms.io.common`.
    """

    def __init__(self, series_uid: str | None = None, resolution_um: float | None = None,
                 max_values: int = DEFAULT_MAX_VALUES, level: int | None = None,
                 pixel_size_um: float | None = None, model_scale_um: float | None = None) -> None:
        if max_values < 1:
            raise ValueError(f"max_values must be positive, got {max_values}")
        self.options = LoadOptions(series_uid, resolution_um, max_values, level, pixel_size_um, model_scale_um)

    def __call__(self, path: str | Path) -> tuple[np.ndarray, dict]:
        path = Path(path)
        if not path.exists():
            raise InputError(path, "no such file or folder")
        reader = dicom_series
        if not path.is_dir():
            reader = next((r for r in READERS if path.suffix.lower() in r.SUFFIXES), dicom_series)
            if self.options.pixel_size_um is not None and reader is not picture:
                raise InputError(path, "a pixel size can be declared for PNG/JPEG pictures only; this input states its "
                                       "own (or reads as unknown)")
        return reader.read(path, self.options)


class LoadInputd(MapTransform):
    """Dictionary form of :class:`LoadInput`: ``data[key]`` (a path) becomes the image,
    its metadata goes to ``data[meta_key(key)]`` (``f"{key}_meta_dict"``)."""

    def __init__(self, keys: str | Sequence[str], series_uid: str | None = None, resolution_um: float | None = None,
                 max_values: int = DEFAULT_MAX_VALUES, level: int | None = None, pixel_size_um: float | None = None,
                 model_scale_um: float | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadInput(series_uid, resolution_um, max_values, level, pixel_size_um, model_scale_um)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], d[meta_key(key)] = self.loader(d[key])
        return d
