"""The result folder: every output file of one analysis, appearing whole or not at all.

:func:`save_result` writes into a ``.partial-PID-`` folder beside the final one, then puts
it in place in one atomic step (:func:`_replace_folder`); what killed runs left behind is
cleared first (:func:`_remove_stale_staging`). The files: one Secondary Capture per slice,
the Parametric Map, the TID 1500 Structured Report, ``preview.png``, ``result.json`` and,
for viewers, ``scores.nii.gz`` with ``analysed.nii.gz``, ``seg.dcm`` and ``heatmap.geojson``
(:mod:`dicom_heatmap.writers` builds each).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from dicom_heatmap._version import __version__
from dicom_heatmap.errors import DicomHeatmapError, InputError, OutputError, find_cause
from dicom_heatmap.render import render_slice
from dicom_heatmap.writers.common import PATIENT_STUDY_KEYWORDS, result_series, synthetic_reference
from dicom_heatmap.writers.geojson import build_feature_collection
from dicom_heatmap.writers.nifti import write_score_volume
from dicom_heatmap.writers.pm import build_parametric_map, geometry_carrier, on_slide
from dicom_heatmap.writers.sc import build_secondary_capture
from dicom_heatmap.writers.seg import build_segmentation
from dicom_heatmap.writers.sr import build_structured_report
from dicom_heatmap.writers.validation import check_encodable
from transforms.spatial import pixel_spacing

if TYPE_CHECKING:
    from dicom_heatmap.result import AnalysisResult

__all__ = ["save_result"]

#: Saves one DICOM object under a file name in the folder being written.
SaveDataset = Callable[[Dataset, str], None]


def save_result(result: AnalysisResult, out_dir: str | Path, viewer_files: bool = True) -> Path:
    """Write ``result`` into ``out_dir/<derived UID>/`` (see :meth:`AnalysisResult.save
    <dicom_heatmap.result.AnalysisResult.save>`); returns that folder.

    Args:
        result: what :func:`~dicom_heatmap.api.analyze` found.
        out_dir: the folder the result folder goes into (created if missing).
        viewer_files: also write the files for viewers.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(out_dir, f"cannot create the output folder ({error.strerror})") from None
    final = out_dir / result.identity.folder_name
    _remove_stale_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".partial-{os.getpid()}-", dir=out_dir))
    try:
        try:
            # The PNG preview is compressed in a thread of its own (zlib lets go of the GIL)
            # while the DICOM objects are built: scoring is over, so a core is free.
            with ThreadPoolExecutor(1, thread_name_prefix="preview") as preview:
                _ResultWriter(result, staging, preview).write(viewer_files)
        except (OSError, DicomHeatmapError):
            raise
        except Exception as error:  # a header value highdicom/pydicom cannot encode
            raise InputError(result.meta["source_path"], f"the results cannot be encoded from this input's header "
                                                         f"({type(error).__name__})") from None
        if final.exists():
            _replace_folder(staging, final, out_dir)
        else:
            os.replace(staging, final)
    except OSError as error:
        raise OutputError(out_dir, f"cannot write the results ({_os_reason(error)})") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


