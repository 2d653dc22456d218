"""Slides that openslide reads (SVS, TIFF, NDPI, ...): one pyramid level, small ones whole,
large ones streamed tile by tile (:class:`StreamedSlide`).

:func:`load_slide` checks the TIFF layout (:func:`transforms.io.guards.check_tiff_layout`)
before openslide opens the file, chooses the level (the one asked for, the one nearest a
resolution, or the one the model's scale suits) and gives it in slide coordinates when the
slide states its pixel size (see :mod:`transforms.io.common`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from transforms.errors import InputError
from transforms.io.common import DEFAULT_SLIDE_SIDE, LoadOptions, input_meta, model_suited_level, pixel_affine, positive_number
from transforms.io.guards import DEFAULT_MAX_VALUES, check_size, check_tiff_layout

__all__ = ["read", "load_slide", "StreamedSlide", "SUFFIXES", "STREAM_ABOVE_PIXELS", "BAND_PIXELS"]

#: The suffixes this reader takes.
SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".mrxs", ".bif", ".vms"})
#: Plausible pixel size a slide may state (openslide's ``mpp-x``), in micrometres.
MPP_RANGE_UM = (0.01, 10_000.0)

log = logging.getLogger("openslide")


@contextlib.contextmanager
def _native_output_logged() -> Iterator[None]:
    """What openslide's C code prints to the process's stderr (GLib warnings such as
    "Downsampled images not correctly ordered") goes to the log at debug level, which
    ``--debug`` shows, instead of the user's console: the command's own line says what
    is wrong."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    log.debug("%s", line)


def _open_slide(path: Path):
    """openslide's handle of ``path``, its native console output logged."""
    import openslide

    try:
        with _native_output_logged():
            return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as error:
        raise InputError(path, f"cannot open the slide ({error})") from None


def _base_spacing_mm(properties, path: Path) -> float | None:
    """The full-resolution level's pixel size in mm, from openslide's ``mpp-x``; None where the
    slide does not state it. A stated value that is no plausible size is refused."""
    import openslide

    mpp = properties.get(openslide.PROPERTY_NAME_MPP_X)
    if not mpp:
        return None
    return positive_number(mpp, path, "the pixel size the slide states (openslide.mpp-x, um)", *MPP_RANGE_UM) / 1000

#: Slide levels of more pixels than this are streamed tile by tile instead of read whole.
STREAM_ABOVE_PIXELS = 64 * 1024 * 1024
#: Pixels of one band when a level with no small level is thumbnailed by streaming.
BAND_PIXELS = 16 * 1024 * 1024

#: Widest region (pixels of the level read) that adjacent tiles are read together in.
_LONGEST_READ = 4096


@dataclass
class _SideBySideRead:
    """Boxes side by side in one row, read in one call at ``level`` (``factor`` times coarser
    than the streamed level); ``members`` are (index of the box, its left, its right)."""

    level: int
    factor: float
    top: int
    bottom: int
    left: int
    right: int
    members: list[tuple[int, int, int]]


