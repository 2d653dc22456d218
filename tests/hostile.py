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
    options: tuple[str, ...] = ()  # options of the analyze command beside the input


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

    def write(name: str, ds: pydicom.Dataset, expect: str, message: str = "", options: tuple[str, ...] = ()) -> None:
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        cases.append(Case(name, path, expect, message, options))

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
    write("deflate_bomb", deflated, "refused", "inflates to more than", ("--max-megavalues", "1"))
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
                                 ("ir87_name", ["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),
                                 # PS3.5 J.3's example: GB2312 designated into G1 by ESC $ ) A
                                 ("ir58_name", ["", "ISO 2022 IR 58"], b"Zhang^XiaoDong=\x1b$)A\xd5\xc5^\xd0\xa1\xb6\xab=")]:
        ds = _base(pixels)
        ds.SpecificCharacterSet = charset
        ds.PatientName = value
        write(name, ds, "kept")
    negative = _base(pixels)
    negative.SliceThickness = "-2.5"
    write("negative_slice_thickness", negative, "kept")  # the PM must not copy it (dciodvfy)
    _whole_slide_cases(write)
    _decoy_cases(pixels, write)
    cases += _console_and_work_cases(folder)
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


def _wsi(change) -> pydicom.Dataset:
    """The embedded DICOM whole-slide image, with ``change`` applied to its header."""
    ds = pydicom.dcmread(DATA / "wsi_lymph_node.dcm")
    ds.PatientName = f"{PLANTED}^Test"
    change(ds)
    return ds


def _whole_slide_cases(write) -> None:
    """What a DICOM whole-slide image's decoder will produce, whatever its matrix claims, and
    the header numbers its geometry is computed from."""
    def tile_bomb(ds):  # one 24000-pixel-square frame (its codestream agrees) in a 64-pixel matrix
        ds.Rows = ds.Columns = 24000
        ds.TotalPixelMatrixRows = ds.TotalPixelMatrixColumns = 64
        ds.NumberOfFrames = 1
        frame = _patch(jpeg_frame(np.full((64, 64, 3), 200, np.uint8)), b"\xff\xc0", 5, ">HH", 24000, 24000)
        _encapsulated(ds, [frame], JPEGBaseline8Bit)

    def frame_flood(ds):  # 20,000 frames of 256 x 256 (3.9 G values) for a 64-pixel matrix
        ds.TotalPixelMatrixRows = ds.TotalPixelMatrixColumns = 64
        ds.NumberOfFrames = 20000
        _encapsulated(ds, [jpeg_frame(np.full((256, 256, 3), 200, np.uint8))] * 20000, JPEGBaseline8Bit)

    def spacing(values):
        def change(ds):
            ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = values
        return change

    write("wsi_tile_bomb", _wsi(tile_bomb), "refused", "would decode to")
    write("wsi_frame_flood", _wsi(frame_flood), "analysed")  # only the one frame the matrix needs is decoded
    with pydicom.config.disable_value_validation():
        for name, values in [("wsi_zero_spacing", [0, 0]), ("wsi_nan_spacing", ["NaN", "NaN"]),
                             ("wsi_infinite_spacing", ["inf", "1"])]:
            write(name, _wsi(spacing(values)), "refused", "Pixel Spacing (mm) must be a finite number")


def _decoy_cases(pixels: np.ndarray, write) -> None:
    """Codestreams whose first or most visible size is honest while the one the decoder uses is not."""
    j2k = _base(pixels)
    j2k.compress(JPEG2000Lossless)
    honest = next(pydicom.encaps.generate_frames(j2k.PixelData, number_of_frames=1))
    bomb = _patch(honest, b"\xff\x51", 6, ">II", 28000, 28000)

    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    # a JP2 file: signature, file type, a header, an XML box holding the honest SIZ as a decoy,
    # and the codestream box with the real (28000-pixel-square) one
    jp2 = (box(b"jP  ", b"\r\n\x87\n") + box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ")
           + box(b"jp2h", box(b"ihdr", struct.pack(">IIHBBBB", 64, 64, 1, 7, 7, 0, 0)))
           + box(b"xml ", b"<decoy>" + honest + b"</decoy>") + box(b"jp2c", bomb))
    write("jp2_xml_decoy", _encapsulated(_base(pixels), [jp2], JPEG2000Lossless), "refused", "declares 28000 x 28000")
    jpeg = jpeg_frame(pixels)
    # hierarchical JPEG: a DHP segment (the whole image's size) before the honest frame header
    dhp = b"\xff\xde" + struct.pack(">HBHHB", 11, 8, 54000, 54000, 1) + b"\x01\x11\x00"
    write("jpeg_dhp_bomb", _encapsulated(_base(pixels), [jpeg[:2] + dhp + jpeg[2:]], JPEGBaseline8Bit),
          "refused", "declares 54000 x 54000")
    # a second frame header after the first scan
    sof = jpeg[jpeg.index(b"\xff\xc0"):]
    sof = _patch(sof[: 2 + struct.unpack(">H", sof[2:4])[0]], b"\xff\xc0", 5, ">HH", 30000, 30000)
    write("jpeg_second_sof", _encapsulated(_base(pixels), [jpeg[:-2] + sof + b"\xff\xd9"], JPEGBaseline8Bit),
          "refused", "declares 30000 x 30000")


def _console_and_work_cases(folder: Path) -> list[Case]:
    cases = []
    # a path that would act on the terminal: every line that names it must show it escaped
    named = folder / "ct\x1b[2J\x07\nname.dcm"
    named.write_bytes((DATA / "CT_small.dcm").read_bytes())
    cases.append(Case("path_control_characters", named, "analysed"))
    # openslide prints its own warning to the process's stderr before refusing the file
    misordered = folder / "misordered_levels.svs"
    description = "Aperio Image Library v10.0.50\r\n512x512 [0,0 512x512] (256x256) JPEG/RGB Q=30|AppMag = 20|MPP = 0.5"
    misordered.write_bytes(tiled_tiff([(512, 512, description), (1024, 1024, "Aperio Image Library v10.0.50\r\nlevel")]))
    cases.append(Case("svs_misordered_levels", misordered, "refused", "cannot open the slide"))
    zero_mpp = folder / "zero_mpp.svs"
    zero_mpp.write_bytes(tiled_tiff([(512, 512, description.replace("MPP = 0.5", "MPP = 0"))]))
    cases.append(Case("svs_zero_mpp", zero_mpp, "refused", "openslide.mpp-x"))
    # 62,500 patches of 200 um in a 4000-pixel-square picture declared at 12.5 um a pixel
    tile = np.asarray(Image.open(DATA / "idc_mosaic_tail.png").convert("RGB"))[:200, :200]
    patches = folder / "patch_bomb.png"
    Image.fromarray(np.tile(tile, (20, 20, 1))).save(patches)
    cases.append(Case("patch_bomb_png", patches, "refused", "patches hold tissue to score", ("--pixel-size-um", "12.5")))
    return cases


def tiled_tiff(pages: list[tuple[int, int, str]]) -> bytes:
    """A little-endian TIFF of JPEG-compressed (7) 256-pixel tiles, one page per (width,
    height, ImageDescription); the tiles are empty JPEG streams, for readers that judge a
    file before reading a tile."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    next_pointer = 4
    for width, height, description in pages:
        count = -(-width // 256) * -(-height // 256)
        tile = b"\xff\xd8\xff\xd9"
        offsets = []
        for _ in range(count):
            offsets.append(len(out))
            out += tile
        text = description.encode() + b"\x00"
        text_at = len(out)
        out += text + b"\x00" * (len(text) % 2)
        bits_at = len(out)
        out += struct.pack("<HHH", 8, 8, 8)
        offsets_at = len(out)
        out += struct.pack(f"<{count}I", *offsets)
        counts_at = len(out)
        out += struct.pack(f"<{count}I", *[len(tile)] * count)
        entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, bits_at), (259, 3, 1, 7), (262, 3, 1, 2),
                   (270, 2, len(text), text_at), (277, 3, 1, 3), (284, 3, 1, 1), (322, 3, 1, 256), (323, 3, 1, 256),
                   (324, 4, count, offsets_at if count > 1 else offsets[0]),
                   (325, 4, count, counts_at if count > 1 else len(tile))]
        struct.pack_into("<I", out, next_pointer, len(out))
        out += struct.pack("<H", len(entries))
        for tag, kind, number, value in entries:
            out += struct.pack("<HHIHH" if kind == 3 and number == 1 else "<HHII", tag, kind, number, value,
                               *((0,) if kind == 3 and number == 1 else ()))
        next_pointer = len(out)
        out += b"\x00\x00\x00\x00"
    return bytes(out)


def _patch_tiff(data: bytes, values: dict[int, int]) -> bytes:
    """A little-endian classic TIFF with the LONG values of tags in its first IFD replaced."""
    raw = bytearray(data)
    ifd = struct.unpack("<I", raw[4:8])[0]
    for index in range(struct.unpack("<H", raw[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * index
        if struct.unpack("<H", raw[entry:entry + 2])[0] in values:
            raw[entry + 8:entry + 12] = struct.pack("<I", values[struct.unpack("<H", raw[entry:entry + 2])[0]])
    return bytes(raw)