class _ResultWriter:
    """Writes the files of one result into ``folder``, DICOM objects first (the SR refers to
    the SCs and the PM), ``result.json`` last with the names and UIDs of what was written."""

    def __init__(self, result: AnalysisResult, folder: Path, preview: ThreadPoolExecutor) -> None:
        self.result, self.folder, self.preview = result, folder, preview
        self.evidence = [_evidence_header(s) for s in result.meta["source_datasets"]]
        self.reference = self.evidence[0] if self.evidence else synthetic_reference(result.identity, result.meta["modality"])
        self.on_source_grid = _on_source_grid(result, self.evidence)
        # SOP Common: the patient and study values are the source's, so they are written in
        # its character set, byte for byte (highdicom sets none: ASCII)
        self.charset = (result.meta["source_datasets"] or [self.reference])[0].get("SpecificCharacterSet")

    def save(self, ds: Dataset, name: str) -> None:
        if self.charset:
            ds.SpecificCharacterSet = self.charset
        check_encodable(ds, self.result.meta["source_path"])
        ds.save_as(self.folder / name, enforce_file_format=True)

    def write(self, viewer_files: bool) -> None:
        result, meta = self.result, self.result.meta
        sc_files, secondary_captures, scale, preview_written = self._secondary_captures()
        patient = meta["frame"] == "PATIENT"
        for_uid = meta.get("frame_of_reference_uid") if patient and self.evidence else None
        if for_uid or (self.evidence and on_slide(self.evidence[0]) and self.on_source_grid):
            pm_sources = self.evidence  # on the source's own patient or slide coordinates
        else:
            pm_sources = [geometry_carrier(secondary_captures[0], meta["affine"], scale, result.identity)]
        pm = build_parametric_map(result.tile_map, pm_sources, result.identity, *result_series(self.reference, "pm"))
        self.save(pm, "pm.dcm")
        sr = build_structured_report(
            result.tile_map, result.spread, result.identity, result.model_checksum, self.evidence, secondary_captures,
            scale, pm, for_uid, *result_series(self.reference, "sr"), result.domain_warning,
        )
        self.save(sr, "sr.dcm")
        summary = result.to_dict()
        summary["outputs"] = {"secondary_captures": sc_files, "parametric_map": "pm.dcm", "structured_report": "sr.dcm",
                              "preview": "preview.png",
                              "uids": {"sc_series": str(secondary_captures[0].SeriesInstanceUID),
                                       "pm": str(pm.SOPInstanceUID), "sr": str(sr.SOPInstanceUID)}}
        if viewer_files:
            summary["outputs"].update(self._viewer_files(summary["outputs"]["uids"]))
        # compact: the C encoder (indent forces the pure-Python one, seconds for a large slide)
        (self.folder / "result.json").write_text(json.dumps(summary, separators=(",", ":")))
        if preview_written is not None:
            preview_written.result()  # its errors are this call's

    def _secondary_captures(self) -> tuple[list[str], list[Dataset], float, object]:
        """One SC per slice (the heatmap burned over the image, with its caption) and the PNG
        preview of the focus slice; returns the file names, the datasets, the picture's
        scale against the image and the preview's pending write."""
        result, meta = self.result, self.result.meta
        affine = meta["affine"]
        spatial, patient = meta["frame"] != "IMAGE", meta["frame"] == "PATIENT"
        row_dir = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
        col_dir = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
        sc_files, secondary_captures, preview_written, scale = [], [], None, 1.0
        slices = result.image.shape[0]
        frame_numbers = meta.get("frame_numbers")  # a multi-frame source: which frame each slice is
        for slice_index in range(slices):
            caption = slice_caption(result, slice_index)
            # a streamed slide: one slice
            shown = result.image[slice_index] if isinstance(result.image, np.ndarray) else result.image
            picture, scale = render_slice(shown, result.tile_map, result.spread, slice_index, caption,
                                          float(np.linalg.norm(affine[:3, 2])) if spatial else None)
            if slice_index == (result.spread.focus_index or [0])[0]:
                preview_written = self.preview.submit(Image.fromarray(picture).save, self.folder / "preview.png")
            spacing = tuple(float(v) for v in pixel_spacing(affine) / scale) if spatial else None
            source, source_frame = None, None
            if len(self.evidence) == slices:
                source = self.evidence[slice_index]
            elif len(self.evidence) == 1 and frame_numbers:
                source, source_frame = self.evidence[0], frame_numbers[slice_index]
            sc = build_secondary_capture(
                picture, self.reference, result.identity, slice_index + 1, spacing, *result_series(self.reference, "sc"),
                row_dir if patient else None, col_dir if patient else None, source, source_frame,
            )
            sc_files.append(f"sc-{slice_index + 1:04d}.dcm")
            self.save(sc, sc_files[-1])
            secondary_captures.append(sc)
        return sc_files, secondary_captures, scale, preview_written

    def _viewer_files(self, uids: dict) -> dict:
        """Files for viewers: for a CT/MR image, the score volume as NIfTI; for a slide or
        picture, the tiles and lesion outlines as GeoJSON in full-resolution pixel coordinates
        (QuPath); for a CT/MR image or a DICOM whole-slide image analysed on its own pixels,
        the lesions as a DICOM SEG. Returns their names; the UIDs of DICOM ones go into
        ``uids``."""
        result = self.result
        lesions = result.lesion_masks
        written = {}
        if result.tile_map.frame == "PATIENT":
            write_score_volume(result.tile_map, self.folder / "scores.nii.gz", self.folder / "analysed.nii.gz")
            written["score_volume"] = "scores.nii.gz"
            written["analysed_mask"] = "analysed.nii.gz"
        if self.evidence and (result.tile_map.frame == "PATIENT" or on_slide(self.evidence[0])) and self.on_source_grid:
            seg = build_segmentation(result.tile_map, lesions, self.evidence, result.identity,
                                     *result_series(self.reference, "seg"))
            if seg is not None:
                self.save(seg, "seg.dcm")
                written["segmentation"] = "seg.dcm"
                uids["seg"] = str(seg.SOPInstanceUID)
        if result.tile_map.frame != "PATIENT" and result.meta.get("level0_pixels") and result.image.shape[0] == 1:
            collection = build_feature_collection(result.tile_map, lesions, result.meta["affine"],
                                                  result.meta["level0_pixels"], result.settings.threshold)
            (self.folder / "heatmap.geojson").write_text(json.dumps(collection, separators=(",", ":")))
            written["geojson"] = "heatmap.geojson"
        return written


def slice_caption(result: AnalysisResult, slice_index: int) -> str:
    """The text under a slice's picture: the domain warning and the scale notice first
    (a reader of the picture alone must see why its scores may mean little), then the
    software, "not for diagnostic use", the slice (CT/MR) and the direction."""
    caption = (f"dicom-heatmap {__version__} - research only, not for diagnostic use - "
               f"{_direction_caption(result, slice_index)}")
    if result.meta["frame"] == "PATIENT":
        caption = f"{result.slice_label(slice_index)} - {caption}"
    if result.scale_notice:
        caption = f"NOTE: {result.scale_notice}. {caption}"
    if result.domain_warning:
        caption = f"WARNING: {result.domain_warning}. {caption}"
    return caption


