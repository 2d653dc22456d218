"""The public API: :func:`analyze` and its :class:`AnalysisResult`."""

from __future__ import annotations

import contextlib
import functools
import ctypes
import gc
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from dicom_heatmap._version import __version__
from dicom_heatmap.errors import ConfigurationError, DicomHeatmapError, InputError, OutputError, checked_number, is_uid
from dicom_heatmap.context import PatchContext, whole_slide_scores
from dicom_heatmap.domain import DISAGREEMENT_LIMIT, layer_disagreement
from dicom_heatmap.heatmap import Heatmap
from dicom_heatmap.network import DEFAULT_FIELD_OF_VIEW_UM, DEFAULT_INPUT_SIZE
from dicom_heatmap.render import render_slice
from dicom_heatmap.scorer import MODEL_DOMAIN, MODEL_MODALITIES, TileScorer
from dicom_heatmap.spread import SpreadSummary, analyze_spread, lesion_masks
from dicom_heatmap.checksum import file_sha256
from dicom_heatmap.writers.common import PATIENT_STUDY_KEYWORDS, OutputIdentity, result_series, synthetic_reference
from dicom_heatmap.writers.geojson import build_feature_collection
from dicom_heatmap.writers.nifti import write_score_volume
from dicom_heatmap.writers.pm import build_parametric_map, geometry_carrier, on_slide
from dicom_heatmap.writers.seg import build_segmentation
from dicom_heatmap.writers.sc import build_secondary_capture
from dicom_heatmap.writers.sr import build_structured_report
from dicom_heatmap.writers.validation import check_encodable
from monai.transforms import Compose

from dicom_heatmap.inferer import TileGridInferer
from transforms._dictionary import meta_key
from transforms.grid import GridSplitd, TileGrid
from transforms.intensity import NormalizeIntensityd
from transforms.io import DEFAULT_MAX_VALUES, LoadInputd
from transforms.spatial import CropForegroundd, CropTemplated, Rotated, Zoomd, pixel_spacing

__all__ = ["SETTING_RANGES", "AnalysisSettings", "AnalysisResult", "analyze", "analyze_prepared", "preprocessing", "project_errors",
           "model_patch_side", "MIN_PATCH_SIDE"]


#: Fewest pixels a side of a model patch: on a coarser image tiles are scored whole.
MIN_PATCH_SIDE = 16


