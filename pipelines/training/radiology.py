"""The method's three stages on one's own CT or MR: a datalist of series and lesion labels.

:func:`train_datalist` reads every pair of a datalist (:mod:`pipelines.training.datalist`)
as the analysis reads an input (:mod:`pipelines.training.lesion_labels`): the model's
intensity normalisation (CT window in HU, MR percentiles), the grid of tiles of the
model's field of view. A tissue tile is positive where at least ``lesion_fraction`` of
its pixels are lesion. Patients are split between the stages (never tiles), and the
three stages of :func:`pipelines.training.train.train` run on those tiles, from a random
start or from given weights, checkpointed and resumable.

The model file declares its domain (:class:`dicom_heatmap.domain.ModelDomain`): the
modalities and body part of its series, the field of view, the normalisation, the
lesion fraction, a summary of the training data, and the layer-disagreement limit
(1.25 times the highest mean disagreement of a training patient's tiles, so that inputs
unlike the training series are flagged). ``OUT/model_card.md`` describes the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dicom_heatmap.api import AnalysisSettings
from dicom_heatmap.domain import ModelDomain
from dicom_heatmap.errors import ConfigurationError, ModelError, checked_number
from dicom_heatmap.network import HeadedVGG16
from dicom_heatmap.scorer import TileScorer
from pipelines.training.datalist import HEAD_FOLD, TEST_FOLD, read_datalist, stage_folds
from pipelines.training.lesion_labels import load_labelled
from pipelines.training.plan import TrainSettings
from pipelines.training.tile_data import TileTable
from pipelines.training.train import tap_features, train

__all__ = ["train_datalist", "datalist_tiles", "radiology_settings", "DatalistTiles", "DEFAULT_FIELD_OF_VIEW_MM",
           "DEFAULT_LESION_FRACTION"]

#: Side of a tile the radiology model sees, in mm (lesions of 1-5 cm span a few tiles)
DEFAULT_FIELD_OF_VIEW_MM = 10.0
#: Least lesion share of a positive tile
DEFAULT_LESION_FRACTION = 0.25
#: A grid tile of CT/MR is some tens of pixels: the network's input side for them
RADIOLOGY_INPUT_SIZE = 32
#: The disagreement limit over the highest training patient's mean
DISAGREEMENT_MARGIN = 1.25
#: Negative tiles kept from a series, per positive tile (at least :data:`MIN_NEGATIVES`): a
#: CT of 300 slices has some 200,000 tissue tiles of 10 mm, nearly all without lesion
NEGATIVES_PER_POSITIVE = 20
MIN_NEGATIVES = 500


def radiology_settings(**given) -> TrainSettings:
    """:class:`TrainSettings` for grey CT/MR tiles: 32 px input, no stain jitter, half the
    colour jitter (brightness and contrast), the datalist's stage folds; ``given`` overrides."""
    values = dict(input_size=RADIOLOGY_INPUT_SIZE, stain_jitter=0.0, colour_jitter=0.5, extractor_folds=[0],
                  head_folds=[HEAD_FOLD], test_folds=[TEST_FOLD], head_share=1.0, held_out_patients=[])
    values.update(given)
    return TrainSettings(**values)


@dataclass
class DatalistTiles:
    """A datalist's tiles and what each pair gave.

    Attributes:
        table: the tiles (folds: :data:`~pipelines.training.datalist.EXTRACTOR_FOLD`,
            ``HEAD_FOLD``, ``TEST_FOLD``).
        pairs: per entry: where, image, patient, modality, body part, fold, tiles, positive tiles.
    """

    table: TileTable
    pairs: list[dict]


