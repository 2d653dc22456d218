"""The size guards: what an input will decode to, judged before any decoder runs.

- The declared size: the pixel values a header announces (rows x columns x samples x
  frames, or a slide level's matrix) against the limit ``max_values``
  (:data:`DEFAULT_MAX_VALUES` unless the caller gives another), :func:`check_size`.
- The codestream: the DICOM header's Rows and Columns are what the size guard checks, but a decoder
allocates what the codestream says: a 64 x 64 image whose JPEG frame header declares
60000 x 60000 makes the decoder allocate gigabytes. So every frame's own header is read
here (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ, the RLE header) and must agree with the
DICOM header, and an encapsulated Pixel Data may hold no more frames than Number of
Frames says. A deflated dataset is inflated here with a bound, before pydicom inflates
it whole.
- The TIFF layout: a slide's tiles or strips, and its smallest level, must be of a size a
  reader can hold (:func:`check_tiff_layout`), before openslide opens it.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import DeflatedExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage

from transforms.errors import InputError

__all__ = ["DEFAULT_MAX_VALUES", "MAX_PIECE_PIXELS", "STREAMED_LEVEL_FACTOR", "check_size", "declared_values",
           "check_codestreams", "check_deflated_size", "codestream_sizes", "deflated_body_offset", "check_tiff_layout"]

#: Most pixel values (pixels x samples x frames) an input may decode to by default - the
#: ``--max-megavalues`` default of 512 million, for every entry point (CLI, bundle, API, PACS
#: job). Checked from the header before any pixel data is decoded: a decompression bomb or a
#: header claiming 100,000 x 100,000 x 1,000 is refused, not attempted.
DEFAULT_MAX_VALUES = 512_000_000
#: Most pixels of one TIFF tile or strip (a reader decodes one whole).
MAX_PIECE_PIXELS = 64 * 1024 * 1024
#: A slide whose smallest level has more pixels than this times the size guard is refused:
#: its tissue map would read that whole level, band by band.
STREAMED_LEVEL_FACTOR = 4


def check_size(source: Path, values: int, what: str, limit: int) -> None:
    """Refuse ``what`` of ``source`` when it would decode to more than ``limit`` values."""
    if values > limit:
        raise InputError(source, f"{what} would decode to {values:,} values, more than the limit of {limit:,}; "
                                 "raise the limit (--max-megavalues) only if the machine has the memory")


def declared_values(ds: Dataset, path: Path) -> int:
    """Pixel values decoding will produce, from the header: rows x columns x samples x frames;
    for a whole-slide image, whose frames are decoded one at a time into its total pixel
    matrix, the matrix as allocated (whole frames across and down, 3 samples) and one frame.
    Whatever the header claims of the matrix, a frame larger than it counts in full."""
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if ds.get("SOPClassUID") == VLWholeSlideMicroscopyImageStorage and "TotalPixelMatrixRows" in ds:
            total_rows, total_cols = int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns)
            if rows < 1 or columns < 1:  # no frame size (refused when read): the matrix at least
                return total_rows * total_cols * 3
            down, across = -(-total_rows // rows), -(-total_cols // columns)
            return down * rows * across * columns * 3 + rows * columns * samples
    except (TypeError, ValueError):
        raise InputError(path, "Rows, Columns, Samples per Pixel, Number of Frames or Total Pixel Matrix size is not "
                               "a number") from None
    return rows * columns * samples * frames


_JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
         "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}  # JPEG, JPEG lossless, JPEG-LS
_JPEG_2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
              "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}  # JPEG 2000, HTJ2K
_RLE = "1.2.840.10008.1.2.5"
#: JPEG start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC), JPEG-LS's SOF55, and the
#: hierarchical mode's DHP, which declares the size of the whole image the same way.
_SIZE_MARKERS = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7, 0xDE}
#: Markers without a length field.
_STANDALONE = {0x01, *range(0xD0, 0xD9)}
_SOS, _EOI = 0xDA, 0xD9
#: Header bytes of a deflated dataset allowed beyond its pixel values.
_HEADER_SLACK = 64 * 1024 * 1024


def _next_marker(frame: bytes, position: int) -> int:
    """Where the entropy-coded data starting at ``position`` ends: the next 0xFF followed by
    a marker code (0xC0 or above, not a restart marker). A stuffed 0xFF 0x00 (JPEG) or 0xFF
    followed by a byte below 0x80 (JPEG-LS bit stuffing) is data."""
    while True:
        found = frame.find(b"\xff", position)
        if found < 0 or found + 1 >= len(frame):
            return len(frame)
        code = frame[found + 1]
        if code >= 0xC0 and not 0xD0 <= code <= 0xD7 and code != 0xFF:
            return found
        position = found + 1


def _jpeg_sizes(frame: bytes) -> list[tuple[int, int, int]] | None:
    """(rows, columns, components) of every frame header of a JPEG or JPEG-LS codestream -
    each SOF, and a hierarchical codestream's DHP - read in order as a decoder meets them,
    scans skipped; None where the marker structure cannot be followed."""
    if frame[:2] != b"\xff\xd8":
        return None
    sizes, position = [], 2
    while position + 4 <= len(frame):
        if frame[position] != 0xFF:
            return None
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == _EOI:
            break
        if marker in _STANDALONE:
            position += 2
            continue
        length = struct.unpack(">H", frame[position + 2 : position + 4])[0]
        if length < 2 or position + 2 + length > len(frame):
            return None
        if marker in _SIZE_MARKERS:
            if length < 8:
                return None
            rows, columns = struct.unpack(">HH", frame[position + 5 : position + 9])
            sizes.append((rows, columns, frame[position + 9]))
        position += 2 + length
        if marker == _SOS:
            position = _next_marker(frame, position)
    return sizes or None


def _jpeg_2000_codestream(frame: bytes) -> bytes | None:
    """The codestream of a raw JPEG 2000 frame, or of a JP2 file's one ``jp2c`` box (its
    other boxes - XML, UUID - may hold anything, a decoy SIZ included); None where there is
    no codestream or more than one."""
    if frame[:4] == b"\xff\x4f\xff\x51":  # SOC, SIZ
        return frame
    if frame[4:8] != b"jP  ":
        return None
    codestream, position = None, 0
    while position + 8 <= len(frame):
        length, kind = struct.unpack(">I4s", frame[position : position + 8])
        header = 8
        if length == 1:  # a 64-bit length follows
            if position + 16 > len(frame):
                return None
            length, header = struct.unpack(">Q", frame[position + 8 : position + 16])[0], 16
        elif length == 0:  # the last box runs to the end
            length = len(frame) - position
        if length < header or position + length > len(frame):
            return None
        if kind == b"jp2c":
            if codestream is not None:
                return None
            codestream = frame[position + header : position + length]
        position += length
    return codestream if codestream is not None and codestream[:4] == b"\xff\x4f\xff\x51" else None


def _jpeg_2000_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) of a JPEG 2000 codestream's SIZ segment, or None."""
    codestream = _jpeg_2000_codestream(frame)
    if codestream is None or len(codestream) < 42:
        return None
    x_size, y_size, x_offset, y_offset = struct.unpack(">IIII", codestream[8:24])
    components = struct.unpack(">H", codestream[40:42])[0]
    return y_size - y_offset, x_size - x_offset, components


