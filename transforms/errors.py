"""The project's one family of exceptions (re-exported as ``dicom_heatmap.errors``), and its console lines.

Every message names the input concerned and says what is wrong and what to do. The
command line prints ``str(error)`` on one line and exits with :data:`EXIT_CODE`.
Messages never carry patient-identifying values: name instances by UID or by path.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import sys
from pathlib import Path
from typing import TextIO

__all__ = ["DicomHeatmapError", "InputError", "NotDicomError", "ModelError", "ConfigurationError", "OutputError",
           "EXIT_CODE", "one_line", "say", "OneLineFormatter", "find_cause", "is_uid", "checked_number"]

#: Exit status of the command line for any of these errors.
EXIT_CODE = 2
#: Longest message; header text quoted in one (a UID, a modality) cannot make it longer.
MAX_MESSAGE = 600
# C0 and C1 controls, DEL, and the characters that break or reorder a terminal line
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


_UID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")  # root 0, 1 or 2; no leading zeros


def is_uid(value: object) -> bool:
    """Whether ``value`` is a valid DICOM UID: digits and dots, root 0, 1 or 2, no leading
    zeros, at most 64 characters. The one check of the project, for what it copies, names
    files by, or quotes in a message."""
    text = str(value or "")
    return len(text) <= 64 and _UID.fullmatch(text) is not None


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` safe for one console line: control characters shown as escapes (``\\x1b``),
    never acted on, and the length bounded."""
    text = _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def say(text: str, file: TextIO | None = None) -> None:
    """Print ``text`` as one console line (see :func:`one_line`): every line a command prints
    goes through here, since paths and header values in it are the user's or the input's,
    and a path may hold ESC, BEL or a newline."""
    print(one_line(text), file=file or sys.stdout)


def find_cause(error: BaseException | None, kind: type[BaseException] | tuple[type[BaseException], ...] = (),
               where=lambda found: True) -> BaseException | None:
    """The first of ``error`` and the exceptions it was raised from or during (``__cause__``,
    else ``__context__``) that is a ``kind`` (the project's :class:`DicomHeatmapError` by
    default) and meets ``where``; None if none is. Libraries wrap what they catch (MONAI in
    ``RuntimeError``, pydicom a write error in one without errno): the first is what to tell."""
    kind = kind or DicomHeatmapError
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind) and where(error):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class OneLineFormatter(logging.Formatter):
    """A log formatter whose every record is one console line (see :func:`one_line`)."""

    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record), limit=4 * MAX_MESSAGE)


class DicomHeatmapError(Exception):
    """Base of all errors raised on purpose by dicom-heatmap.

    Its text is always one line (see :func:`one_line`): messages may quote header values
    of an untrusted input, such as a transfer syntax UID holding CR LF or ESC sequences.
    """

    def __str__(self) -> str:
        return one_line(super().__str__())


class InputError(DicomHeatmapError):
    """An input file or folder cannot be analysed.

    Args:
        source: the file, folder or object (e.g. an SOP Instance UID) concerned.
        problem: what is wrong, and where useful what to do about it.
    """

    def __init__(self, source: str | Path, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class NotDicomError(InputError):
    """A file in a folder being read as DICOM is no DICOM file (a folder may hold others)."""


class ModelError(InputError):
    """A model file is missing or does not hold this network."""


class ConfigurationError(DicomHeatmapError):
    """An option or setting has a value that cannot work."""


class OutputError(InputError):
    """The results cannot be written where asked."""


def checked_number(name: str, value, kind: type, low: float, high: float):
    """``value`` as ``kind`` if it is a finite number in [low, high]; else a ConfigurationError
    naming the setting ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigurationError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high or (kind is int and value != int(value)):
        what = "a whole number" if kind is int else "a number"
        raise ConfigurationError(f"{name} must be {what} from {low:g} to {high:g}, got {value!r}")
    return kind(value)
