"""The public API: :class:`AnalysisSettings`, :func:`preprocessing` and :func:`analyze`.

:func:`analyze` loads and prepares an input with the transforms of :func:`preprocessing`,
scores it (:func:`analyze_prepared`: patches at the model's scale or whole tiles, the
whole-slide stage, the tile heatmap, the spread) and returns the
:class:`~dicom_heatmap.result.AnalysisResult`, whose ``save`` writes the output folder.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from monai.transforms import Compose
from pydicom.dataset import Dataset

from dicom_heatmap.checksum import file_sha256
from dicom_heatmap.context import PatchContext, whole_slide_scores
from dicom_heatmap.domain import HE_DOMAIN, MIN_PATCH_SIDE
from dicom_heatmap.errors import ConfigurationError, InputError, checked_number, find_cause, is_uid
from dicom_heatmap.heatmap import Heatmap
from dicom_heatmap.inferer import TileGridInferer
from dicom_heatmap.network import DEFAULT_FIELD_OF_VIEW_UM, DEFAULT_INPUT_SIZE
from dicom_heatmap.result import AnalysisResult
from dicom_heatmap.scorer import TileScorer
from dicom_heatmap.spread import analyze_spread
from dicom_heatmap.writers.common import OutputIdentity
from transforms._dictionary import meta_key
from transforms.grid import SplitTileGridd, TileGrid
from transforms.intensity import NormalizeByModalityd
from transforms.io.guards import DEFAULT_MAX_VALUES
from transforms.io.load import LoadInputd
from transforms.spatial import CropToTissued, CropTemplated, RotateWithGeometryd, ZoomWithGeometryd, pixel_spacing

__all__ = ["SETTING_RANGES", "AnalysisSettings", "analyze", "analyze_prepared", "preprocessing", "project_errors",
           "model_patch_side", "DEFAULT_MAX_PATCHES"]

#: Most patches (or whole tiles) one input may have scored, checked before scoring: the
#: work bound beside the size guard's memory bound. About 14 minutes on two CPU cores at
#: the measured 16.7 ms a patch; a 75 x 25 mm slide all tissue is about 47,000 patches.
DEFAULT_MAX_PATCHES = 50_000


@dataclass(frozen=True)
class AnalysisSettings:
    """Every setting that changes the result (they enter the output UIDs).

    Attributes:
        grid: (rows, cols) of tiles; see :class:`transforms.grid.SplitTileGrid`.
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
            if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", value):
                value = [int(v) for v in re.split(r"[xX]", value)]  # "8x12", as the command line writes it
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
                raise ConfigurationError(f"{name} must be two whole numbers (rows, cols) such as 8x12, got {value!r}")
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


def _source_key(meta: dict) -> str:
    """What identifies the input: its SOP Instance UIDs, or the content of a non-DICOM file
    (the loader's cheap ``content_key`` where the format has one, else the file's sha256)."""
    sources = meta["source_datasets"]
    if sources:
        return "|".join(str(ds.SOPInstanceUID) for ds in sources)
    return meta.get("content_key") or file_sha256(Path(meta["source_path"]))


def preprocessing(settings: AnalysisSettings, key: str = "image", max_values: int = DEFAULT_MAX_VALUES,
                  model: TileScorer | None = None) -> Compose:
    """The dictionary transforms from the input path to the tile grid, for ``settings``.

    The bundle's ``configs/inference.json`` builds its preprocessing with this function.

    Args:
        settings: the analysis settings.
        key: the image key of the data dictionary.
        max_values: the loader's size guard (it does not change results, so it is no setting).
        model: the model the input is for; ``None`` for the shipped model's scale and
            normalisation. Without ``resolution_um`` or ``level``, slides are read at a
            level that suits the model's scale; CT and MR values are mapped to 0..255 as
            its domain declares (:class:`~dicom_heatmap.domain.ModelDomain`); a radiology
            model's field of view is the tile side where no grid or tile size is given.
    """
    model_scale_um = (model.field_of_view_um / model.input_size if model is not None
                      else DEFAULT_FIELD_OF_VIEW_UM / DEFAULT_INPUT_SIZE)
    domain = model.domain if model is not None else HE_DOMAIN
    steps: list = [
        LoadInputd(key, series_uid=settings.series_uid, resolution_um=settings.resolution_um, max_values=max_values,
                   level=settings.level, pixel_size_um=settings.pixel_size_um, model_scale_um=model_scale_um),
        NormalizeByModalityd(key, ct_window=domain.ct_window, percentiles=domain.mr_percentiles),
    ]
    if settings.crop == "foreground":
        steps.append(CropToTissued(key))
    elif settings.crop == "template":
        steps.append(CropTemplated(key, settings.crop_size))
    steps += [
        ZoomWithGeometryd(key, settings.zoom),
        RotateWithGeometryd(key, settings.rotate),
        SplitTileGridd(key, grid=settings.grid, tile_size=settings.tile_size, tile_size_um=settings.tile_size_um,
                       tissue_threshold=settings.tissue_threshold,
                       default_tile_size_um=model.field_of_view_um if model is not None and domain.is_radiology else None),
    ]
    return Compose(steps)


