"""What a training run trains on what: its settings, the patient folds of each stage.

The method's three stages must each learn from patients of their own (the README's "The
method"; ``docs/architecture.md`` for the code): :func:`fold_plan` says which folds each stage takes, :func:`stage_sets` splits a
tile table by patient accordingly, and :class:`TrainSettings` holds every setting of a
run (checked when made; all saved beside the model). :mod:`pipelines.training.train` runs
the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicom_heatmap.errors import ConfigurationError, InputError, checked_number
from pipelines.training.tile_data import HELD_OUT_PATIENTS_FILE, TileTable, read_patient_list

__all__ = ["TrainSettings", "TRAIN_SETTING_RANGES", "STAGES", "fold_plan", "stage_sets"]


@dataclass
class TrainSettings:
    """Settings of one training run (all saved beside the model)."""

    input_size: int = 48
    extractor_folds: list[int] = field(default_factory=lambda: [0, 1])
    head_folds: list[int] = field(default_factory=lambda: [2])
    test_folds: list[int] = field(default_factory=lambda: [3])
    epochs: int = 10
    head_epochs: int = 30
    fusion_epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 0.02
    weight_decay: float = 5e-4
    seed: int = 20261125
    width_multiplier: float = 1.0
    bf16: bool = True
    colour_jitter: float = 1.0  # scales the H&E colour jitter (1 = the shipped model's)
    balanced_sampling: bool = False  # stage 1 draws both classes equally often instead of weighting the loss
    stain_jitter: float = 0.2  # sigma of the haematoxylin / eosin / DAB scale and shift in optical density (0 = off)
    label_smoothing: float = 0.0  # stage 1 learns 1 - eps/2 for the tile's class, eps/2 for the other (0 = hard labels)
    stain_normalisation: bool = False  # the network scales each tile's H and E to the training tiles' 99th percentiles
    head_share: float = 1.0  # share of the head folds' patients kept for stages 2-3; the rest join the extractor's
    cross_fit: bool = False  # stages 2-3: each half's heads score the other half for the fusion; heads then fit on both
    held_out_patients: list[str] = field(default_factory=list)  # in no stage, whatever their fold; tested with the test folds
    max_tiles: int | None = None  # for smoke runs: cap every split

    def __post_init__(self) -> None:
        for name, (kind, low, high) in TRAIN_SETTING_RANGES.items():
            value = getattr(self, name)
            if name == "max_tiles" and value is None:  # no cap
                continue
            setattr(self, name, checked_number(name, value, kind, low, high))


#: Range of each number of :class:`TrainSettings` (a value outside is refused before any work).
TRAIN_SETTING_RANGES = {
    "input_size": (int, 32, 512),
    "epochs": (int, 1, 1000),
    "head_epochs": (int, 1, 10_000),
    "fusion_epochs": (int, 1, 10_000),
    "batch_size": (int, 2, 4096),
    "learning_rate": (float, 1e-6, 10.0),
    "weight_decay": (float, 0.0, 1.0),
    "seed": (int, 0, 2**63 - 1),
    "width_multiplier": (float, 0.01, 1.0),
    "colour_jitter": (float, 0.0, 4.0),
    "stain_jitter": (float, 0.0, 1.0),
    "label_smoothing": (float, 0.0, 0.5),
    "head_share": (float, 0.01, 1.0),
    "max_tiles": (int, 1, 10**9),
}


def fold_plan(test_fold: int | None, folds: int = 4) -> dict:
    """Which patient folds each stage uses when ``test_fold`` is held out.

    The heads and the fusion take the fold before the test fold (split by patient
    between them); the extractor the remaining folds. ``None`` holds no fold out (the
    shipped model, which keeps only the patients of ``HELD_OUT_PATIENTS_FILE`` out) and
    keeps the cross-validated proportions: the heads and the fusion take as large a
    share of the patients as one fold is of the folds a cross-validation run trains on
    (1/3 for 4 folds), from the last two folds; the extractor takes the rest.

    Returns:
        keyword arguments of :class:`TrainSettings`.
    """
    if test_fold is None:
        return {"extractor_folds": list(range(folds - 2)), "head_folds": [folds - 2, folds - 1], "test_folds": [],
                "head_share": folds / (2 * (folds - 1)), "held_out_patients": read_patient_list(HELD_OUT_PATIENTS_FILE)}
    if not 0 <= test_fold < folds:
        raise ConfigurationError(f"test_fold must lie in 0..{folds - 1}, got {test_fold}")
    head = (test_fold - 1) % folds
    return {
        "extractor_folds": [f for f in range(folds) if f not in (test_fold, head)],
        "head_folds": [head],
        "test_folds": [test_fold],
        "head_share": 1.0,
        "held_out_patients": [],
    }


STAGES = ("extractor", "heads", "fusion", "test")


def stage_sets(table: TileTable, settings: TrainSettings, source: str | Path = "the tile table") -> dict[str, TileTable]:
    """The tiles of each stage (``STAGES``), split by patient as ``settings`` says.

    The head folds' patients (less the held-out ones) are shuffled once with the seed:
    the heads take the first half of the ``head_share`` kept, the fusion the second half,
    the extractor the rest beside its own folds. The held-out patients are in no stage
    and are tested with the test folds.

    Args:
        table: the labelled tiles.
        settings: folds, ``head_share``, ``held_out_patients``, ``seed`` and ``max_tiles``.
        source: what to name in the error when a stage gets no tiles.

    Raises:
        InputError: when the extractor, the heads or the fusion would get fewer than 2 tiles.
    """

    def split(mask: np.ndarray) -> TileTable:
        part = table.subset(mask)
        if settings.max_tiles is not None and len(part) > settings.max_tiles:
            keep = np.random.default_rng(settings.seed).choice(len(part), settings.max_tiles, replace=False)
            part = part.subset(np.sort(keep))
        return part

    held_out = np.isin(table.patients, settings.held_out_patients)
    pool = np.unique(table.patients[np.isin(table.folds, settings.head_folds) & ~held_out])
    np.random.default_rng(settings.seed).shuffle(pool)
    kept = int(round(len(pool) * settings.head_share))
    head_patients, fusion_patients, moved = pool[: kept // 2], pool[kept // 2 : kept], pool[kept:]
    sets = {
        "extractor": split((np.isin(table.folds, settings.extractor_folds) | np.isin(table.patients, moved)) & ~held_out),
        "heads": split(np.isin(table.patients, head_patients)),
        "fusion": split(np.isin(table.patients, fusion_patients)),
        "test": split(np.isin(table.folds, settings.test_folds) | held_out),
    }
    for stage, folds in [("extractor", settings.extractor_folds), ("heads", settings.head_folds), ("fusion", settings.head_folds)]:
        if len(sets[stage]) < 2:
            raise InputError(source, f"{len(sets[stage])} tile(s) for the {stage} (patient folds {folds}, less the held-out "
                             "patients): each of the three stages needs patients of its own")
    return sets
