"""A training datalist in MONAI's convention: which images and lesion labels to learn from.

The file is the JSON that MONAI bundles and MONAI Label read
(:func:`monai.data.load_decathlon_datalist`)::

    {"training":   [{"image": "series/ct01", "label": "seg/ct01.dcm"}, ...],
     "validation": [{"image": "series/ct20", "label": "masks/ct20.nii.gz"}, ...]}

Paths are relative to the datalist's folder. Each entry:

* ``image`` (required): a DICOM series folder, or one DICOM file (an enhanced CT/MR
  multi-frame volume or a single image);
* ``label`` (required): a DICOM Segmentation of that series (read with highdicom) or a
  NIfTI mask (``.nii``/``.nii.gz``) on the image's voxel grid;
* ``segment``: which segment of a SEG is the lesion, by number or by label (needed when
  the SEG has several);
* ``fold``: a patient-level fold (whole numbers); without a ``validation`` list the
  highest fold validates and the next highest trains the heads and the fusion;
* ``patient``: who the image is of, where the image does not say (its Patient ID, else
  its Study Instance UID, is used otherwise).

Other top-level keys (``name``, ``description``, ``labels`` of a Decathlon datalist) are
allowed and ignored. Every problem is one line naming the file, the entry and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicom_heatmap.errors import ConfigurationError, InputError
from dicom_heatmap.schema import check_schema

__all__ = ["DatalistEntry", "DATALIST_SCHEMA", "read_datalist", "stage_folds", "EXTRACTOR_FOLD", "HEAD_FOLD", "TEST_FOLD"]

_ENTRY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["image", "label"],
    "properties": {
        "image": {"type": "string", "minLength": 1, "description": "a DICOM series folder or file"},
        "label": {"type": "string", "minLength": 1, "description": "a DICOM SEG or a NIfTI mask"},
        "segment": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "minLength": 1}],
                    "description": "a segment number (1, 2, ...) or label"},
        "fold": {"type": "integer", "minimum": 0, "maximum": 1000, "description": "a whole number 0..1000"},
        "patient": {"type": "string", "minLength": 1, "maxLength": 64},
    },
}

#: The datalist's rules (JSON Schema 2020-12)
DATALIST_SCHEMA = {
    "type": "object",
    "required": ["training"],
    "properties": {
        "training": {"type": "array", "minItems": 1, "items": _ENTRY},
        "validation": {"type": "array", "items": _ENTRY},
    },
}

#: The folds of :class:`~pipelines.training.tile_data.TileTable` a datalist's patients get
EXTRACTOR_FOLD, HEAD_FOLD, TEST_FOLD = 0, 1, 2


@dataclass(frozen=True)
class DatalistEntry:
    """One image and its lesion label.

    Attributes:
        image: the image (absolute, or relative to the working folder).
        label: the SEG or NIfTI mask.
        segment: the SEG's segment (number or label), or None for its only one.
        fold: the entry's fold, or None.
        patient: the patient as the datalist names it, or None.
        validation: whether the entry validates (never trained on).
        where: the entry in words for messages (``training[3]``).
    """

    image: Path
    label: Path
    segment: int | str | None
    fold: int | None
    patient: str | None
    validation: bool
    where: str


def read_datalist(path: str | Path) -> list[DatalistEntry]:
    """Read and check a datalist; paths come back resolved against its folder.

    Raises:
        InputError: the file is missing or not JSON, or an image or label does not exist.
        ConfigurationError: the JSON breaks :data:`DATALIST_SCHEMA`, or a pair appears twice.
    """
    from monai.data import load_decathlon_datalist

    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "the datalist does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(path, f"cannot read the datalist as JSON ({type(error).__name__}: "
                               f"{str(error).splitlines()[0][:120]})") from None
    check_schema(raw, DATALIST_SCHEMA, path)
    entries = []
    for key in ("training", "validation"):
        if key not in raw:
            continue
        for index, item in enumerate(load_decathlon_datalist(path, True, key, path.parent)):
            where = f"{key}[{index}]"
            for field in ("image", "label"):
                if not Path(item[field]).exists():
                    raise InputError(path, f"{where}.{field}: {item[field]} does not exist")
            entries.append(DatalistEntry(Path(item["image"]), Path(item["label"]), raw[key][index].get("segment"),
                                         raw[key][index].get("fold"), raw[key][index].get("patient"),
                                         key == "validation", where))
    seen: dict[tuple[Path, Path], str] = {}
    for entry in entries:
        pair = (entry.image.resolve(), entry.label.resolve())
        if pair in seen:
            raise ConfigurationError(f"{path}: {entry.where} repeats {seen[pair]} (the same image and label)")
        seen[pair] = entry.where
    return entries


def stage_folds(patients: list[str], entries: list[DatalistEntry], seed: int, source: str | Path) -> dict[str, int]:
    """The fold of each patient: :data:`TEST_FOLD` (validation), :data:`HEAD_FOLD` (the
    heads and the fusion, split between them by patient later) or :data:`EXTRACTOR_FOLD`.

    With a ``validation`` list its patients validate. Otherwise, where entries give folds,
    the highest fold validates. The heads and the fusion take the next highest fold where
    folds are given, else a third of the training patients (at least two), drawn with
    ``seed``; the extractor the rest.

    Args:
        patients: the patient of each entry, in the order of ``entries``.
        entries: the datalist's entries.
        seed: the draw's seed.
        source: the datalist, for messages.

    Raises:
        InputError: a patient both trains and validates; too few patients for the stages.
    """
    folds = sorted({e.fold for e in entries if e.fold is not None and not e.validation})
    validates = [e.validation for e in entries]
    if not any(validates) and len(folds) > 1:
        validates = [e.fold == folds[-1] for e in entries]
        folds = folds[:-1]
    validating = {p for p, v in zip(patients, validates) if v}
    training = {p for p, v in zip(patients, validates) if not v}
    if training & validating:
        raise InputError(source, f"{len(training & validating)} patient(s) have entries that train and entries that "
                                 "validate: split by patient, never by image")
    pool = sorted(set(training))
    if len(folds) > 1:
        heads = {p for p, e in zip(patients, entries) if e.fold == folds[-1] and p in pool}
    else:
        order = np.random.default_rng(seed).permutation(len(pool))
        heads = {pool[i] for i in order[: max(2, round(len(pool) / 3))]}
    if len(heads) < 2 or len(pool) - len(heads) < 1:
        raise InputError(source, f"{len(pool)} training patient(s): the three stages need patients of their own "
                                 "(at least one for the extractor and two for the heads and the fusion)")
    return {p: (TEST_FOLD if p in validating else HEAD_FOLD if p in heads else EXTRACTOR_FOLD) for p in patients}
