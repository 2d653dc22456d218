"""Pictures for people: the heatmap blended over the image, grid, colour bar and arrow."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dicom_heatmap.heatmap import Heatmap
from dicom_heatmap.spread import SpreadSummary

__all__ = ["colorize", "render_slice", "MAX_SIDE"]

#: Longest side of a rendered picture; larger images are shown downscaled.
MAX_SIDE = 2048
#: Smaller images (a 64 px MR slice) are shown enlarged to this longest side, so that
#: grid, arrow and text stay readable.
MIN_SIDE = 512
#: Colour ramp from 0 (dark blue) over cyan, yellow to 1 (red).
_RAMP = np.array([[0, 0, 140], [0, 120, 255], [0, 230, 230], [255, 230, 0], [255, 60, 0], [180, 0, 0]], dtype=np.float64)
_ALPHA = 0.45
#: The dark label under each tile number.
NUMBER_LABEL = (30, 30, 30)
#: Every blend of a picture value (row) with a heatmap colour value (column), looked up
#: instead of computed per pixel (a 2048 px picture took most of a second in float64).
_BLEND = ((1 - _ALPHA) * np.arange(256.0)[:, None] + _ALPHA * np.arange(256.0)[None, :]).round().astype(np.uint8)


def colorize(values: np.ndarray) -> np.ndarray:
    """uint8 RGB of values in [0, 1] on the ramp (NaN gives black)."""
    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0, 1) * (len(_RAMP) - 1)
    low = np.floor(values).astype(int).clip(0, len(_RAMP) - 2)
    fraction = (values - low)[..., None]
    return ((1 - fraction) * _RAMP[low] + fraction * _RAMP[low + 1]).round().astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without scalable default font
        return ImageFont.load_default()


def _wrap(text: str, font: ImageFont.ImageFont, width: float) -> list[str]:
    """Break ``text`` at spaces into lines no wider than ``width`` pixels."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line]


def _scale_bar_length(pixel_mm: float, picture_width: int) -> tuple[float, str]:
    """A round length (1, 2 or 5 times a power of ten) near a fifth of the picture, in
    picture pixels, and its label."""
    target_mm = picture_width * pixel_mm / 5
    exponent = math.floor(math.log10(target_mm))
    mm = max(m * 10.0 ** exponent for m in (1, 2, 5) if m * 10.0 ** exponent <= target_mm)
    label = f"{mm:g} mm" if mm >= 1 else f"{mm * 1000:g} um"  # the built-in font has no µ
    return mm / pixel_mm, label