def analyze_prepared(data: dict, scorer: TileScorer, settings: AnalysisSettings, inferer: TileGridInferer | None = None,
                     key: str = "image", max_patches: int = DEFAULT_MAX_PATCHES) -> AnalysisResult:
    """Score, assemble and summarise an input that :func:`preprocessing` has prepared.

    Args:
        data: the dictionary after preprocessing (image, its metadata and its grid).
        scorer: the loaded model.
        settings: the settings the preprocessing was built from (they enter the UIDs).
        inferer: the tile inferer (a default one when ``None``).
        key: the image key of ``data``.
        max_patches: most patches (or whole tiles) to score; an input with more is refused
            before any is scored.
    """
    image, meta, grid = data[key], data[meta_key(key)], data[f"{key}_grid"]
    inferer = inferer or TileGridInferer()
    patch_side = model_patch_side(meta, scorer, image.shape[0])
    # the model sees its own field of view: patches on a lattice fixed by the image and the
    # model's scale; the grid asked for only sets the heatmap's resolution
    scored_grid = grid.lattice(patch_side, settings.tissue_threshold) if patch_side else grid
    _check_work(scored_grid, "patches" if patch_side else "tiles", max_patches, meta["source_path"])
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
    if scorer.domain.is_radiology:  # its field of view sets the grid where the settings give none
        method += f"|radiology tiles of {scorer.field_of_view_um:g} um"
    identity = OutputIdentity(source_key, scorer.identity, method)
    return AnalysisResult(image, meta, tile_map, spread, settings, scorer.checksum, identity, scorer.precision,
                          scorer.field_of_view_um, threshold, refined, scorer.domain)


def _check_work(grid: TileGrid, what: str, limit: int, source: str) -> None:
    """Refuse, before any scoring, an input with more than ``limit`` patches or tiles to score."""
    count = int(grid.is_tissue.sum())
    if count > limit:
        raise InputError(source, f"{count:,} {what} hold tissue to score, more than the limit of {limit:,} "
                                 "(--max-patches); read a coarser level (--resolution-um, --level), give a larger tile or "
                                 "pixel size, or raise the limit if you can wait for it")


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
    one), the model is a radiology model (its grid tiles are its field of view, see
    :func:`preprocessing`), the modality is not the model's (CT and MR under a slide
    model and volumes are tiled as asked), or the image is so coarse that a patch would be under
    :data:`~dicom_heatmap.domain.MIN_PATCH_SIDE` pixels.

    Args:
        meta: the loader's metadata after preprocessing (its ``affine`` is in mm).
        scorer: the model; its ``field_of_view_um`` is the patch side.
        slices: slices of the image (patches are cut from single images only).
    """
    domain = scorer.domain
    if meta["frame"] == "IMAGE" or domain.is_radiology or meta["modality"] not in domain.modalities or slices != 1:
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
    max_patches: int = DEFAULT_MAX_PATCHES,
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
        max_patches: work guard: most patches (or whole tiles) to score, checked before
            scoring (:data:`DEFAULT_MAX_PATCHES`).

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
            return analyze(target, scorer, settings, progress, max_values, max_patches)
    with warnings.catch_warnings(), project_errors():
        warnings.simplefilter("ignore")
        data = preprocessing(settings, max_values=max_values, model=scorer)({"image": Path(source)})
    return analyze_prepared(data, scorer, settings, TileGridInferer(progress), max_patches=max_patches)


@contextlib.contextmanager
def project_errors():
    """Let the project's errors through MONAI, which wraps whatever a transform raises in
    ``RuntimeError("applying transform ...")``."""
    try:
        yield
    except RuntimeError as error:
        cause = find_cause(error)
        if cause is not None:
            raise cause from None
        raise