def _direction_caption(result: AnalysisResult, slice_index: int) -> str:
    """The direction in words; for a volume, also its through-plane part and where the focus is."""
    spread = result.spread
    if not spread.directed:
        return "no dominant spread direction"
    text = f"spread: {spread.words}"
    if result.image.shape[0] > 1:
        through = spread.direction_image[0]
        focus_slice = spread.focus_index[0] + 1
        towards = "higher" if through > 0 else "lower"
        text += (f"; through-plane {abs(through):.2f} toward {towards} slice numbers; focus in slice {focus_slice}"
                 if abs(through) >= 0.05 else f"; in plane; focus in slice {focus_slice}")
    return text


def _on_source_grid(result: AnalysisResult, evidence: list[Dataset]) -> bool:
    """Whether the analysed image is the source images' own pixel grid, slice for slice."""
    settings = result.settings
    if settings.crop or settings.zoom != 1.0 or settings.rotate % 360 or len(evidence) != result.image.shape[0]:
        return False
    # a whole-slide image's frames are tiles of its total pixel matrix
    return all((int(ds.get("TotalPixelMatrixRows", ds.Rows)), int(ds.get("TotalPixelMatrixColumns", ds.Columns)))
               == tuple(result.image.shape[1:3]) for ds in evidence)


def _os_reason(error: OSError) -> str:
    """The system's words for an OSError (``No space left on device``), found through the
    exceptions it was raised from: pydicom re-raises a write error with its traceback as
    the message and no errno."""
    cause = find_cause(error, OSError, where=lambda found: bool(found.errno))
    return os.strerror(cause.errno) if cause is not None else type(error).__name__


def _exchange(first: Path, second: Path) -> bool:
    """Swap two folders in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where
    the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, rename_exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0


def _replace_folder(staging: Path, final: Path, out_dir: Path) -> None:
    """Put the complete ``staging`` folder in the place of the existing ``final`` one.

    The two are exchanged atomically, so a result folder is visible at every moment; the
    old result is then in ``staging`` (a ``.partial-PID-`` folder), which the caller or, if
    this process is killed, the next run removes. Without the exchange, the old result is
    moved aside to ``.replaced-PID-<name>`` first; a run killed between the two moves
    leaves it there, and the next run moves it back (the final name is in its name).
    """
    if _exchange(staging, final):
        return
    retired = out_dir / f".replaced-{os.getpid()}-{final.name}"
    os.replace(final, retired)
    os.replace(staging, final)
    shutil.rmtree(retired, ignore_errors=True)


def _pid_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # another user's live process
    return False


def _remove_stale_staging(out_dir: Path) -> None:
    """Clear what killed runs left: half-written (or swapped-out) ``.partial-PID-*`` folders
    are removed; an old result moved aside (``.replaced-PID-<name>``) goes back to its name
    if no result took it, else it is removed. Folders of live processes are left alone."""
    for folder in [*out_dir.glob(".partial-*"), *out_dir.glob(".replaced-*")]:
        kind, _, rest = folder.name[1:].partition("-")
        pid_text, _, name = rest.partition("-")
        if pid_text.isdigit() and not _pid_is_gone(int(pid_text)):
            continue
        if not pid_text.isdigit() and kind == "partial":
            continue  # not ours
        # a legacy ".replaced-XXXX" (version 1.0 named it without a process) is stale by now
        if kind == "replaced" and name and not (out_dir / name).exists() and (folder / "sr.dcm").exists():
            os.replace(folder, out_dir / name)
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _evidence_header(ds: Dataset) -> Dataset:
    """The source header with the Type 2 patient/study attributes present (empty if unknown)."""
    header = Dataset()
    header.update(ds)
    header.file_meta = getattr(ds, "file_meta", Dataset())
    charset = header.get("SpecificCharacterSet")
    if isinstance(charset, (list, tuple)) or (charset is not None and not isinstance(charset, str)):
        # highdicom's check refuses valid multi-valued sets: "\ISO 2022 IR 87" (the default
        # repertoire, then code extensions; "ISO 2022 IR 6" names the same repertoire) and
        # any holding "ISO 2022 IR 58" (GB2312), which its list of code extensions lacks.
        # Its constructors only carry the value over, and the outputs are written with the
        # source's own value (see _ResultWriter.save), so it is given one it accepts.
        values = list(charset)
        if values and values[0] == "":
            values = ["ISO 2022 IR 6", *values[1:]]
        if "ISO 2022 IR 58" in values:
            values = ["ISO_IR 192"]
        # a new element: header shares the source's elements, which must stay as they are
        header[0x00080005] = DataElement(0x00080005, "CS", values if len(values) > 1 else values[0])
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, None)
    return header
