"""What the job needs from an archive, whatever the protocol: find, retrieve, store.

:class:`Archive` is the interface; :mod:`pipelines.pacs.dimse` (C-FIND, C-GET or C-MOVE,
C-STORE) and :mod:`pipelines.pacs.dicomweb` (QIDO-RS, WADO-RS, STOW-RS) implement it, and
:func:`pipelines.pacs.connect.open_archive` chooses one (this module imports neither).
Both raise :class:`ArchiveUnavailable` for faults that may pass (the archive is down,
refuses the association, times out) and :class:`ArchiveRefused` when the archive answers
that it will not take or give an object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset

from dicom_heatmap.errors import DicomHeatmapError, InputError, is_uid
from dicom_heatmap.writers.common import is_result_description

from pipelines.pacs.config import Query
from pipelines.pacs.ledger import SeriesRef

__all__ = ["Archive", "ArchiveUnavailable", "ArchiveRefused", "checked_uid",
           "is_our_output", "series_from_answer", "write_instance"]

class ArchiveUnavailable(DicomHeatmapError):
    """The archive cannot be reached or does not answer now; trying later may work."""


class ArchiveRefused(DicomHeatmapError):
    """The archive answered, and refused (an object it will not store, a failed retrieve)."""


def checked_uid(value: object, what: str) -> str:
    """A UID fit to name a file: digits and dots only, at most 64 characters.

    Files are named by UID, and UIDs come from headers and peers; anything else (a path
    separator, ``..``, a patient name) is refused here.
    """
    text = str(value or "").strip().rstrip("\x00")
    if not is_uid(text):
        raise InputError(what, "not a valid DICOM UID (digits and dots, at most 64 characters)")
    return text


def series_from_answer(answer: Dataset, modality: str, source: str) -> SeriesRef:
    """A series-level query answer (C-FIND or QIDO-RS) as a :class:`SeriesRef`, its UIDs checked."""
    count = answer.get("NumberOfSeriesRelatedInstances")
    return SeriesRef(
        study_uid=checked_uid(answer.get("StudyInstanceUID"), f"{source}: a study found"),
        series_uid=checked_uid(answer.get("SeriesInstanceUID"), f"{source}: a series found"),
        modality=str(answer.get("Modality") or modality),
        instances=int(count) if count not in (None, "") else None,
        series_description=str(answer.get("SeriesDescription") or ""),
        body_part=str(answer.get("BodyPartExamined") or ""),
    )


def is_our_output(series: SeriesRef) -> bool:
    """Series that hold dicom-heatmap results (never analysed again)."""
    return is_result_description(series.series_description)


def write_instance(folder: Path, sop_uid: str, encoded: bytes) -> Path:
    """Write one received instance as ``folder/<SOP Instance UID>.dcm``, whole or not at all."""
    name = checked_uid(sop_uid, "a received instance's SOP Instance UID")
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{name}.dcm"
    partial = folder / f".{name}.partial"
    partial.write_bytes(encoded)
    partial.replace(final)
    return final


class Archive(Protocol):
    """The three things the job asks of an archive."""

    name: str

    def find_series(self, query: Query) -> list[SeriesRef]:
        """Series matching the query's modalities, date range and description pattern."""

    def retrieve(self, series: SeriesRef, folder: Path) -> int:
        """Fetch every instance of the series into ``folder`` (named by SOP Instance UID)."""

    def store(self, paths: list[Path]) -> int:
        """Store the files; an instance the archive already holds counts as stored."""