class StreamedSlide:
    """One level of a slide read tile by tile with openslide, never whole.

    It stands in for the (1, rows, cols, 3) uint8 array the loaders give: ``shape``,
    ``dtype`` and indexing ``[0, top:bottom, left:right]`` read just that region;
    :meth:`thumbnail` gives a small picture of the whole level (from the slide's own
    pyramid) for the tissue map and the Secondary Capture.

    Args:
        path: the slide file.
        level: the pyramid level.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, path: Path, level: int) -> None:
        self.path, self.level = Path(path), level
        self._slide = _open_slide(self.path)
        width, height = self._slide.level_dimensions[level]
        self.shape = (1, height, width, 3)
        self._downsamples = tuple(self._slide.level_downsamples)  # openslide makes the tuple anew on each access
        self._thumbnails: dict[int, tuple[np.ndarray, float]] = {}

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, int) or not (isinstance(key, tuple) and len(key) == 3 and key[0] == 0):
            raise TypeError("a streamed slide is read as [0, rows, cols] regions only")
        rows, cols = key[1], key[2]
        top, bottom = rows.start or 0, rows.stop if rows.stop is not None else self.shape[1]
        left, right = cols.start or 0, cols.stop if cols.stop is not None else self.shape[2]
        return self._read(self.level, left, top, right - left, bottom - top)

    def regions(self, boxes: Sequence[tuple[int, int, int, int]], min_side: int) -> list[np.ndarray]:
        """The regions ``[top:bottom, left:right]`` of this level, one per box, each read from
        the coarsest level of the slide's pyramid that still gives it at least ``min_side``
        pixels a side - a tile that will be shrunk for the network need not be read at full
        resolution.

        Boxes that follow each other side by side (same rows, each starting where the one
        before ends, as the tiles of a grid row do) are read in one call and cut apart:
        an openslide call costs more than the pixels it returns.
        """
        runs: list[_SideBySideRead] = []
        for index, (top, left, bottom, right) in enumerate(boxes):
            level, factor = self._coarsest_level(min(bottom - top, right - left), min_side)
            run = runs[-1] if runs else None
            if (run is not None and (run.level, run.top, run.bottom, run.right) == (level, top, bottom, left)
                    and (right - run.left) / factor <= _LONGEST_READ):
                run.right = right
                run.members.append((index, left, right))
            else:
                runs.append(_SideBySideRead(level, factor, top, bottom, left, right, [(index, left, right)]))
        pieces: list[np.ndarray] = [np.empty(0)] * len(boxes)
        for run in runs:
            # Cut on the read level's own pixel lattice: openslide resamples a region that
            # starts between two of its pixels (measured three times slower per tile).
            x0, y0 = round(run.left / run.factor), round(run.top / run.factor)
            width = max(1, round(run.right / run.factor) - x0)
            height = max(1, round(run.bottom / run.factor) - y0)
            pixels = self._read(run.level, x0, y0, width, height)
            for index, left, right in run.members:
                start = min(round(left / run.factor) - x0, width - 1)
                stop = max(round(right / run.factor) - x0, start + 1)
                pieces[index] = pixels[:, start:stop]
        return pieces

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 pixels of pyramid ``level`` from its pixel (x, y)."""
        import openslide

        downsample = self._downsamples[level]
        location = (int(round(x * downsample)), int(round(y * downsample)))  # openslide wants level-0 pixels
        try:
            region = self._slide.read_region(location, level, (width, height))
        except openslide.OpenSlideError as error:
            raise InputError(self.path, f"cannot read a region of level {level} ({error})") from None
        return np.asarray(region.convert("RGB"))

    def _coarsest_level(self, side: int, min_side: int) -> tuple[int, float]:
        """The coarsest pyramid level (and its downsample relative to this one) at which
        ``side`` pixels of this level are still at least ``min_side``."""
        best, best_factor = self.level, 1.0
        for level, downsample in enumerate(self._downsamples):
            factor = downsample / self._downsamples[self.level]
            if factor > best_factor and side / factor >= min_side:
                best, best_factor = level, factor
        return best, best_factor

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """(rows', cols', 3) uint8 picture of the level no larger than ``max_side``, and its scale.

        Kept once made: the tissue map and the rendered heatmap ask for the same one, and
        making it reads a whole pyramid level (about a second on a 40k slide).
        """
        if max_side not in self._thumbnails:
            height, width = self.shape[1:3]
            scale = min(1.0, max_side / max(height, width))
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            source = self._slide.get_best_level_for_downsample(self._downsamples[self.level] / scale)
            source_width, source_height = self._slide.level_dimensions[source]
            if source_width * source_height <= STREAM_ABOVE_PIXELS:
                picture = np.asarray(self._slide.get_thumbnail(size).convert("RGB").resize(size))
            else:  # no small level: openslide would hold the whole level; read it in bands instead
                picture = self._banded_thumbnail(source, size)
            picture.flags.writeable = False
            self._thumbnails[max_side] = (picture, picture.shape[0] / height)
        return self._thumbnails[max_side]

    def _banded_thumbnail(self, level: int, size: tuple[int, int]) -> np.ndarray:
        """A ``size`` picture of pyramid ``level`` read in bands of rows, each shrunk before
        the next is read: memory stays at one band however large the level."""
        from PIL import Image

        width, height = self._slide.level_dimensions[level]
        band = max(1, BAND_PIXELS // width)
        rows = []
        for top in range(0, height, band):
            rows_here = min(band, height - top)
            pixels = self._read(level, 0, top, width, rows_here)
            out_top, out_bottom = round(top * size[1] / height), round((top + rows_here) * size[1] / height)
            if out_bottom > out_top:
                rows.append(np.asarray(Image.fromarray(pixels).resize((size[0], out_bottom - out_top), Image.BOX)))
        return np.concatenate(rows)


def load_slide(path: Path, resolution_um: float | None = None, max_values: int = DEFAULT_MAX_VALUES,
               stream_above: int | None = None, level: int | None = None,
               model_scale_um: float | None = None) -> tuple[np.ndarray | StreamedSlide, dict]:
    """Read one level of an SVS/TIFF slide with openslide; large levels are streamed.

    Args:
        resolution_um: wanted pixel spacing in micrometres; the level closest to it is read. By default
            the level ``model_scale_um`` suits, or else the finest level whose larger side is at
            most 4096 pixels.
        max_values: the size guard for a level read whole.
        stream_above: a level of more pixels is returned as a :class:`StreamedSlide`
            (default :data:`STREAM_ABOVE_PIXELS`).
        level: read this pyramid level (0 = full resolution) instead of choosing one.
        model_scale_um: micrometres per pixel of the model's input. Without ``resolution_um``
            or ``level``, a slide that states its pixel size is read at the coarsest level
            not much coarser than this (see :data:`MODEL_SCALE_SLACK`), so that the model's
            patches keep their detail.
    """
    import openslide

    check_tiff_layout(path, max_values)
    slide = _open_slide(path)
    with slide:
        quickhash = slide.properties.get("openslide.quickhash-1")
        base_mm = _base_spacing_mm(slide.properties, path)
        downsamples = slide.level_downsamples
        if level is not None:
            if not 0 <= level < slide.level_count:
                raise InputError(path, f"the slide has levels 0..{slide.level_count - 1}, not {level}")
        elif resolution_um is not None and base_mm:
            level = int(np.argmin([abs(np.log(base_mm * 1000 * d / resolution_um)) for d in downsamples]))
        elif model_scale_um is not None and base_mm:
            level = model_suited_level([base_mm * 1000 * d for d in downsamples], model_scale_um)
        else:
            fitting = [i for i, (w, h) in enumerate(slide.level_dimensions) if max(w, h) <= DEFAULT_SLIDE_SIDE]
            level = fitting[0] if fitting else slide.level_count - 1
        width, height = slide.level_dimensions[level]
        spacing = base_mm * downsamples[level] if base_mm else None
        if width * height > (STREAM_ABOVE_PIXELS if stream_above is None else stream_above):
            region = None
        else:
            check_size(path, width * height * 3, f"level {level} of the slide", max_values)
            try:
                region = np.asarray(slide.read_region((0, 0), level, (width, height)).convert("RGB"))[None]
            except openslide.OpenSlideError as error:
                raise InputError(path, f"cannot read level {level} of the slide ({error})") from None
    meta = input_meta(
        "slide", "SM", pixel_affine(spacing or 1.0), "SLIDE" if spacing else "IMAGE", path,
        # level-0 pixels per frame unit (mm, or pixels of this level), centres half a pixel in
        level0_pixels=((1.0 / base_mm if spacing else downsamples[level],) * 2, 0.5 * downsamples[level]),
        content_key=f"openslide-quickhash-1:{quickhash}" if quickhash else None,
    )
    return (StreamedSlide(path, level) if region is None else region), meta


def read(path: Path, options: LoadOptions) -> tuple[np.ndarray | StreamedSlide, dict]:
    """The reader's entry for :class:`~transforms.io.load.LoadInput`: :func:`load_slide`."""
    return load_slide(path, options.resolution_um, options.max_values, level=options.level,
                      model_scale_um=options.model_scale_um)
