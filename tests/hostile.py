"""Hostile inputs, generated: small files whose headers or codestreams lie, and header
text that would break a console line or alter patient data. Each case names what the
command must do with it."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import tifffile
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGLSLossless, RLELossless)

DATA = Path(__file__).resolve().parent / "data"
#: A string planted in headers: it must never reach the console.
PLANTED = "Zyxwv"


@dataclass
class Case:
    name: str
    path: Path
    expect: str  # "refused": exit 2, one line with ``message``; "kept": exit 0, names exact; "analysed": exit 0
    message: str = ""


def _mono8(size: int = 64) -> np.ndarray:
    ct = pydicom.dcmread(DATA / "CT_small.dcm").pixel_array.astype(np.float32)
    return np.clip((ct - ct.min()) / (np.ptp(ct) or 1) * 255, 0, 255).astype(np.uint8)[:size, :size]


def _base(pixels: np.ndarray) -> pydicom.Dataset:
    ds = pydicom.dcmread(DATA / "CT_small.dcm")
    ds.PatientName = f"{PLANTED}^Test"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _patch(data: bytes, marker: bytes, offset: int, fmt: str, *values: int) -> bytes:
    """``data`` with ``values`` packed at ``offset`` bytes after the first ``marker``."""
    at = data.index(marker) + offset
    packed = struct.pack(fmt, *values)
    return data[:at] + packed + data[at + len(packed):]


def _encapsulated(ds: pydicom.Dataset, frames: list[bytes], syntax: str) -> pydicom.Dataset:
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def jpeg_frame(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_cases(folder: Path) -> list[Case]:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = _mono8()
    cases = []

    def write(name: str, ds: pydicom.Dataset, expect: str, message: str = "") -> None:
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        cases.append(Case(name, path, expect, message))

    # 1. decoder bombs: the codestream declares a size far beyond the DICOM header's
    bomb = _patch(jpeg_frame(pixels), b"\xff\xc0", 5, ">HH", 60000, 60000)
    write("jpeg_sof_bomb", _encapsulated(_base(pixels), [bomb], JPEGBaseline8Bit), "refused", "declares 60000 x 60000")
    ls = _base(pixels)
    ls.compress(JPEGLSLossless)
    frame = next(pydicom.encaps.generate_frames(ls.PixelData, number_of_frames=1))
    write("jpeg_ls_sof55_bomb", _encapsulated(ls, [_patch(frame, b"\xff\xf7", 5, ">HH", 20000, 20000)], JPEGLSLossless),
          "refused", "declares 20000 x 20000")
    j2k = _base(pixels)
    j2k.compress(JPEG2000Lossless)
    frame = next(pydicom.encaps.generate_frames(j2k.PixelData, number_of_frames=1))
    write("j2k_siz_bomb", _encapsulated(j2k, [_patch(frame, b"\xff\x51", 6, ">II", 40000, 40000)], JPEG2000Lossless),
          "refused", "declares 40000 x 40000")
    rle = _base(pixels)
    rle.compress(RLELossless)
    frame = next(pydicom.encaps.generate_frames(rle.PixelData, number_of_frames=1))
    write("rle_segments", _encapsulated(rle, [struct.pack("<I", 15) + frame[4:]], RLELossless), "refused", "15 segments")
    excess = _encapsulated(_base(pixels), [jpeg_frame(pixels)] * 64, JPEGBaseline8Bit)
    excess.NumberOfFrames = 2
    write("excess_frames", excess, "refused", "more frames than Number of Frames")
    # a deflated dataset that inflates far beyond the limit (run with --max-megavalues 1)
    deflated = _base(pixels)
    deflated.add_new(0x00091010, "OB", bytes(80 * 1024 * 1024))  # a private element of zeros
    deflated.add_new(0x00090010, "LO", "HOSTILE")
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write("deflate_bomb", deflated, "refused", "inflates to more than")
    # 2. header text that would break a console line, or be copied into the outputs
    for name, value in [("pn_bel", f"{PLANTED}\x07^Name"), ("pn_crlf", f"{PLANTED}\r\n^Name"),
                        ("pn_escape", f"{PLANTED}\x1b[2J^Name")]:
        ds = _base(pixels)
        ds.PatientName = value
        write(name, ds, "refused", "PatientName holds a control character")
    c1 = _base(pixels)
    c1.SpecificCharacterSet = "ISO_IR 100"
    c1.PatientName = f"{PLANTED}\x9b^Name".encode("latin-1")
    write("pn_c1_byte", c1, "refused", "PatientName holds a control character")
    syntax = _base(pixels)
    hostile_uid = "1.2.840.10008.1.2.4.50\r\n\x1b[2JPatient " + PLANTED
    syntax.PixelData = jpeg_frame(pixels)  # not encapsulated: undecodable
    cases_path = folder / "syntax_injection.dcm"
    # pydicom refuses to write such a UID: the file is written with a valid one, then the
    # file meta group is rebuilt around the hostile value
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, syntax, enforce_file_format=True)
    body = buffer.getvalue()
    group_length = struct.unpack("<I", body[140:144])[0]
    meta_end = 144 + group_length
    uid = hostile_uid.encode("latin-1")
    uid += b"\0" * (len(uid) % 2)
    elements, position = b"", 144
    while position < meta_end:
        tag, vr = body[position:position + 4], body[position + 4:position + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):  # 2 reserved bytes, a 4-byte length
            length = struct.unpack("<I", body[position + 8:position + 12])[0]
            elements += body[position:position + 12 + length]
            position += 12 + length
            continue
        length = struct.unpack("<H", body[position + 6:position + 8])[0]
        value = uid if tag == b"\x02\x00\x10\x00" else body[position + 8:position + 8 + length]  # (0002,0010)
        elements += tag + vr + struct.pack("<H", len(value)) + value
        position += 8 + length
    cases_path.write_bytes(body[:132] + b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(elements)) + elements
                           + body[meta_end:])
    cases.append(Case("syntax_injection", cases_path, "refused", ""))
    bogus = _base(pixels)
    bogus.SpecificCharacterSet = "ISO_IR 999"
    write("bogus_character_set", bogus, "refused", "is not a term DICOM defines")
    missing = _base(pixels)
    del missing.SOPInstanceUID
    write("no_sop_instance_uid", missing, "refused", "lacks SOPInstanceUID")
    # 3. valid non-ASCII names: kept exactly, in the source's character set
    for name, charset, value in [("latin1_name", "ISO_IR 100", "Müller^Jürgen"),
                                 ("utf8_name", "ISO_IR 192", "Müller^Jürgen=山田^太郎"),
                                 ("ir87_name", ["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎")]:
        ds = _base(pixels)
        ds.SpecificCharacterSet = charset
        ds.PatientName = value
        write(name, ds, "kept")
    negative = _base(pixels)
    negative.SliceThickness = "-2.5"
    write("negative_slice_thickness", negative, "kept")  # the PM must not copy it (dciodvfy)
    # 4. slides: a TIFF's own layout (openslide aborts its process on a 2**20 tile side)
    tiff = folder / "small.tif"
    tifffile.imwrite(tiff, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb", compression="zlib")
    for name, values, message in [("tiff_huge_tile", {322: 1 << 20, 323: 1 << 20}, "tiles of 1048576 x 1048576"),
                                  ("tiff_huge_level", {256: 200_000, 257: 200_000}, "smallest level has 40,000,000,000")]:
        path = folder / f"{name}.tif"
        path.write_bytes(_patch_tiff(tiff.read_bytes(), values))
        cases.append(Case(name, path, "refused", message))
    # a single-level 20,480-pixel-square slide: streamed, its thumbnail read in bands
    tile = np.full((256, 256, 3), 235, np.uint8)
    tile[::7] = 120
    single = folder / "single_level_20k.tif"
    tifffile.imwrite(single, (tile for _ in range(80 * 80)), shape=(20480, 20480, 3), dtype=np.uint8, tile=(256, 256),
                     photometric="rgb", compression="zlib")
    cases.append(Case("single_level_20k", single, "analysed"))
    # a 12,000-pixel-square picture of one colour: 450 kB, just under the default guard
    plain = folder / "plain_12000.png"
    Image.new("RGB", (12000, 12000), (230, 200, 220)).save(plain)
    cases.append(Case("plain_12000_png", plain, "analysed"))
    return cases


def _patch_tiff(data: bytes, values: dict[int, int]) -> bytes:
    """A little-endian classic TIFF with the LONG values of tags in its first IFD replaced."""
    raw = bytearray(data)
    ifd = struct.unpack("<I", raw[4:8])[0]
    for index in range(struct.unpack("<H", raw[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * index
        if struct.unpack("<H", raw[entry:entry + 2])[0] in values:
            raw[entry + 8:entry + 12] = struct.pack("<I", values[struct.unpack("<H", raw[entry:entry + 2])[0]])
    return bytes(raw)
