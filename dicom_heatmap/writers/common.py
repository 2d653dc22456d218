"""What the three DICOM writers share: identity, deterministic UIDs, the reference header."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_heatmap._version import __version__

__all__ = [
    "ALGORITHM_NAME", "MANUFACTURER", "SERIES_DESCRIPTION_SUFFIX", "OutputIdentity",
    "synthetic_reference", "patient_orientation", "CODING_SCHEME", "code", "PATIENT_STUDY_KEYWORDS", "result_series", "is_result_description", "equipment",
    "read_standard_tables_in_background",
]

ALGORITHM_NAME = "dicom-heatmap VGG16 13-head tile scorer"
MANUFACTURER = "dicom-heatmap"
SERIES_DESCRIPTION_SUFFIX = "research only, not for diagnostic use"

#: The private coding scheme of the concepts that have no standard code.
CODING_SCHEME = "99DHM"
CODING_SCHEME_NAME = "dicom-heatmap private concepts"

#: Type 2 attributes of the Patient and General Study modules a reference header must hold.
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)


def read_standard_tables_in_background() -> None:
    """Start reading highdicom's tables of the standard in a thread.

    highdicom reads them (22 MB of JSON, about half a second) when a process builds its
    first object; started before the model loads and scores, the reading overlaps that
    work, most of which releases the interpreter lock. Only a warm-up: if highdicom
    renames its private loader, nothing is read early and nothing else changes.
    """
    from highdicom import _standard_utils  # private, pinned: see the docstring

    loader = getattr(_standard_utils, "get_module_attribute_map", None)
    if callable(loader):
        threading.Thread(target=loader, name="highdicom-tables", daemon=True).start()


def equipment() -> dict:
    """The General Equipment arguments highdicom's image constructors take, the same in
    every output."""
    return {"manufacturer": MANUFACTURER, "manufacturer_model_name": "dicom-heatmap", "software_versions": __version__,
            "device_serial_number": "none"}


def code(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of the private coding scheme."""
    return hd.sr.CodedConcept(value, CODING_SCHEME, meaning)


def coding_scheme_identification() -> Dataset:
    """The CodingSchemeIdentificationSequence item that declares :data:`CODING_SCHEME`."""
    item = Dataset()
    item.CodingSchemeDesignator = CODING_SCHEME
    item.CodingSchemeName = CODING_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


@dataclass(frozen=True)
class OutputIdentity:
    """Everything the UIDs of one analysis derive from, so a rerun gives the same objects.

    Args:
        source_key: identifies the input: its first SOP Instance UID, or the sha256 of a
            non-DICOM file.
        model_checksum: sha256 of the model file.
        settings: canonical text of every setting that changes the result.
    """

    source_key: str
    model_checksum: str
    settings: str

    def uid(self, *parts: object) -> UID:
        """A UID (2.25 form) determined by the identity, :data:`OUTPUT_REVISION` and ``parts``
        (e.g. "sc", 3)."""
        return derived_uid(self.source_key, self.model_checksum, self.settings, f"outputs {OUTPUT_REVISION}", *parts)

    @property
    def folder_name(self) -> str:
        """Name of the output folder of this analysis: derived, never taken from a header."""
        return str(self.uid("result-folder"))


#: What the writers put into each object, as a number: raised whenever an object's content
#: changes for the same input, model and settings, so that an archive holding the older
#: object receives the new one under new UIDs instead of answering "already stored"
#: (2: version 1.6.0 - the slide SEG that Orthanc's GDCM plugin can render, notices and
#: labelled tile numbers in the pictures; 3: version 1.7.0 - OpenVINO runs the heads and the
#: fusion too, in bf16, which moves OpenVINO's scores by up to a few thousandths).
OUTPUT_REVISION = 3


def derived_uid(*parts: object) -> UID:
    """A 2.25 UID from a name-based (SHA-1, version 5) UUID of ``parts``: same parts, same UID.

    (pydicom's ``generate_uid(prefix=None, ...)`` ignores its entropy sources and is random.)
    """
    name = "\x1f".join(str(part) for part in parts)
    return UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}")


#: kind: (offset of the Series Number, what the series holds)
_RESULT_SERIES = {"sc": (1, "Tumour heatmap"), "pm": (2, "Tumour score map"), "sr": (3, "Tumour report"),
                  "seg": (4, "Tumour lesions")}
#: Series Numbers of results whose source has none (slide files, pictures): 9701-9703.
_UNNUMBERED_BASE = 9700
_LO_MAX = 64


def result_series(reference: Dataset, kind: str) -> tuple[int, str]:
    """Series Number and Series Description of one result series (``kind``: sc, pm, sr or seg).

    Results of source series N are numbered N * 1000 + 1, 2, 3, 4 and their description names
    series N and its description, so that in an archive's list of a study holding several
    analysed series each result series says which series it came from. A source without
    a Series Number gives 9701-9704. The source's description is quoted only if it is
    printable ASCII (it is shortened to fit the 64 characters of LO).

    Args:
        reference: the source header (its SeriesNumber and SeriesDescription are read).
        kind: ``"sc"``, ``"pm"``, ``"sr"`` or ``"seg"``.
    """
    if kind not in _RESULT_SERIES:
        raise ValueError(f"kind must be one of {', '.join(_RESULT_SERIES)}, got {kind!r}")
    offset, name = _RESULT_SERIES[kind]
    try:
        source_number = int(reference.get("SeriesNumber"))
    except (TypeError, ValueError):
        source_number = None
    if source_number is None or not 0 <= source_number < 2_000_000:  # IS holds at most 2**31 - 1
        return _UNNUMBERED_BASE + offset, f"{name} ({SERIES_DESCRIPTION_SUFFIX})"
    text = f"{name} of series {source_number}"
    described = str(reference.get("SeriesDescription") or "").strip()
    if described.isascii() and described.isprintable() and "\\" not in described:
        room = _LO_MAX - len(text) - len(" '' (research only)")
        if len(described) > room:
            described = described[: max(room - 3, 0)].rstrip() + "..."
        if described and room > 3:
            text += f" '{described}'"
    return source_number * 1000 + offset, f"{text} (research only)"


def is_result_description(description: str) -> bool:
    """Whether a Series Description is one :func:`result_series` writes (the PACS job never
    analyses its own results)."""
    text = str(description or "")
    return text.startswith(tuple(name for _, name in _RESULT_SERIES.values())) and (
        text.endswith("(research only)") or text.endswith(f"({SERIES_DESCRIPTION_SUFFIX})"))


def synthetic_reference(identity: OutputIdentity, modality: str) -> Dataset:
    """Patient and study header for an input that has none (slide files, pictures).

    The patient is unknown (empty Type 2 attributes) and the study is new, with a UID
    derived from the file's content, so every run on the same file joins one study.
    """
    ds = Dataset()
    for keyword in PATIENT_STUDY_KEYWORDS:
        setattr(ds, keyword, None)
    ds.StudyInstanceUID = derived_uid(identity.source_key, "study")
    ds.Modality = modality
    return ds


_LPS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))


def patient_orientation(direction: np.ndarray) -> str:
    """Patient Orientation letters of a direction in LPS, main component first (e.g. "LP")."""
    direction = np.asarray(direction, dtype=float)
    order = np.argsort(-np.abs(direction))
    letters = [_LPS_LETTERS[i][int(direction[i] > 0)] for i in order if abs(direction[i]) > 1e-3]
    return "".join(letters[:3])
