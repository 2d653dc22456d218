"""Refuse outputs that would carry header values which are not valid DICOM.

The outputs copy the source's patient, study and reference attributes. A damaged
source header (a UID with a letter in it, a control character in a name) would
otherwise make every output fail validation at the PACS. Values are never repaired:
patient data is not ours to change. Messages name the attribute, never its value.
"""

from __future__ import annotations

import re

from pydicom.charset import ENCODINGS_TO_CODES, convert_encodings
from pydicom.config import RAISE
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from dicom_heatmap.errors import InputError, is_uid

__all__ = ["check_encodable"]

#: Control characters no decoded string value may hold: C0 (ESC included: a valid ISO 2022
#: escape sequence of a declared character set is the encoding and is passed over, so one
#: left over is not text), DEL and C1. The text VRs may also hold TAB, LF, FF and CR.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TEXT_VRS = {"LT", "ST", "UT"}
_CHECKED_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}


def _designations(dataset: Dataset) -> list[str]:
    """The ISO 2022 escape sequences that designate the dataset's declared character sets.

    pydicom leaves some of them in the text it decodes (``ESC $ ) A`` of ISO 2022 IR 58,
    GB2312): they are the encoding, not characters of the value."""
    charset = dataset.get("SpecificCharacterSet")
    if not charset:
        return []
    try:
        encodings = convert_encodings(charset)
    except (LookupError, ValueError):
        return []  # refused when the source was read (transforms.io.dicom.require_identity)
    return [ENCODINGS_TO_CODES[e].decode("latin-1") for e in encodings if e in ENCODINGS_TO_CODES]


def _problem(element, designations: list[str] = ()) -> str | None:
    if element.VR not in _CHECKED_VRS or element.value in (None, ""):
        return None
    values = element.value if element.VM > 1 else [element.value]
    for value in values:
        # numbers (DSfloat, IS) are checked as the text they are written as; names as the
        # text pydicom decoded with the Specific Character Set (their stored bytes may hold
        # the escape sequences of ISO 2022, which are no characters of the name)
        if element.VR == "PN":
            text = str(value)
        else:
            text = getattr(value, "original_string", None) or (str(value) if not isinstance(value, (str, bytes)) else value)
        try:
            validate_value(element.VR, text, RAISE)
        except (ValueError, TypeError):
            return f"is not a valid {element.VR} value"
        if element.VR == "UI" and not is_uid(value):
            return "is not a valid UID (root 0, 1 or 2, digits and dots, no leading zeros)"
        characters = text if isinstance(text, str) else ""
        for designation in designations:
            characters = characters.replace(designation, "")
        if element.VR in _TEXT_VRS:
            characters = re.sub(r"[\t\n\f\r]", "", characters)
        if _CONTROL.search(characters):
            return f"holds a control character, which {element.VR} does not allow"
    return None


def check_encodable(dataset: Dataset, source: str) -> None:
    """Raise :class:`InputError` naming the first attribute of ``dataset`` whose value is invalid."""
    designations = _designations(dataset)
    for element in dataset.iterall():
        problem = _problem(element, designations)
        if problem:
            name = element.keyword or f"({element.tag.group:04X},{element.tag.element:04X})"
            raise InputError(source, f"the header's {name} {problem}, and the results would copy it; "
                                     "correct the source header before analysis")
