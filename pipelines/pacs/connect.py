"""The archive a configuration names, speaking its protocol.

The one place that knows both implementations of :class:`~pipelines.pacs.archive.Archive`,
so that the interface imports neither and imports point one way: ``connect`` → ``dimse`` /
``dicomweb`` → ``archive``. A new protocol is a module implementing the interface and one
branch here.
"""

from __future__ import annotations

from pipelines.pacs.archive import Archive
from pipelines.pacs.config import PacsConfig

__all__ = ["open_archive"]


def open_archive(config: PacsConfig) -> Archive:
    """The archive of ``config.pacs``: DICOMweb or DIMSE (each imported only when used)."""
    if config.pacs.protocol == "dicomweb":
        from pipelines.pacs.dicomweb import DicomwebArchive

        return DicomwebArchive(config)
    from pipelines.pacs.dimse import DimseArchive

    return DimseArchive(config)
