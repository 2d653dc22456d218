"""The public API: :func:`analyze` and its :class:`AnalysisResult`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from tqdm import tqdm

from dicom_heatmap._version import __version__
from dicom_heatmap.errors import ConfigurationError, OutputError
from dicom_heatmap.heatmap import Heatmap
from dicom_heatmap.render import render_slice
from dicom_heatmap.scorer import TileScorer
from dicom_heatmap.spread import SpreadSummary, analyze_spread
from dicom_heatmap.writers.common import PATIENT_STUDY_KEYWORDS, OutputIdentity, file_digest, synthetic_reference
from dicom_heatmap.writers.pm import build_parametric_map, geometry_carrier
from dicom_heatmap.writers.sc import build_secondary_capture
from dicom_heatmap.writers.sr import build_structured_report
from transforms.grid import GridSplit
from transforms.intensity import NormalizeIntensity
from transforms.io import LoadInput
from transforms.spatial import CropForeground, CropTemplate, Rotate, Zoom

__all__ = ["AnalysisSettings", "AnalysisResult", "analyze"]


@dataclass(frozen=True)
class AnalysisSettings:
    """Every setting that changes the result (they enter the output UIDs).

    Attributes:
        grid: (rows, cols) of tiles; see :class:`transforms.grid.GridSplit`.
        tile_size: tile side in pixels, instead of ``grid``.
        tile_size_mm: tile side in mm, instead of ``grid``.
        tissue_threshold: least tissue share of an analysed tile.
        threshold: score at or above which a tile counts toward the extent.
        crop: ``None``, ``"foreground"`` (tissue bounding box) or ``"template"`` (a
            ``crop_size`` window placed on the most tissue).
        crop_size: (rows, cols) of the template window.
        zoom: resampling factor applied before the split.
        rotate: degrees counter-clockwise on screen, applied before the split.
        series_uid: which series of a folder to analyse.
        resolution_mm: wanted pixel spacing when reading a slide level.
    """

    grid: tuple[int, int] | None = None
    tile_size: int | None = None
    tile_size_mm: float | None = None
    tissue_threshold: float = 0.25
    threshold: float = 0.5
    crop: str | None = None
    crop_size: tuple[int, int] | None = None
    zoom: float = 1.0
    rotate: float = 0.0
    series_uid: str | None = None
    resolution_mm: float | None = None

    def __post_init__(self) -> None:
        if self.crop not in (None, "foreground", "template"):
            raise ConfigurationError(f"crop must be 'foreground' or 'template', got {self.crop!r}")
        if self.crop == "template" and not self.crop_size:
            raise ConfigurationError("crop 'template' needs crop_size (rows, cols)")
        if not 0 <= self.threshold <= 1:
            raise ConfigurationError(f"threshold must lie in 0..1, got {self.threshold}")
        if not self.zoom > 0:
            raise ConfigurationError(f"zoom must be positive, got {self.zoom}")
        if self.resolution_mm is not None and not self.resolution_mm > 0:
            raise ConfigurationError(f"resolution_mm must be positive, got {self.resolution_mm}")

    def canonical(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class AnalysisResult:
    """What :func:`analyze` found for one input.

    Attributes:
        image: (slices, rows, cols, 3) uint8, the preprocessed image the grid lies on.
        meta: the loader's metadata, updated by preprocessing (``affine`` etc.).
        tile_map: scores, per-layer probabilities and the tile grid.
        spread: the spread analysis.
        settings: the settings used.
        model_checksum: sha256 of the model file.
        identity: what the output UIDs derive from.
    """

    image: np.ndarray
    meta: dict
    tile_map: Heatmap
    spread: SpreadSummary
    settings: AnalysisSettings
    model_checksum: str
    identity: OutputIdentity

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

    def summary_line(self) -> str:
        """One human line: scores, extent and direction."""
        stats = self.tile_map.statistics(self.spread.threshold)
        if not stats["analysed_tiles"]:
            return "no tile held enough tissue to analyse"
        direction = (f"spread toward {self.spread.words} (angle {self.spread.angle_deg} deg, directedness {self.spread.directedness:.2f})"
                     if self.spread.directed else "no dominant spread direction")
        return (f"{stats['analysed_tiles']} tiles analysed, max score {stats['max_score']:.3f}, mean {stats['mean_score']:.3f}, "
                f"{stats['tiles_above_threshold']} at or above {self.spread.threshold}; {direction}")

    def to_dict(self) -> dict:
        """The JSON summary: grid, scores, numbering, spread, statistics."""
        def clean(values: np.ndarray) -> list:
            return [None if not np.isfinite(v) else round(float(v), 6) for v in values.ravel()]

        grid = self.tile_map.grid
        tiles = grid.table()
        scores = self.tile_map.scores.ravel()
        layers = self.tile_map.layer_probabilities.reshape(-1, self.tile_map.layer_probabilities.shape[-1])
        for record, score, layer in zip(tiles, scores, layers):
            record["score"] = None if not np.isfinite(score) else round(float(score), 6)
            record["layer_probabilities"] = clean(layer) if np.isfinite(score) else None
        return {
            "software": {"name": "dicom-heatmap", "version": __version__, "model_sha256": self.model_checksum},
            "input": {"kind": self.meta["kind"], "modality": self.meta["modality"], "frame": self.meta["frame"]},
            "settings": asdict(self.settings),
            "grid": {"slices": grid.shape[0], "rows": grid.shape[1], "cols": grid.shape[2],
                     "numbering": "1-based, slice by slice, rows top to bottom, columns left to right"},
            "statistics": self.tile_map.statistics(self.spread.threshold),
            "spread": self.spread.to_dict(),
            "heatmap": np.array(clean(self.tile_map.scores), dtype=object).reshape(grid.shape).tolist(),
            "tiles": tiles,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write SC (one per slice), PM, SR, a PNG preview and ``result.json``.

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
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out_dir))
        try:
            self._write(staging)
            if final.exists():
                retired = Path(tempfile.mkdtemp(prefix=".replaced-", dir=out_dir))
                os.replace(final, retired / "old")
                os.replace(staging, final)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(staging, final)
        except OSError as error:
            raise OutputError(out_dir, f"cannot write the results ({error.strerror or error})") from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return final

    def _write(self, folder: Path) -> None:
        sources = self.meta["source_datasets"]
        reference = _evidence_header(sources[0]) if sources else synthetic_reference(self.identity, self.meta["modality"])
        affine = self.meta["affine"]
        spatial = self.meta["frame"] != "IMAGE"
        row_dir = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
        col_dir = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
        patient = self.meta["frame"] == "PATIENT"
        files = []
        secondary_captures = []
        scale = 1.0
        for slice_index in range(self.image.shape[0]):
            caption = f"dicom-heatmap {__version__} - research only, not for diagnostic use - " + (
                f"spread: {self.spread.words}" if self.spread.directed else "no dominant spread direction")
            picture, scale = render_slice(self.image[slice_index], self.tile_map, self.spread, slice_index, caption)
            spacing = None
            if spatial:
                spacing = (float(np.linalg.norm(affine[:3, 1]) / scale), float(np.linalg.norm(affine[:3, 2]) / scale))
            source = sources[slice_index] if len(sources) == self.image.shape[0] else None
            sc = build_secondary_capture(
                picture, reference, self.identity, slice_index + 1, spacing,
                row_dir if patient else None, col_dir if patient else None,
                _evidence_header(source) if source is not None else None,
            )
            name = f"sc-{slice_index + 1:04d}.dcm"
            sc.save_as(folder / name, enforce_file_format=True)
            secondary_captures.append(sc)
            files.append(name)
            if slice_index == (self.spread.focus_index or [0])[0]:
                Image.fromarray(picture).save(folder / "preview.png")
        for_uid = self.meta.get("frame_of_reference_uid") if patient and sources else None
        if for_uid:
            pm_sources = [_evidence_header(s) for s in sources]
        else:
            pm_sources = [geometry_carrier(secondary_captures[0], affine, scale, self.identity)]
        pm = build_parametric_map(self.tile_map, pm_sources, self.identity)
        pm.save_as(folder / "pm.dcm", enforce_file_format=True)
        sr = build_structured_report(
            self.tile_map, self.spread, self.identity, self.model_checksum,
            [_evidence_header(s) for s in sources], secondary_captures, scale, pm, for_uid,
        )
        sr.save_as(folder / "sr.dcm", enforce_file_format=True)
        files += ["pm.dcm", "sr.dcm", "preview.png"]
        result = self.to_dict()
        result["outputs"] = {"secondary_captures": files[:-3], "parametric_map": "pm.dcm", "structured_report": "sr.dcm",
                             "preview": "preview.png",
                             "uids": {"sc_series": str(secondary_captures[0].SeriesInstanceUID),
                                      "pm": str(pm.SOPInstanceUID), "sr": str(sr.SOPInstanceUID)}}
        (folder / "result.json").write_text(json.dumps(result, indent=1))


def _evidence_header(ds: Dataset) -> Dataset:
    """The source header with the Type 2 patient/study attributes present (empty if unknown)."""
    header = Dataset()
    header.update(ds)
    header.file_meta = getattr(ds, "file_meta", Dataset())
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _source_key(path: Path, meta: dict) -> str:
    sources = meta["source_datasets"]
    if sources:
        return "|".join(str(ds.SOPInstanceUID) for ds in sources)
    return file_digest(path)


def analyze(
    source: str | Path | Dataset | Sequence[Dataset],
    model: str | Path | TileScorer | None = None,
    settings: AnalysisSettings | None = None,
    progress: bool = True,
    **options,
) -> AnalysisResult:
    """Analyse one input: load, preprocess, split, score, assemble, find the spread.

    Args:
        source: a path (DICOM folder or file, slide, PNG/JPEG) or pydicom datasets
            (one image, or the slices of one series).
        model: a model file, a loaded :class:`TileScorer`, or ``None`` for the shipped model.
        settings: see :class:`AnalysisSettings`; or give its fields as keyword ``options``.
        progress: show a progress bar while scoring.

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
            return _analyze_path(target, scorer, settings, progress)
    return _analyze_path(Path(source), scorer, settings, progress)