def _resized(tiles: list[np.ndarray], size: int) -> np.ndarray:
    """Tiles (H, W, 3) uint8 -> (N, size, size, 3) uint8, resampled as the scorer does."""
    out = np.empty((len(tiles), size, size, 3), dtype=np.uint8)
    for index, tile in enumerate(tiles):
        x = torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1)[None].float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[index] = x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def datalist_tiles(datalist: str | Path, scorer: TileScorer, lesion_fraction: float, seed: int,
                   progress: bool = True) -> DatalistTiles:
    """The tissue tiles of every pair of ``datalist``, labelled by lesion share: every
    positive tile and, drawn with ``seed``, up to :data:`NEGATIVES_PER_POSITIVE` negative
    tiles per positive one (at least :data:`MIN_NEGATIVES`) of each series.

    Args:
        datalist: the datalist file.
        scorer: the model the tiles are for (its field of view and normalisation).
        lesion_fraction: least lesion share of a positive tile.
        seed: the seed of the patient split.
        progress: show a progress bar.
    """
    entries = read_datalist(datalist)
    images, labels, patients, pairs = [], [], [], []
    rng = np.random.default_rng(seed)
    for entry in tqdm(entries, desc="reading series", unit="series", disable=not progress):
        labelled = load_labelled(entry, scorer, AnalysisSettings())
        tissue = np.flatnonzero(labelled.grid.is_tissue.ravel()) + 1
        is_positive = labelled.share.ravel()[tissue - 1] >= lesion_fraction
        negatives = tissue[~is_positive]
        keep = max(MIN_NEGATIVES, NEGATIVES_PER_POSITIVE * int(is_positive.sum()))
        if len(negatives) > keep:
            negatives = np.sort(rng.choice(negatives, keep, replace=False))
        numbers = np.sort(np.concatenate([tissue[is_positive], negatives]))
        positive = labelled.share.ravel()[numbers - 1] >= lesion_fraction
        images.append(_resized(labelled.grid.tiles(labelled.image, numbers), scorer.input_size))
        labels.append(positive.astype(np.int64))
        patients.append(labelled.patient)
        pairs.append({"where": entry.where, "image": str(entry.image), "label": str(entry.label),
                      "patient": labelled.patient, "modality": labelled.meta["modality"], "body_part": labelled.body_part,
                      "tissue_tiles": int(len(tissue)), "tiles": int(len(numbers)), "positive": int(positive.sum())})
    fold_of = stage_folds(patients, entries, seed, datalist)
    for pair in pairs:
        pair["fold"] = fold_of[pair["patient"]]
    return DatalistTiles(
        TileTable(np.concatenate(images), np.concatenate(labels),
                  np.concatenate([[p] * len(x) for p, x in zip(patients, labels)]).astype(str),
                  np.concatenate([[fold_of[p]] * len(x) for p, x in zip(patients, labels)]).astype(np.int64)),
        pairs)


def _starting_weights(net: HeadedVGG16, init: Path) -> None:
    """Load the learnt weights of a model file or checkpoint into ``net`` (its buffers that
    describe the model - input size, field of view, domain, stain reference - stay)."""
    try:
        state = torch.load(init, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several kinds on a damaged file
        raise ModelError(init, f"cannot read the starting weights ({type(error).__name__})") from None
    if isinstance(state, dict) and "network" in state and "optimizer" in state:
        state = state["network"]
    kept = {"input_size", "field_of_view_um", "domain", "stain_reference", "mean", "std"}
    own = net.state_dict()
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if k in own and k not in kept}
    wrong = [k for k, v in weights.items() if v.shape != own[k].shape]
    if not weights or wrong:
        raise ModelError(init, "the starting weights are not of this network's shape (width)")
    net.load_state_dict(weights, strict=False)


def train_datalist(datalist: str | Path, out_dir: str | Path, settings: TrainSettings | None = None,
                   field_of_view_mm: float = DEFAULT_FIELD_OF_VIEW_MM, lesion_fraction: float = DEFAULT_LESION_FRACTION,
                   init: str | Path | None = None, ct_window: tuple[float, float] = (40.0, 400.0),
                   mr_percentiles: tuple[float, float] = (1.0, 99.0), progress: bool = True) -> Path:
    """Train a CT/MR model on a datalist; write ``OUT/model.pt``, ``training.json`` and ``model_card.md``.

    Args:
        datalist: the datalist (see :mod:`pipelines.training.datalist`).
        out_dir: the checkpoint, the model, the record and the card go here.
        settings: by default :func:`radiology_settings`; its folds are the datalist's.
        field_of_view_mm: side of a tile in mm (the analysis's grid for the model).
        lesion_fraction: least lesion share of a positive tile.
        init: start from these weights (a model file such as the shipped one, or a
            checkpoint) instead of a random start.
        ct_window: (centre, width) in HU mapping CT to 0..255.
        mr_percentiles: MR percentiles mapped to 0 and 255.
        progress: show progress bars.

    Returns:
        the model file.
    """
    settings = settings or radiology_settings()
    field_of_view_mm = checked_number("field_of_view_mm", field_of_view_mm, float, 0.05, 100.0)
    lesion_fraction = checked_number("lesion_fraction", lesion_fraction, float, 0.01, 1.0)
    try:
        domain = ModelDomain(modalities=("CT", "MR"), description="CT/MR lesions", ct_window=ct_window,
                             mr_percentiles=mr_percentiles, lesion_fraction=lesion_fraction)
    except ValueError as error:
        raise ConfigurationError(str(error)) from None
    torch.manual_seed(settings.seed)  # the random start is the seed's, as in train()
    net = HeadedVGG16(input_size=settings.input_size, width_multiplier=settings.width_multiplier,
                      field_of_view_um=field_of_view_mm * 1000.0, domain=domain)
    if init is not None:
        _starting_weights(net, Path(init))
    scorer = TileScorer(net, "training", precision="fp32", backend="torch")  # reads the pairs as analyze would
    tiles = datalist_tiles(datalist, scorer, lesion_fraction, settings.seed, progress)
    pairs = tiles.pairs
    modalities = tuple(sorted({p["modality"] for p in pairs}))
    parts = {p["body_part"] for p in pairs}
    body_part = parts.pop() if len(parts) == 1 else None
    summary = {
        "datalist": str(datalist), "series": len(pairs), "patients": len({p["patient"] for p in pairs}),
        "tiles": int(len(tiles.table)), "positive_tiles": int(tiles.table.labels.sum()),
        "validation_series": sum(p["fold"] == TEST_FOLD for p in pairs), "init": str(init) if init else None,
    }
    words = f"{'/'.join(modalities)}{' of the ' + body_part.lower() if body_part else ''}"
    trained_on = summary["series"] - summary["validation_series"]
    domain = replace(domain, modalities=modalities, body_part=body_part, training_data=summary,
                     description=f"{words} lesions as in its {trained_on} training series, tiles of {field_of_view_mm:g} mm")
    net.set_domain(domain)

    def finish(trained: HeadedVGG16, record: dict, sets: dict) -> None:
        limit = _disagreement_limit(trained, sets, settings)
        final = replace(domain, disagreement_limit=limit)
        trained.set_domain(final)
        record.update(domain=json.loads(final.to_json()), pairs=pairs)
        _write_model_card(Path(out_dir) / "model_card.md", final, record, field_of_view_mm)

    return train(tiles.table, out_dir, settings, network=net, before_save=finish)


