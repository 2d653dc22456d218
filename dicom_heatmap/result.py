"""What an analysis found: :class:`AnalysisResult`, its summaries, its folder of outputs."""

from __future__ import annotations

import contextlib
import functools
import gc
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dicom_heatmap._version import __version__
from dicom_heatmap.domain import HE_DOMAIN, ModelDomain, domain_warning, input_body_part, layer_disagreement
from dicom_heatmap.heatmap import Heatmap
from dicom_heatmap.lesions import lesion_masks
from dicom_heatmap.network import DEFAULT_FIELD_OF_VIEW_UM
from dicom_heatmap.result_folder import save_result
from dicom_heatmap.spread import SpreadSummary
from dicom_heatmap.writers.common import OutputIdentity
from transforms.grid import TileGrid
from transforms.spatial import pixel_spacing

if TYPE_CHECKING:
    from dicom_heatmap.api import AnalysisSettings

__all__ = ["AnalysisResult"]


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
            for a slide level too large to hold, a :class:`transforms.io.slide.StreamedSlide`.
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
        model_domain: what the model declares it was trained on.
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
    model_domain: ModelDomain = HE_DOMAIN

    @property
    def patch_scores(self) -> np.ndarray | None:
        """Scores of the model's patches, (rows', cols') on the lattice of
        :attr:`patch_grid`; NaN = not analysed. None where each tile was scored whole (see
        :func:`~dicom_heatmap.api.model_patch_side`)."""
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
        None otherwise (see :func:`dicom_heatmap.domain.domain_warning`). The console, the SC
        caption, ``result.json`` and the SR carry it.

        Outside are: another modality than the model's (the H&E model on CT or MR); another
        body part than a radiology model's; an image too coarse for the model's patches;
        tissue on which the model's 13 layers disagree more than on what it was checked on
        (another stain, organ or scanner; see :mod:`dicom_heatmap.domain`).
        """
        too_coarse = None
        if (self.meta["frame"] != "IMAGE" and self.tile_map.patches is None and self.image.shape[0] == 1
                and not self.model_domain.is_radiology):  # a radiology model's tiles are its field of view, never patches
            too_coarse = float(pixel_spacing(self.meta["affine"])[0] * 1000.0)
        return domain_warning(self.model_domain, self.meta["modality"], input_body_part(self.meta), too_coarse,
                              self.layer_disagreement, self.field_of_view_um)

    @functools.cached_property
    def layer_disagreement(self) -> float | None:
        """The domain check's statistic (:func:`dicom_heatmap.domain.layer_disagreement`) over
        the patches scored (the tiles where they were scored whole)."""
        scored = self.tile_map.patches if self.tile_map.patches is not None else self.tile_map
        return layer_disagreement(scored.layer_probabilities)

    @functools.cached_property
    def lesion_masks(self) -> list[np.ndarray]:
        """Boolean (slices, rows, cols) tile mask of each lesion of :attr:`spread`, dominant
        first (:func:`dicom_heatmap.lesions.lesion_masks`)."""
        return lesion_masks(self.tile_map, self.settings.threshold)

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
        lesion_of = np.zeros(grid.count, dtype=int)
        for number, mask in enumerate(self.lesion_masks, start=1):
            lesion_of[np.flatnonzero(mask.ravel() & (lesion_of == 0))] = number
        for record, score, layer, flow, lesion in zip(tiles, scores, layers, flows, lesion_of.tolist()):
            record["score"] = score
            record["lesion"] = lesion or None  # which lesion (1 = dominant) the tile belongs to
            record["layer_probabilities"] = _json_values(layer) if score is not None else None
            record["flow"] = _json_values(flow)  # outgoing flow (slice, row, col), the patent's S9
        return {
            "software": {"name": "dicom-heatmap", "version": __version__, "model_sha256": self.model_checksum,
                         "precision": self.precision,
                         "model_domain": {"modalities": list(self.model_domain.modalities),
                                          "description": self.model_domain.description,
                                          "body_part": self.model_domain.body_part}},
            "input": {"path": self.meta["source_path"], "kind": self.meta["kind"], "modality": self.meta["modality"],
                      "frame": self.meta["frame"], "positions": self._positions_frame(),
                      "warning": self.domain_warning,
                      "layer_disagreement": None if self.layer_disagreement is None else round(self.layer_disagreement, 6),
                      "layer_disagreement_limit": self.model_domain.disagreement_limit},
            "settings": asdict(self.settings),
            "grid": {"slices": grid.shape[0], "rows": grid.shape[1], "cols": grid.shape[2],
                     "numbering": "1-based, slice by slice, rows top to bottom, columns left to right"},
            "patches": self._patches_dict(),
            "statistics": self.tile_map.statistics(self.spread.threshold),
            "spread": _spread_positions(self.spread.to_dict(), self.meta.get("slide_affine")),
            "heatmap": np.array(scores, dtype=object).reshape(grid.shape).tolist(),
            "tiles": tiles,
        }

    def _positions_frame(self) -> str:
        """What the positions of ``result.json`` (the spread's focus, directions, lesion
        ellipsoids) are measured in."""
        frame = self.meta["frame"]
        if frame == "PATIENT":
            return "DICOM patient coordinates (LPS), mm"
        if frame == "IMAGE":
            return "pixels of the analysed image from the centre of its top-left pixel, x right, y down"
        if self.meta.get("slide_affine") is not None:
            return ("DICOM slide coordinates, mm on the glass (the slide's Total Pixel Matrix Origin and Image "
                    "Orientation (Slide)); direction words are of the image as displayed")
        return "mm from the centre of the top-left pixel of the level read, x right, y down (the slide states no origin)"

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
        ``viewer_files``, also what viewers open: ``scores.nii.gz`` and ``analysed.nii.gz`` (a CT or MR image),
        ``heatmap.geojson`` (a slide or picture, for QuPath) and ``seg.dcm`` (a CT/MR image, or
        a DICOM whole-slide image with its own slide coordinates, analysed on its own pixels
        and holding a lesion).

        Args:
            out_dir: the folder the result folder goes into.
            viewer_files: also write the files for viewers.

        The files go to ``out_dir/<derived UID>/``; the folder appears whole or not at all
        (written under a temporary name, then renamed; see :mod:`dicom_heatmap.result_folder`).

        Returns:
            the result folder.
        """
        return save_result(self, out_dir, viewer_files)

    def slice_label(self, slice_index: int) -> str:
        """Which slice of a CT/MR image this is, and where along the slice normal (mm, LPS)."""
        affine = self.meta["affine"]
        normal = np.cross(affine[:3, 2], affine[:3, 1])  # DICOM's: along a row x down a column
        normal /= np.linalg.norm(normal)
        position = float(normal @ (affine @ np.array([slice_index, 0.0, 0.0, 1.0]))[:3])
        return f"slice {slice_index + 1} of {self.image.shape[0]}, at {position:.1f} mm"