def codestream_sizes(frame: bytes, transfer_syntax: str) -> list[tuple[int, int, int]] | None:
    """(rows, columns, components) of every image a compressed frame declares, parsed as the
    decoder will read it; None where the syntax has no such header (RLE) or the headers
    cannot be followed."""
    if transfer_syntax in _JPEG:
        return _jpeg_sizes(frame)
    if transfer_syntax in _JPEG_2000:
        size = _jpeg_2000_size(frame)
        return None if size is None else [size]
    return None


def check_codestreams(ds: Dataset, path: Path) -> None:
    """Refuse compressed pixel data whose frames declare another size than the header, or
    that holds more frames than Number of Frames; nothing is decoded.

    Args:
        ds: the dataset, Pixel Data read but not decoded.
        path: the file, for messages.
    """
    transfer_syntax = str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))
    if "PixelData" not in ds or not (transfer_syntax in _JPEG or transfer_syntax in _JPEG_2000 or transfer_syntax == _RLE):
        return
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bytes_per_sample = max(1, -(-int(ds.get("BitsAllocated", 8) or 8) // 8))
    try:
        for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
            if index >= frames:
                raise InputError(path, f"the compressed pixel data holds more frames than Number of Frames ({frames})")
            if transfer_syntax == _RLE:
                segments = struct.unpack("<I", frame[:4])[0] if len(frame) >= 64 else -1
                if segments != samples * bytes_per_sample:
                    raise InputError(path, f"RLE frame {index + 1} has {segments} segments; the header's samples and "
                                           f"bits need {samples * bytes_per_sample}")
                continue
            sizes = codestream_sizes(frame, transfer_syntax)
            if sizes is None:
                raise InputError(path, f"frame {index + 1}'s codestream has no frame header that can be read and sized; "
                                       "refused before decoding")
            for size in sizes:
                if size[:2] != (rows, columns) or size[2] not in (samples, 1 if samples == 3 else samples):
                    raise InputError(path, f"frame {index + 1}'s codestream declares {size[1]} x {size[0]} pixels of "
                                           f"{size[2]} components, the DICOM header {columns} x {rows} of {samples}; "
                                           "refused before decoding")
    except InputError:
        raise
    except Exception as error:  # pydicom on a damaged item structure
        raise InputError(path, f"the compressed pixel data is damaged ({type(error).__name__})") from None


def check_deflated_size(path: Path, offset: int, max_values: int) -> None:
    """Inflate a deflated dataset's body in chunks and refuse it once it exceeds what
    ``max_values`` pixel values (2 bytes each) and a header could take.

    Args:
        path: the file.
        offset: where the deflated body starts (after the file meta information).
        max_values: the size guard.
    """
    limit = 2 * max_values + _HEADER_SLACK
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as stream:
        stream.seek(offset)
        while chunk := stream.read(1 << 20):
            try:
                total += len(inflater.decompress(chunk, limit + 1 - total))
                while inflater.unconsumed_tail and total <= limit:
                    total += len(inflater.decompress(inflater.unconsumed_tail, limit + 1 - total))
            except zlib.error:
                raise InputError(path, "the deflated dataset is damaged") from None
            if total > limit:
                raise InputError(path, f"the deflated dataset inflates to more than {limit:,} bytes, beyond the size "
                                       "limit; raise it (--max-megavalues) only if the machine has the memory")


def deflated_body_offset(path: Path) -> int | None:
    """Where the body of a deflated DICOM file starts; None for any other file."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        if str(meta.get("TransferSyntaxUID", "")) != DeflatedExplicitVRLittleEndian:
            return None
        return 132 + 12 + int(meta.FileMetaInformationGroupLength)  # preamble, DICM, the group length element
    except Exception:  # not DICOM, or no group length: pydicom's own reading judges it
        return None


def check_tiff_layout(path: Path, max_values: int) -> None:
    """Refuse a TIFF-based slide whose tiles or strips, or whose smallest level, no reader
    could hold, before openslide opens it (a tile side of 2**20 aborts openslide's
    process; a 200,000-pixel-square level without a smaller one cannot be mapped)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            pages = [(page.imagewidth, page.imagelength, page.tilewidth, page.tilelength, page.rowsperstrip)
                     for page in tiff.pages]
    except Exception:  # not a TIFF (another openslide format), or damaged: openslide judges it
        return
    for index, (width, length, tile_width, tile_length, rows_per_strip) in enumerate(pages):
        piece = tile_width * tile_length if tile_width else width * min(rows_per_strip or length, length)
        if piece > MAX_PIECE_PIXELS:
            what = f"tiles of {tile_width} x {tile_length}" if tile_width else f"strips of {width} x {rows_per_strip}"
            raise InputError(path, f"TIFF page {index} has {what} pixels, more than any reader can hold at once "
                                   f"({MAX_PIECE_PIXELS:,}); refused before reading")
    smallest = min((width * length for width, length, *_ in pages), default=0)
    if smallest > STREAMED_LEVEL_FACTOR * max_values:
        raise InputError(path, f"the slide's smallest level has {smallest:,} pixels and no smaller level to map its "
                               "tissue from; raise the limit (--max-megavalues) only if you can wait for it to be read")