def _disagreement_limit(net: HeadedVGG16, sets: dict, settings: TrainSettings) -> float:
    """:data:`DISAGREEMENT_MARGIN` times the highest mean layer disagreement of a training
    patient (the stages' tiles, never the validation's)."""
    highest = 0.0
    for name in ("extractor", "heads", "fusion"):
        table = sets[name]
        if not len(table):
            continue
        pooled, _ = tap_features(net, table, settings)
        with torch.no_grad():
            spread = net.head_probabilities(pooled).double().std(dim=1, unbiased=False).numpy()
        for patient in np.unique(table.patients):
            highest = max(highest, float(spread[table.patients == patient].mean()))
    return round(min(0.5, DISAGREEMENT_MARGIN * highest), 4)


def _write_model_card(path: Path, domain: ModelDomain, record: dict, field_of_view_mm: float) -> None:
    """The model card of a datalist run: the domain, the data and its split, the metrics."""
    data, test = domain.training_data, record.get("test")
    rows = [f"| {p['where']} | {p['modality']} | {p['body_part'] or '-'} | {['extractor', 'heads and fusion', 'validation'][p['fold']]} "
            f"| {p['tissue_tiles']} | {p['tiles']} | {p['positive']} |" for p in record["pairs"]]
    metrics = (f"- Tile AUC on the validation series' tiles: fusion {test['fusion_auc']:.3f}, stage-1 classifier "
               f"{test['classifier_auc']:.3f} (per head: {', '.join(f'{v:.2f}' for v in test['head_auc'])}).\n"
               if test else "- No validation series: no test metrics.\n")
    text = f"""# Model card: {domain.description}

Trained with `dicom-heatmap train --datalist {data['datalist']}`{' from ' + data['init'] if data['init'] else ' from a random start'}.
Research use only, not for diagnosis.

## Domain (stored in the model file; `analyze` compares each input with it)
- Modalities: {', '.join(domain.modalities)}; body part: {domain.body_part or 'not one (or not stated)'}.
- Tile (field of view): {field_of_view_mm:g} mm a side; the analysis's grid uses it unless a grid or tile size is given.
- Intensity: CT window centre {domain.ct_window[0]:g} HU, width {domain.ct_window[1]:g} HU; MR percentiles {domain.mr_percentiles[0]:g}-{domain.mr_percentiles[1]:g}.
- A tile is positive where at least {domain.lesion_fraction:g} of its pixels are lesion.
- Layer-disagreement limit {domain.disagreement_limit:g} ({DISAGREEMENT_MARGIN:g} x the highest mean of a training patient).

## Data
{data['series']} series of {data['patients']} patients, {data['tiles']} tiles kept (every positive one and at most {NEGATIVES_PER_POSITIVE} negative
ones per positive, at least {MIN_NEGATIVES}, of each series), {data['positive_tiles']} positive;
{data['validation_series']} series validate (never trained on). Split by patient:

| entry | modality | body part | stage | tissue tiles | tiles kept | positive |
| --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

## Metrics
{metrics}- Stage 1, last epoch: loss {record['history'][-1]['loss']:.3f}, AUC on the fusion patients {record['history'][-1]['validation_auc']:.3f}.
- Per-series AUC, lesion detection and spread direction: `dicom-heatmap evaluate --datalist DATALIST --model MODEL`.

## Settings
`{json.dumps(record['settings'])}`
"""
    path.write_text(text, encoding="utf-8")
