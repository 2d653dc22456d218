"""Pictures (PNG, JPEG, BMP): a slide export or any RGB image, with no physical size of its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transforms.errors import InputError
from transforms.io.common import LoadOptions, input_meta, pixel_affine
from transforms.io.guards import DEFAULT_MAX_VALUES, check_size

__all__ = ["read", "load_picture", "SUFFIXES"]

#: The suffixes this reader takes.
SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})


def load_picture(path: Path, max_values: int = DEFAULT_MAX_VALUES, pixel_size_um: float | None = None) -> tuple[np.ndarray, dict]:
    """Read a PNG/JPEG export as RGB.

    A picture carries no physical size: without ``pixel_size_um`` its frame is ``"IMAGE"``
    (pixels); with it, the picture is taken as a slide region of that pixel size (frame
    ``"SLIDE"``, lengths in mm), so tile sizes in micrometres and scale bars work.
    """
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # our own guard below, on the declared size, before decoding
    try:
        with Image.open(path) as picture:
            check_size(path, picture.width * picture.height * 3, "the picture", max_values)
            image = np.asarray(picture if picture.mode == "RGB" else picture.convert("RGB"))  # no second copy
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:  # Pillow's PNG chunk errors are SyntaxError
        raise InputError(path, f"cannot read the picture ({type(error).__name__}: the file is damaged or not an image)") from None
    meta = input_meta("image", "OT", pixel_affine(pixel_size_um / 1000 if pixel_size_um else 1.0),
                      "SLIDE" if pixel_size_um else "IMAGE", path,
                      level0_pixels=((1000.0 / pixel_size_um if pixel_size_um else 1.0,) * 2, 0.5))
    return image[None], meta


def read(path: Path, options: LoadOptions) -> tuple[np.ndarray, dict]:
    """The reader's entry for :class:`~transforms.io.load.LoadInput`: :func:`load_picture`."""
    return load_picture(path, options.max_values, options.pixel_size_um)