@dataclass(frozen=True)
class AnalysisSettings:
    """Every setting that changes the result (they enter the output UIDs).

    Attributes:
        grid: (rows, cols) of tiles; see :class:`transforms.grid.GridSplit`.
        tile_size: tile side in pixels, instead of ``grid``.
        tile_size_um: tile side in micrometres, instead of ``grid`` (needs a known pixel spacing).
        tissue_threshold: least tissue share of an analysed tile.
        threshold: score at or above which a tile counts toward the extent.
        crop: ``None``, ``"foreground"`` (tissue bounding box) or ``"template"`` (a
            ``crop_size`` window placed on the most tissue).
        crop_size: (rows, cols) of the template window.
        zoom: resampling factor applied before the split.
        rotate: degrees counter-clockwise on screen, applied before the split.
        series_uid: which series of a folder to analyse.
        resolution_um: wanted pixel spacing in micrometres when reading a slide level.
        level: the SVS/TIFF pyramid level to read (0 = full resolution; large levels are
            streamed tile by tile).
        pixel_size_um: the pixel size of a PNG/JPEG picture in micrometres (a picture cannot
            say it; without it lengths are in pixels and the model's scale is not known).
        context: run the whole-slide stage where patches are scored at the model's scale:
            the model's context network refines each patch from its neighbours and the
            scores are calibrated to the slide's own threshold
            (:mod:`dicom_heatmap.context`, :mod:`dicom_heatmap.calibration`); ``threshold``
            then applies to calibrated scores. False keeps the tile model's raw scores.
    """

    grid: tuple[int, int] | None = None
    tile_size: int | None = None
    tile_size_um: float | None = None
    tissue_threshold: float = 0.25
    threshold: float = 0.5
    crop: str | None = None
    crop_size: tuple[int, int] | None = None
    zoom: float = 1.0
    rotate: float = 0.0
    series_uid: str | None = None
    resolution_um: float | None = None
    level: int | None = None
    pixel_size_um: float | None = None
    context: bool = True

    def __post_init__(self) -> None:
        # Every value is checked and brought to one type, so that the same settings given
        # from the CLI, the API, the bundle or pacs.yaml (8 or 8.0, a list or a tuple) give
        # the same canonical text, hence the same output UIDs.
        for name, (kind, low, high) in SETTING_RANGES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_SETTINGS:
                continue
            object.__setattr__(self, name, checked_number(name, value, kind, low, high))
        for name in ("grid", "crop_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
                raise ConfigurationError(f"{name} must be two whole numbers (rows, cols), got {value!r}")
            object.__setattr__(self, name, tuple(checked_number(name, v, int, 1, 100_000) for v in value))
        given = [name for name in ("grid", "tile_size", "tile_size_um") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ConfigurationError(f"give only one of grid, tile_size and tile_size_um, got {' and '.join(given)}")
        if not isinstance(self.context, (bool, np.bool_)):
            raise ConfigurationError(f"context must be true or false, got {self.context!r}")
        object.__setattr__(self, "context", bool(self.context))
        if self.crop not in (None, "foreground", "template"):
            raise ConfigurationError(f"crop must be 'foreground' or 'template', got {self.crop!r}")
        if (self.crop == "template") != (self.crop_size is not None):
            raise ConfigurationError("crop 'template' and crop_size (rows, cols) go together")
        if self.series_uid is not None and not is_uid(self.series_uid):
            raise ConfigurationError("series_uid must be a DICOM UID (digits and dots)")

    def canonical(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


#: name: (type, least, most) of each numeric setting (pacs.yaml's schema is built from it too).
SETTING_RANGES = {
    "tile_size": (int, 8, 100_000),
    "tile_size_um": (float, 0.01, 1e6),
    "tissue_threshold": (float, 0.0, 1.0),
    "threshold": (float, 0.0, 1.0),
    "zoom": (float, 1 / 64, 8.0),
    "rotate": (float, -360.0, 360.0),
    "resolution_um": (float, 0.01, 1e5),
    "level": (int, 0, 64),
    "pixel_size_um": (float, 0.01, 1e5),
}
_OPTIONAL_SETTINGS = {"tile_size", "tile_size_um", "resolution_um", "level", "pixel_size_um"}


@contextlib.contextmanager
def _collector_paused():
    """Pause Python's cyclic garbage collector: building a record per tile makes so many
    containers that it would run over and over (85 % of the time for a 32,000-tile slide)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class AnalysisResult:
    """What :func:`analyze` found for one input.

    Attributes:
        image: (slices, rows, cols, 3) uint8, the preprocessed image the grid lies on - or,
            for a slide level too large to hold, a :class:`transforms.io.StreamedSlide`.
        meta: the loader's metadata, updated by preprocessing (``affine`` etc.).
        tile_map: scores, per-layer probabilities and the tile grid.
        spread: the spread analysis.
        settings: the settings used.
        model_checksum: sha256 of the model file.
        identity: what the output UIDs derive from.
        precision: the precision the conv layers ran in (``fp32``, ``bf16``, ``fp16``).
        field_of_view_um: the model's field of view: the side of the patches it scored.
        slide_threshold: where the whole-slide stage ran (see ``AnalysisSettings.context``),
            the slide's own threshold on the refined scores, which calibration moved to
            0.5; None where it did not run.
        refined_by_context: whether the model's context network refined the patch scores.
    """

    image: np.ndarray
    meta: dict
    tile_map: Heatmap
    spread: SpreadSummary
    settings: AnalysisSettings
    model_checksum: str
    identity: OutputIdentity
    precision: str = "fp32"
    field_of_view_um: float = DEFAULT_FIELD_OF_VIEW_UM
    slide_threshold: float | None = None
    refined_by_context: bool = False

    @property
    def patch_scores(self) -> np.ndarray | None:
        """Scores of the model's patches, (rows', cols') on the lattice of
        :attr:`patch_grid`; NaN = not analysed. None where each tile was scored whole (see
        :func:`model_patch_side`)."""
        patches = self.tile_map.patches
        return None if patches is None else patches.scores[0]

    @property
    def raw_patch_scores(self) -> np.ndarray | None:
        """The tile model's own scores of the patches, before the whole-slide stage
        (:attr:`patch_scores` where it did not run); None where tiles were scored whole."""
        patches = self.tile_map.patches
        if patches is None:
            return None
        return (patches.raw_scores if patches.raw_scores is not None else patches.scores)[0]

    @property
    def patch_grid(self) -> TileGrid | None:
        """The lattice of the model's patches (edges in image pixels), or None."""
        return None if self.tile_map.patches is None else self.tile_map.patches.grid

    @property
    def scale_notice(self) -> str | None:
        """Why the tiles were scored whole rather than as patches at the model's scale, for
        an input the model knows (a slide or picture); None when they were patches."""
        if self.tile_map.patches is not None or self.domain_warning or self.meta["frame"] != "IMAGE":
            return None  # an image too coarse for the model is outside its domain: the warning says so
        declare = "declare it with --pixel-size-um" if self.meta["kind"] == "image" else "the file does not state it"
        return (f"the pixel size is unknown ({declare}), so each tile was scored whole, shrunk or stretched to the "
                f"model's input: the scores mean most where a tile covers about {self.field_of_view_um:g} um")

    @property
    def heatmap(self) -> np.ndarray:
        """Scores: (rows, cols) for one image, (slices, rows, cols) for a series; NaN = not analysed."""
        scores = self.tile_map.scores
        return scores[0] if scores.shape[0] == 1 else scores

    @property
    def layer_probabilities(self) -> np.ndarray:
        """(…, 13): each conv layer head's tumour probability per tile, shaped like :attr:`heatmap`."""
        layers = self.tile_map.layer_probabilities
        return layers[0] if layers.shape[0] == 1 else layers

    @property
    def tile_numbers(self) -> np.ndarray:
        """1-based tile numbers, shaped like :attr:`heatmap` (row-major, slice by slice)."""
        numbers = np.arange(1, self.tile_map.grid.count + 1).reshape(self.tile_map.grid.shape)
        return numbers[0] if numbers.shape[0] == 1 else numbers

    @property
    def direction(self) -> SpreadSummary:
        """The spread summary (same as :attr:`spread`)."""
        return self.spread

    @property
    def domain_warning(self) -> str | None:
        """Why these scores are no findings when the input lies outside the model's domain;
        None otherwise. The console, the SC caption, ``result.json`` and the SR carry it.

        Outside are: another modality than the model's (the H&E model on CT or MR); an
        image too coarse for the model's patches; tissue on which the model's 13 layers
        disagree more than on any of its development slides (another stain, organ or
        scanner; see :mod:`dicom_heatmap.domain`).
        """
        modality = self.meta["modality"]
        if modality not in MODEL_MODALITIES:
            # quoted only when it is a valid code string: header text never reaches a console raw
            named = f"{modality} " if re.fullmatch(r"[A-Z0-9_ ]{1,16}", modality) else ""
            return f"the model knows only {MODEL_DOMAIN}; on this {named}image its scores are not findings"
        if self.meta["frame"] != "IMAGE" and self.tile_map.patches is None and self.image.shape[0] == 1:
            spacing_um = float(pixel_spacing(self.meta["affine"])[0] * 1000.0)
            return (f"the image read is too coarse for the model ({spacing_um:.3g} um per pixel: a {self.field_of_view_um:g} "
                    f"um patch would be under {MIN_PATCH_SIDE} pixels), so its scores are not findings; read a finer "
                    "level with --resolution-um or --level")
        disagreement = self.layer_disagreement
        if disagreement is not None and disagreement > DISAGREEMENT_LIMIT:
            return (f"the model's 13 layers disagree on this tissue (mean spread {disagreement:.3f}, above "
                    f"{DISAGREEMENT_LIMIT:g}): it looks unlike what the model knows ({MODEL_DOMAIN}; another stain, "
                    "organ or scanner?), so its scores are not findings")
        return None

    @functools.cached_property
    def layer_disagreement(self) -> float | None:
        """The domain check's statistic (:func:`dicom_heatmap.domain.layer_disagreement`) over
        the patches scored (the tiles where they were scored whole)."""
        scored = self.tile_map.patches if self.tile_map.patches is not None else self.tile_map
        return layer_disagreement(scored.layer_probabilities)

    def summary_line(self) -> str:
        """One human line: scores, extent and direction."""
        stats = self.tile_map.statistics(self.spread.threshold)
        if not stats["analysed_tiles"]:
            return "no tile held enough tissue to analyse"
        direction = (f"spread toward {self.spread.words} (angle {self.spread.angle_deg} deg, directedness {self.spread.directedness:.2f})"
                     if self.spread.directed else "no dominant spread direction")
        return (f"{stats['analysed_tiles']} tiles analysed, max score {stats['max_score']:.3f}, mean {stats['mean_score']:.3f}, "
                f"{stats['tiles_above_threshold']} at or above {self.spread.threshold}; {direction}")

    @_collector_paused()
    def to_dict(self) -> dict:
        """The JSON summary: grid, scores, numbering, spread, statistics."""
        grid = self.tile_map.grid
        tiles = grid.table()
        scores = _json_values(self.tile_map.scores.ravel().tolist())
        layers = self.tile_map.layer_probabilities.reshape(-1, self.tile_map.layer_probabilities.shape[-1]).tolist()
        flows = (self.spread.flow.reshape(-1, 3) if self.spread.flow is not None else np.zeros((len(tiles), 3))).tolist()
        for record, score, layer, flow in zip(tiles, scores, layers, flows):
            record["score"] = score
            record["layer_probabilities"] = _json_values(layer) if score is not None else None
            record["flow"] = _json_values(flow)  # outgoing flow (slice, row, col), the patent's S9
        return {
            "software": {"name": "dicom-heatmap", "version": __version__, "model_sha256": self.model_checksum,
                         "precision": self.precision},
            "input": {"kind": self.meta["kind"], "modality": self.meta["modality"], "frame": self.meta["frame"],
                      "warning": self.domain_warning,
                      "layer_disagreement": None if self.layer_disagreement is None else round(self.layer_disagreement, 6),
                      "layer_disagreement_limit": DISAGREEMENT_LIMIT},
            "settings": asdict(self.settings),
            "grid": {"slices": grid.shape[0], "rows": grid.shape[1], "cols": grid.shape[2],
                     "numbering": "1-based, slice by slice, rows top to bottom, columns left to right"},
            "patches": self._patches_dict(),
            "statistics": self.tile_map.statistics(self.spread.threshold),
            "spread": self.spread.to_dict(),
            "heatmap": np.array(scores, dtype=object).reshape(grid.shape).tolist(),
            "tiles": tiles,
        }

    def _patches_dict(self) -> dict:
        """result.json's account of what the model saw: patches at its scale, or whole tiles."""
        patches = self.patch_grid
        if patches is None:
            return {"scored": "whole tiles", "field_of_view_um": self.field_of_view_um, "notice": self.scale_notice}
        return {
            "scored": "patches at the model's scale; a tile's score is the tissue-weighted mean of the patches it overlaps",
            "field_of_view_um": self.field_of_view_um,
            "row_edges": patches.row_edges.tolist(), "col_edges": patches.col_edges.tolist(),
            "whole_slide_stage": self._whole_slide_dict(),
            "scores": self._patch_list(self.patch_scores),
            "raw_scores": self._patch_list(self.raw_patch_scores),
        }

    def _patch_list(self, values: np.ndarray) -> list:
        return np.array(_json_values(values.ravel().tolist()), dtype=object).reshape(values.shape).tolist()

    def _whole_slide_dict(self) -> dict:
        if self.slide_threshold is None:
            return {"ran": False, "scores": "the tile model's own (raw_scores are the same)"}
        return {"ran": True, "context": self.refined_by_context, "slide_threshold": round(self.slide_threshold, 6),
                "scores": ("refined by the context network from each patch's neighbours, then "
                           if self.refined_by_context else "")
                          + "calibrated so that the slide's own threshold reads 0.5; raw_scores are the tile model's"}

    def save(self, out_dir: str | Path, viewer_files: bool = True) -> Path:
        """Write SC (one per slice), PM, SR, a PNG preview and ``result.json``; with
        ``viewer_files``, also what viewers open: ``scores.nii.gz`` (a CT or MR image),
        ``heatmap.geojson`` (a slide or picture, for QuPath) and ``seg.dcm`` (a CT/MR image, or
        a DICOM whole-slide image with its own slide coordinates, analysed on its own pixels
        and holding a lesion).

        Args:
            out_dir: the folder the result folder goes into.
            viewer_files: also write the files for viewers.

        The files go to ``out_dir/<derived UID>/``; the folder appears whole or not at all
        (written under a temporary name, then renamed).

        Returns:
            the result folder.
        """
        out_dir = Path(out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(out_dir, f"cannot create the output folder ({error.strerror})") from None
        final = out_dir / self.identity.folder_name
        _remove_stale_staging(out_dir)
        staging = Path(tempfile.mkdtemp(prefix=f".partial-{os.getpid()}-", dir=out_dir))
        try:
            try:
                self._write(staging, viewer_files)
            except (OSError, DicomHeatmapError):
                raise
            except Exception as error:  # a header value highdicom/pydicom cannot encode
                raise InputError(self.meta["source_path"], f"the results cannot be encoded from this input's header "
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

    def _direction_caption(self, slice_index: int) -> str:
        """The direction in words; for a volume, also its through-plane part and where the focus is."""
        if not self.spread.directed:
            return "no dominant spread direction"
        text = f"spread: {self.spread.words}"
        if self.image.shape[0] > 1:
            through = self.spread.direction_image[0]
            focus_slice = self.spread.focus_index[0] + 1
            towards = "higher" if through > 0 else "lower"
            text += (f"; through-plane {abs(through):.2f} toward {towards} slice numbers; focus in slice {focus_slice}"
                     if abs(through) >= 0.05 else f"; in plane; focus in slice {focus_slice}")
        return text

    def _write_viewer_files(self, folder: Path, evidence: list[Dataset], reference: Dataset, on_source_grid: bool, save,
                            uids: dict) -> dict:
        """Files for viewers: for a CT/MR image, the score volume as NIfTI; for a slide or
        picture, the tiles and lesion outlines as GeoJSON in full-resolution pixel coordinates
        (QuPath); for a CT/MR image or a DICOM whole-slide image analysed on its own pixels,
        the lesions as a DICOM SEG. Returns their names; the UIDs of DICOM ones go into
        ``uids``."""
        lesions = lesion_masks(self.tile_map, self.settings.threshold)
        written = {}
        if self.tile_map.frame == "PATIENT":
            write_score_volume(self.tile_map, folder / "scores.nii.gz")
            written["score_volume"] = "scores.nii.gz"
        if evidence and (self.tile_map.frame == "PATIENT" or on_slide(evidence[0])) and on_source_grid:
            seg = build_segmentation(self.tile_map, lesions, evidence, self.identity, *result_series(reference, "seg"))
            if seg is not None:
                save(seg, "seg.dcm")
                written["segmentation"] = "seg.dcm"
                uids["seg"] = str(seg.SOPInstanceUID)
        if self.tile_map.frame != "PATIENT" and self.meta.get("level0_pixels") and self.image.shape[0] == 1:
            collection = build_feature_collection(self.tile_map, lesions, self.meta["affine"], self.meta["level0_pixels"],
                                                  self.settings.threshold)
            (folder / "heatmap.geojson").write_text(json.dumps(collection, separators=(",", ":")))
            written["geojson"] = "heatmap.geojson"
        return written

    def slice_label(self, slice_index: int) -> str:
        """Which slice of a CT/MR image this is, and where along the slice normal (mm, LPS)."""
        affine = self.meta["affine"]
        normal = np.cross(affine[:3, 2], affine[:3, 1])  # DICOM's: along a row x down a column
        normal /= np.linalg.norm(normal)
        position = float(normal @ (affine @ np.array([slice_index, 0.0, 0.0, 1.0]))[:3])
        return f"slice {slice_index + 1} of {self.image.shape[0]}, at {position:.1f} mm"

    def _write(self, folder: Path, viewer_files: bool) -> None:
        # The PNG preview is compressed in a thread of its own (zlib lets go of the GIL)
        # while the DICOM objects are built: scoring is over, so a core is free.
        with ThreadPoolExecutor(1, thread_name_prefix="preview") as preview:
            self._write_all(folder, preview, viewer_files)

    def _write_all(self, folder: Path, preview: ThreadPoolExecutor, viewer_files: bool) -> None:
        evidence = [_evidence_header(s) for s in self.meta["source_datasets"]]
        reference = evidence[0] if evidence else synthetic_reference(self.identity, self.meta["modality"])
        affine = self.meta["affine"]
        spatial = self.meta["frame"] != "IMAGE"
        row_dir = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
        col_dir = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
        patient = self.meta["frame"] == "PATIENT"

        # SOP Common: the patient and study values are the source's, so they are written in
        # its character set, byte for byte (highdicom sets none: ASCII)
        source_charset = (self.meta["source_datasets"] or [reference])[0].get("SpecificCharacterSet")
        on_source_grid = _on_source_grid(self, evidence)

        def save(ds: Dataset, name: str) -> None:
            if source_charset:
                ds.SpecificCharacterSet = source_charset
            check_encodable(ds, self.meta["source_path"])
            ds.save_as(folder / name, enforce_file_format=True)

        sc_files, secondary_captures = [], []
        preview_written = None
        scale = 1.0
        slices = self.image.shape[0]
        frame_numbers = self.meta.get("frame_numbers")  # a multi-frame source: which frame each slice is
        for slice_index in range(slices):
            caption = f"dicom-heatmap {__version__} - research only, not for diagnostic use - {self._direction_caption(slice_index)}"
            if patient:
                caption = f"{self.slice_label(slice_index)} - {caption}"
            if self.domain_warning:
                caption = f"WARNING: {self.domain_warning}. {caption}"
            shown = self.image[slice_index] if isinstance(self.image, np.ndarray) else self.image  # a streamed slide: one slice
            picture, scale = render_slice(shown, self.tile_map, self.spread, slice_index, caption,
                                          float(np.linalg.norm(affine[:3, 2])) if spatial else None)
            if slice_index == (self.spread.focus_index or [0])[0]:
                preview_written = preview.submit(Image.fromarray(picture).save, folder / "preview.png")
            spacing = None
            if spatial:
                spacing = tuple(float(v) for v in pixel_spacing(affine) / scale)
            source, source_frame = None, None
            if len(evidence) == slices:
                source = evidence[slice_index]
            elif len(evidence) == 1 and frame_numbers:
                source, source_frame = evidence[0], frame_numbers[slice_index]
            sc = build_secondary_capture(
                picture, reference, self.identity, slice_index + 1, spacing, *result_series(reference, "sc"),
                row_dir if patient else None, col_dir if patient else None, source, source_frame,
            )
            sc_files.append(f"sc-{slice_index + 1:04d}.dcm")
            save(sc, sc_files[-1])
            secondary_captures.append(sc)
        for_uid = self.meta.get("frame_of_reference_uid") if patient and evidence else None
        if for_uid or (evidence and on_slide(evidence[0]) and on_source_grid):
            pm_sources = evidence  # on the source's own patient or slide coordinates
        else:
            pm_sources = [geometry_carrier(secondary_captures[0], affine, scale, self.identity)]
        pm = build_parametric_map(self.tile_map, pm_sources, self.identity, *result_series(reference, "pm"))
        save(pm, "pm.dcm")
        sr = build_structured_report(
            self.tile_map, self.spread, self.identity, self.model_checksum, evidence, secondary_captures, scale, pm, for_uid,
            *result_series(reference, "sr"), self.domain_warning,
        )
        save(sr, "sr.dcm")
        result = self.to_dict()
        result["outputs"] = {"secondary_captures": sc_files, "parametric_map": "pm.dcm", "structured_report": "sr.dcm",
                             "preview": "preview.png",
                             "uids": {"sc_series": str(secondary_captures[0].SeriesInstanceUID),
                                      "pm": str(pm.SOPInstanceUID), "sr": str(sr.SOPInstanceUID)}}
        if viewer_files:
            result["outputs"].update(self._write_viewer_files(folder, evidence, reference, on_source_grid, save,
                                                              result["outputs"]["uids"]))
        # compact: the C encoder (indent forces the pure-Python one, seconds for a large slide)
        (folder / "result.json").write_text(json.dumps(result, separators=(",", ":")))
        if preview_written is not None:
            preview_written.result()  # its errors are this call's


def _json_values(values: list[float]) -> list:
    """Floats for result.json: 6 decimals, None for NaN (Python floats: numpy scalars are
    many times slower here)."""
    return [round(v, 6) if math.isfinite(v) else None for v in values]


def _on_source_grid(result: "AnalysisResult", evidence: list[Dataset]) -> bool:
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
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        cause = cause.__cause__ or cause.__context__
    return type(error).__name__


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
        # "\ISO 2022 IR 87" (default repertoire, then code extensions) is valid DICOM that
        # highdicom's check refuses; "ISO 2022 IR 6" is the same repertoire named. The
        # outputs are written with the source's own value (see save in _write_all).
        values = list(charset)
        if values and values[0] == "":
            # a new element: header shares the source's elements, which must stay as they are
            header[0x00080005] = DataElement(0x00080005, "CS", ["ISO 2022 IR 6", *values[1:]])
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _source_key(meta: dict) -> str:
    """What identifies the input: its SOP Instance UIDs, or the content of a non-DICOM file
    (the loader's cheap ``content_key`` where the format has one, else the file's sha256)."""
    sources = meta["source_datasets"]
    if sources:
        return "|".join(str(ds.SOPInstanceUID) for ds in sources)
    return meta.get("content_key") or file_sha256(Path(meta["source_path"]))


def preprocessing(settings: AnalysisSettings, key: str = "image", max_values: int = DEFAULT_MAX_VALUES,
                  model_scale_um: float = DEFAULT_FIELD_OF_VIEW_UM / DEFAULT_INPUT_SIZE) -> Compose:
    """The dictionary transforms from the input path to the tile grid, for ``settings``.

    The bundle's ``configs/inference.json`` builds its preprocessing with this function.

    Args:
        settings: the analysis settings.
        key: the image key of the data dictionary.
        max_values: the loader's size guard (it does not change results, so it is no setting).
        model_scale_um: micrometres per pixel of the model's input (the shipped model's by
            default): without ``resolution_um`` or ``level``, slides are read at a level that
            suits it.
    """
    steps: list = [
        LoadInputd(key, series_uid=settings.series_uid, resolution_um=settings.resolution_um, max_values=max_values,
                   level=settings.level, pixel_size_um=settings.pixel_size_um, model_scale_um=model_scale_um),
        NormalizeIntensityd(key),
    ]
    if settings.crop == "foreground":
        steps.append(CropForegroundd(key))
    elif settings.crop == "template":
        steps.append(CropTemplated(key, settings.crop_size))
    steps += [
        Zoomd(key, settings.zoom),
        Rotated(key, settings.rotate),
        GridSplitd(key, grid=settings.grid, tile_size=settings.tile_size, tile_size_um=settings.tile_size_um,
                   tissue_threshold=settings.tissue_threshold),
    ]
    return Compose(steps)


def analyze_prepared(data: dict, scorer: TileScorer, settings: AnalysisSettings, inferer: TileGridInferer | None = None,
                     key: str = "image") -> AnalysisResult:
    """Score, assemble and summarise an input that :func:`preprocessing` has prepared.

    Args:
        data: the dictionary after preprocessing (image, its metadata and its grid).
        scorer: the loaded model.
        settings: the settings the preprocessing was built from (they enter the UIDs).
        inferer: the tile inferer (a default one when ``None``).
        key: the image key of ``data``.
    """
    image, meta, grid = data[key], data[meta_key(key)], data[f"{key}_grid"]
    inferer = inferer or TileGridInferer()
    patch_side = model_patch_side(meta, scorer, image.shape[0])
    # the model sees its own field of view: patches on a lattice fixed by the image and the
    # model's scale; the grid asked for only sets the heatmap's resolution
    scored_grid = grid.lattice(patch_side, settings.tissue_threshold) if patch_side else grid
    # A slide file without a cheap content key is hashed whole (seconds for a multi-GB
    # file): in a thread of its own while the tiles are scored.
    with ThreadPoolExecutor(1, thread_name_prefix="source-key") as background:
        source_key = background.submit(_source_key, meta)
        numbers, scored = inferer((image, scored_grid), scorer, what="patches" if patch_side else "tiles")
        source_key = source_key.result()
    scored_map = Heatmap.assemble(scored_grid, numbers, scored.scores, scored.layer_probabilities, meta["affine"], meta["frame"],
                                  image.shape[1:3])
    threshold, refined = None, False
    if patch_side and settings.context:
        scored_map, threshold, refined = _whole_slide_stage(scored_map, scorer.network.context)
    tile_map = Heatmap.pooled(scored_map, grid, meta["affine"], image.shape[1:3]) if patch_side else scored_map
    spread = analyze_spread(tile_map, settings.threshold)
    method = settings.canonical() + (f"|patches of {scorer.field_of_view_um:g} um" if patch_side else "")
    identity = OutputIdentity(source_key, scorer.identity, method)
    return AnalysisResult(image, meta, tile_map, spread, settings, scorer.checksum, identity, scorer.precision,
                          scorer.field_of_view_um, threshold, refined)


def _whole_slide_stage(patches: Heatmap, context: PatchContext) -> tuple[Heatmap, float, bool]:
    """The patch map after :func:`~dicom_heatmap.context.whole_slide_scores`; the slide's
    threshold; whether the model's context stage refined it."""
    probabilities = np.concatenate([patches.scores[0][..., None], patches.layer_probabilities[0]], axis=-1)
    scores, threshold = whole_slide_scores(probabilities, context)
    return patches.with_scores(scores[None]), threshold, context.is_trained


def model_patch_side(meta: dict, scorer: TileScorer, slices: int = 1) -> tuple[float, float] | None:
    """Pixels (along rows, along columns) of one model patch - the model's field of view -
    on an image of ``meta``; None where patches cannot be cut at the model's scale: the
    pixel spacing is unknown (a picture without a declared pixel size, a slide without
    one), the modality is not the model's (CT, MR and volumes are tiled as before), or the
    image is so coarse that a patch would be under :data:`MIN_PATCH_SIDE` pixels.

    Args:
        meta: the loader's metadata after preprocessing (its ``affine`` is in mm).
        scorer: the model; its ``field_of_view_um`` is the patch side.
        slices: slices of the image (patches are cut from single images only).
    """
    if meta["frame"] == "IMAGE" or meta["modality"] not in MODEL_MODALITIES or slices != 1:
        return None
    spacing_um = pixel_spacing(meta["affine"]) * 1000.0
    side = scorer.field_of_view_um / spacing_um
    return (float(side[0]), float(side[1])) if side.min() >= MIN_PATCH_SIDE else None


def analyze(
    source: str | Path | Dataset | Sequence[Dataset],
    model: str | Path | TileScorer | None = None,
    settings: AnalysisSettings | None = None,
    progress: bool = True,
    max_values: int = DEFAULT_MAX_VALUES,
    **options,
) -> AnalysisResult:
    """Analyse one input: load, preprocess, split, score, assemble, find the spread.

    Args:
        source: a path (DICOM folder or file, slide, PNG/JPEG) or pydicom datasets
            (one image, or the slices of one series).
        model: a model file, a loaded :class:`TileScorer`, or ``None`` for the shipped model.
        settings: see :class:`AnalysisSettings`; or give its fields as keyword ``options``.
        progress: show a progress bar while scoring.
        max_values: size guard: most pixel values the input may decode to (checked on
            its header before decoding).

    Returns:
        the :class:`AnalysisResult`; ``.save(out_dir)`` writes the DICOM, PNG and JSON files.
    """
    if settings is None:
        settings = AnalysisSettings(**options)
    elif options:
        raise ConfigurationError("give either settings or keyword options, not both")
    scorer = model if isinstance(model, TileScorer) else TileScorer.load(model)
    if isinstance(source, (Dataset, list, tuple)):
        with tempfile.TemporaryDirectory(prefix="dicom-heatmap-") as folder:
            datasets = [source] if isinstance(source, Dataset) else list(source)
            for index, ds in enumerate(datasets):
                ds.save_as(Path(folder) / f"{index:05d}.dcm", enforce_file_format=True)
            target = Path(folder) / "00000.dcm" if len(datasets) == 1 else Path(folder)
            return analyze(target, scorer, settings, progress, max_values)
    with warnings.catch_warnings(), project_errors():
        warnings.simplefilter("ignore")
        data = preprocessing(settings, max_values=max_values,
                             model_scale_um=scorer.field_of_view_um / scorer.input_size)({"image": Path(source)})
    return analyze_prepared(data, scorer, settings, TileGridInferer(progress))


@contextlib.contextmanager
def project_errors():
    """Let the project's errors through MONAI, which wraps whatever a transform raises in
    ``RuntimeError("applying transform ...")``."""
    try:
        yield
    except RuntimeError as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, DicomHeatmapError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
