"""The project's exceptions: one family, defined beside the transforms that raise them first.

See :mod:`transforms.errors`; this module is the public name for them.
"""

from transforms.errors import (  # noqa: F401
    EXIT_CODE,
    ConfigurationError,
    DicomHeatmapError,
    InputError,
    ModelError,
    OutputError,
    is_uid,
    checked_number,
    one_line,
    say,
    OneLineFormatter,
    find_cause,
)

__all__ = ["DicomHeatmapError", "InputError", "ModelError", "ConfigurationError", "OutputError", "EXIT_CODE", "one_line",
           "say", "OneLineFormatter", "find_cause", "is_uid", "checked_number"]
