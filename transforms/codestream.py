"""What compressed pixel data declares inside its own codestream, read before any decoder runs.

The DICOM header's Rows and Columns are what the size guard checks, but a decoder
allocates what the codestream says: a 64 x 64 image whose JPEG frame header declares
60000 x 60000 makes the decoder allocate gigabytes. So every frame's own header is read
here (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ, the RLE header) and must agree with the
DICOM header, and an encapsulated Pixel Data may hold no more frames than Number of
Frames says. A deflated dataset is inflated here with a bound, before pydicom inflates
it whole.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from transforms.errors import InputError

__all__ = ["check_codestreams", "check_deflated_size", "codestream_size"]

_JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
         "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}  # JPEG, JPEG lossless, JPEG-LS
_JPEG_2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
              "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}  # JPEG 2000, HTJ2K
_RLE = "1.2.840.10008.1.2.5"
DEFLATED = "1.2.840.10008.1.2.1.99"
#: JPEG start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC) and JPEG-LS's SOF55.
_SOF_MARKERS = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}
#: Markers without a length field.
_STANDALONE = {0x01, *range(0xD0, 0xD9)}
#: Header bytes of a deflated dataset allowed beyond its pixel values.
_HEADER_SLACK = 64 * 1024 * 1024


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) of a JPEG or JPEG-LS frame header, or None."""
    if frame[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(frame):
        if frame[position] != 0xFF:
            return None
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        length = struct.unpack(">H", frame[position + 2 : position + 4])[0]
        if marker in _SOF_MARKERS:
            if position + 10 > len(frame):
                return None
            rows, columns = struct.unpack(">HH", frame[position + 5 : position + 9])
            return rows, columns, frame[position + 9]
        if marker == 0xDA or length < 2:  # scan data before any frame header
            return None
        position += 2 + length
    return None


def _jpeg_2000_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) of a JPEG 2000 codestream's SIZ segment, or None."""
    start = frame.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (a JP2 file wraps the codestream in boxes)
    if start < 0 or start + 42 > len(frame):
        return None
    x_size, y_size, x_offset, y_offset = struct.unpack(">IIII", frame[start + 8 : start + 24])
    components = struct.unpack(">H", frame[start + 40 : start + 42])[0]
    return y_size - y_offset, x_size - x_offset, components


def codestream_size(frame: bytes, transfer_syntax: str) -> tuple[int, int, int] | None:
    """(rows, columns, components) a compressed frame declares; None where the syntax has
    no such header (RLE) or the header cannot be read."""
    if transfer_syntax in _JPEG:
        return _jpeg_size(frame)
    if transfer_syntax in _JPEG_2000:
        return _jpeg_2000_size(frame)
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
            size = codestream_size(frame, transfer_syntax)
            if size is None:
                raise InputError(path, f"frame {index + 1}'s codestream has no readable frame header")
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
