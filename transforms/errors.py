"""The project's one family of exceptions (re-exported as ``dicom_heatmap.errors``).

Every message names the input concerned and says what is wrong and what to do. The
command line prints ``str(error)`` on one line and exits with :data:`EXIT_CODE`.
Messages never carry patient-identifying values: name instances by UID or by path.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DicomHeatmapError", "InputError", "ModelError", "ConfigurationError", "OutputError", "EXIT_CODE"]

#: Exit status of the command line for any of these errors.
EXIT_CODE = 2


class DicomHeatmapError(Exception):
    """Base of all errors raised on purpose by dicom-heatmap."""


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


class ModelError(InputError):
    """A model file is missing or does not hold this network."""


class ConfigurationError(DicomHeatmapError):
    """An option or setting has a value that cannot work."""


class OutputError(InputError):
    """The results cannot be written where asked."""