def _spread_positions(spread: dict, slide_affine: np.ndarray | None) -> dict:
    """The spread summary's positions and directions moved into slide coordinates by
    ``slide_affine`` (None: left in the frame's own)."""
    if slide_affine is None:
        return spread

    def point(values):
        return [round(float(v), 4) for v in slide_affine[:3, :3] @ np.asarray(values, dtype=float) + slide_affine[:3, 3]]

    def vector(values):
        return [round(float(v), 4) for v in slide_affine[:3, :3] @ np.asarray(values, dtype=float)]

    def move(part: dict) -> None:
        if part.get("focus_position") is not None:
            part["focus_position"] = point(part["focus_position"])
        if part.get("direction_frame") is not None:
            part["direction_frame"] = vector(part["direction_frame"])
        for key in ("lesion_ellipsoid", "ellipsoid"):
            if part.get(key):
                part[key] = {"centre": point(part[key]["centre"]), "axes": [vector(a) for a in part[key]["axes"]]}

    move(spread)
    for lesion in spread.get("lesions", []):
        move(lesion)
    return spread


def _json_values(values: list[float]) -> list:
    """Floats for result.json: 6 decimals, None for NaN (Python floats: numpy scalars are
    many times slower here)."""
    return [round(v, 6) if math.isfinite(v) else None for v in values]