def render_slice(image, heatmap: Heatmap, summary: SpreadSummary, slice_index: int, caption: str,
                 pixel_mm: float | None = None) -> tuple[np.ndarray, float]:
    """The Secondary Capture picture of one slice.

    Args:
        image: (rows, cols, 3) uint8 slice the grid was laid on, or a streamed slide
            (anything with ``thumbnail(max_side)``), which is shown from its thumbnail.
        heatmap: the scores.
        summary: the spread summary (its arrow is drawn on the focus slice; other slices
            name the direction in the caption only).
        slice_index: which slice of the heatmap.
        caption: one line of text under the picture.
        pixel_mm: the image's pixel spacing along its columns in mm, when known: a scale
            bar is drawn.

    Returns:
        the picture (rows', cols' + colour bar, 3) uint8 and the scale applied to the image.
    """
    if hasattr(image, "thumbnail"):
        thumbnail, scale = image.thumbnail(MAX_SIDE)
        picture = Image.fromarray(thumbnail)
    else:
        height, width = image.shape[:2]
        scale = min(1.0, MAX_SIDE / max(height, width))
        if max(height, width) < MIN_SIDE:
            scale = float(MIN_SIDE // max(height, width))  # whole pixels, shown as blocks
        picture = Image.fromarray(image)
        if scale != 1.0:
            resample = Image.NEAREST if scale > 1 else Image.BILINEAR
            picture = picture.resize((max(1, round(width * scale)), max(1, round(height * scale))), resample)
    # tiles are upsampled by nearest neighbour onto the picture: one colour per tile
    scores = heatmap.scores[slice_index]
    analysed = np.isfinite(scores)
    grid = heatmap.grid
    rows = np.searchsorted(grid.row_edges[1:], (np.arange(picture.height) + 0.5) / scale, side="right").clip(0, scores.shape[0] - 1)
    cols = np.searchsorted(grid.col_edges[1:], (np.arange(picture.width) + 0.5) / scale, side="right").clip(0, scores.shape[1] - 1)
    colours = colorize(scores)[rows][:, cols]
    mask = analysed[rows][:, cols][..., None]
    base = np.asarray(picture)
    blended = np.where(mask, _BLEND[base, colours], base)

    unit = max(12, round(min(picture.width, picture.height) / 40))
    bar_width = 5 * unit
    font = _font(unit)
    lines = _wrap(caption, font, picture.width + bar_width - unit)
    caption_height = round((len(lines) + 0.6) * unit * 1.25)
    canvas = Image.new("RGB", (picture.width + bar_width, picture.height + caption_height), (0, 0, 0))
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for edge in grid.row_edges[1:-1]:
        draw.line([(0, edge * scale), (picture.width - 1, edge * scale)], fill=(255, 255, 255), width=1)
    for edge in grid.col_edges[1:-1]:
        draw.line([(edge * scale, 0), (edge * scale, picture.height - 1)], fill=(255, 255, 255), width=1)
    _draw_tile_numbers(draw, grid, slice_index, scale, unit)

    # colour bar: 1 at the top, 0 at the bottom, under its title
    title_font = _font(max(10, round(unit * 0.8)))
    for index, word in enumerate(("tumour", "score")):
        draw.text((picture.width + unit // 2, unit // 3 + index * unit), word, fill=(255, 255, 255), font=title_font)
    top, bottom = 3 * unit, picture.height - unit
    if bottom - top >= 2 * unit:
        ramp = colorize(np.linspace(1, 0, bottom - top))
        bar = np.repeat(ramp[:, None, :], unit, axis=1)
        canvas.paste(Image.fromarray(bar), (picture.width + unit, top))
        for value in (1.0, 0.5, 0.0):
            y = top + (1 - value) * (bottom - top - 1)
            draw.text((picture.width + 2.2 * unit, y - unit / 2), f"{value:.1f}", fill=(255, 255, 255), font=font)
    if pixel_mm:
        _draw_scale_bar(draw, pixel_mm / scale, picture.size, unit, font)

    if summary.directed and summary.focus_index is not None and summary.focus_index[0] == slice_index:
        _draw_arrow(draw, heatmap, summary, scale, unit, picture.size)
    for index, line in enumerate(lines):
        draw.text((unit // 2, picture.height + unit // 3 + index * unit * 1.25), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas), scale


def _draw_tile_numbers(draw: ImageDraw.ImageDraw, grid, slice_index: int, scale: float, unit: int) -> None:
    """Each tile's number (the method's S2) in its corner, where the tiles are large enough
    on screen to carry it without covering much of the tile."""
    font = _font(max(9, round(unit * 0.6)))
    width = np.diff(grid.col_edges).min() * scale
    height = np.diff(grid.row_edges).min() * scale
    widest = font.getlength(str(int(grid.number(slice_index, len(grid.row_edges) - 2, len(grid.col_edges) - 2))))
    if width < 3 * widest or height < 3 * unit * 0.6:
        return
    for row in range(len(grid.row_edges) - 1):
        for col in range(len(grid.col_edges) - 1):
            number = int(grid.number(slice_index, row, col))
            corner = (grid.col_edges[col] * scale + 3, grid.row_edges[row] * scale + 2)
            # white on a dark label: legible on white glass, bright tissue and red tiles alike
            left, top, right, bottom = draw.textbbox(corner, str(number), font=font)
            draw.rectangle((left - 2, top - 1, right + 1, bottom + 1), fill=NUMBER_LABEL)
            draw.text(corner, str(number), fill=(255, 255, 255), font=font)


def _draw_scale_bar(draw: ImageDraw.ImageDraw, picture_pixel_mm: float, picture_size: tuple[int, int], unit: int,
                    font: ImageFont.ImageFont) -> None:
    """A bar of a round length in the picture's lower left corner, labelled."""
    length, label = _scale_bar_length(picture_pixel_mm, picture_size[0])
    left, y = unit, picture_size[1] - unit
    draw.rectangle([left - 2, y - 2, left + length + 2, y + max(3, unit // 4) + 2], fill=(0, 0, 0))
    draw.rectangle([left, y, left + length, y + max(3, unit // 4)], fill=(255, 255, 255))
    draw.text((left, y - 1.3 * unit), label, fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))


def _draw_arrow(draw: ImageDraw.ImageDraw, heatmap: Heatmap, summary: SpreadSummary, scale: float, unit: int,
                picture_size: tuple[int, int]) -> None:
    """Arrow from the focus tile along the in-plane direction, as far as the lesion reaches."""
    _, row, col = summary.focus_index
    grid = heatmap.grid
    start = np.array([(grid.col_edges[col] + grid.col_edges[col + 1]) / 2, (grid.row_edges[row] + grid.row_edges[row + 1]) / 2]) * scale
    direction = np.array([summary.direction_image[2], summary.direction_image[1]])  # (x, y) on screen
    if np.linalg.norm(direction) < 1e-6:
        return  # purely through-plane: the caption says it
    direction /= np.linalg.norm(direction)
    tile = np.array([np.diff(grid.col_edges).mean(), np.diff(grid.row_edges).mean()]) * scale
    # the summary's reach is in frame units along the direction; one tile step along
    # the in-plane direction covers |tile_affine @ step| of them
    step = np.array([0.0, direction[1], direction[0]])
    reach_tiles = max(summary.reach / np.linalg.norm(heatmap.tile_affine[:3, :3] @ step), 1.0)
    vector = direction * tile * reach_tiles  # on screen: tiles may be wider than high
    length = float(np.linalg.norm(vector))
    direction = vector / length
    # keep the arrow inside the picture
    limits = np.array(picture_size, dtype=float) - 1
    for axis in range(2):
        if direction[axis] > 1e-9:
            length = min(length, (limits[axis] - start[axis]) / direction[axis])
        elif direction[axis] < -1e-9:
            length = min(length, -start[axis] / direction[axis])
    end = start + direction * max(length, 0.0)
    width = max(2, unit // 4)
    draw.line([tuple(start), tuple(end)], fill=(255, 255, 255), width=width + 2)
    draw.line([tuple(start), tuple(end)], fill=(0, 0, 0), width=width)
    head = 1.2 * unit
    angle = math.atan2(direction[1], direction[0])
    points = [tuple(end)] + [
        (end[0] - head * math.cos(angle + s * 0.45), end[1] - head * math.sin(angle + s * 0.45)) for s in (-1, 1)
    ]
    draw.polygon(points, fill=(0, 0, 0), outline=(255, 255, 255))