def _analyze_path(path: Path, scorer: TileScorer, settings: AnalysisSettings, progress: bool) -> AnalysisResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image, meta = LoadInput(settings.series_uid, settings.resolution_mm)(path)
        identity = OutputIdentity(_source_key(path, meta), scorer.checksum, settings.canonical())
        image, meta = NormalizeIntensity()(image, meta)
        if settings.crop == "foreground":
            image, meta = CropForeground()(image, meta)
        elif settings.crop == "template":
            image, meta = CropTemplate(settings.crop_size)(image, meta)
        image, meta = Zoom(settings.zoom)(image, meta)
        image, meta = Rotate(settings.rotate)(image, meta)
        grid = GridSplit(settings.grid, settings.tile_size, settings.tile_size_mm, settings.tissue_threshold)(image, meta)

    numbers = np.flatnonzero(grid.is_tissue.ravel()) + 1
    scores = np.empty(len(numbers), dtype=np.float32)
    layers = np.empty((len(numbers), scorer.network.num_layers), dtype=np.float32)
    batch = scorer.batch_size
    bar = tqdm(total=len(numbers), desc="scoring tiles", unit="tile", disable=not progress or len(numbers) < 2 * batch, leave=False)
    for start in range(0, len(numbers), batch):
        chunk = numbers[start : start + batch]
        result = scorer.score_details([grid.tile(image, int(n)) for n in chunk])
        scores[start : start + len(chunk)] = result.scores
        layers[start : start + len(chunk)] = result.layer_probabilities
        bar.update(len(chunk))
    bar.close()
    tile_map = Heatmap.assemble(grid, numbers, scores, layers, meta["affine"], meta["frame"], image.shape[1:3])
    spread = analyze_spread(tile_map, settings.threshold)
    return AnalysisResult(image, meta, tile_map, spread, settings, scorer.checksum, identity)
