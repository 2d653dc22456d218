"""The archive over DICOMweb (dicomweb-client): QIDO-RS, WADO-RS, STOW-RS.

The password is read from the environment variable or file the configuration names when
the session is built, and lives only inside the ``requests`` session; error messages
name the archive by its URL and the HTTP status, never by credentials.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from pipelines.pacs.archive import ArchiveRefused, ArchiveUnavailable, series_from_answer, write_instance
from pipelines.pacs.config import PacsConfig, Query
from pipelines.pacs.ledger import SeriesRef

__all__ = ["DicomwebArchive"]

#: STOW-RS failure reasons that mean "try again later" (out of resources, processing failure).
_TRANSIENT_REASONS = range(0xA700, 0xA800)


class _SingleJsonAccept(requests.Session):
    """A session that asks for DICOM JSON by its one media type.

    dicomweb-client sends ``Accept: application/dicom+json, application/json`` on QIDO-RS;
    Orthanc's DICOMweb plugin reads that list as one unsupported type and logs an error on
    every query. ``application/dicom+json`` alone is what PS3.18 names for QIDO-RS.
    """

    def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
        if request.headers and request.headers.get("Accept") == "application/dicom+json, application/json":
            request.headers = {**request.headers, "Accept": "application/dicom+json"}
        return super().prepare_request(request)


class DicomwebArchive:
    """A DICOM archive spoken to over DICOMweb.

    Args:
        config: the job's configuration (URL, user, where the password is, timeout).
    """

    def __init__(self, config: PacsConfig) -> None:
        self.node = config.pacs
        self.name = self.node.name
        session = _SingleJsonAccept()
        password = self.node.password()
        if self.node.username or password:
            session.auth = (self.node.username or "", password or "")
        self._client = DICOMwebClient(self.node.url, session=session, timeout=self.node.timeout_s)

    def _call(self, what: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except requests.HTTPError as error:
            code = error.response.status_code if error.response is not None else 0
            if code in (401, 403):
                raise ArchiveUnavailable(f"PACS {self.name}: {what}: refused our credentials (HTTP {code}); check "
                                         "pacs.username and the password source") from None
            if code >= 500 or code in (408, 429):
                raise ArchiveUnavailable(f"PACS {self.name}: {what}: HTTP {code}") from None
            raise ArchiveRefused(f"PACS {self.name}: {what}: HTTP {code}") from None
        except (requests.ConnectionError, requests.Timeout) as error:
            kind = "timed out" if isinstance(error, requests.Timeout) else "cannot connect"
            raise ArchiveUnavailable(f"PACS {self.name}: {what}: {kind}") from None

    def find_series(self, query: Query) -> list[SeriesRef]:
        """QIDO-RS at series level, one query per modality."""
        found = []
        for modality in query.modalities:
            filters = {"Modality": modality}
            if query.date_range():
                filters["StudyDate"] = query.date_range()
            if query.series_description:
                filters["SeriesDescription"] = query.series_description
            answers = self._call("QIDO-RS", self._client.search_for_series, search_filters=filters, get_remaining=True,
                                 fields=["StudyInstanceUID", "NumberOfSeriesRelatedInstances", "BodyPartExamined",
                                         "SeriesDescription"])
            found += [series_from_answer(Dataset.from_json(answer), modality, f"PACS {self.name} (QIDO-RS)")
                      for answer in answers]
        return found

    def retrieve(self, series: SeriesRef, folder: Path) -> int:
        """WADO-RS of the whole series, instance by instance into ``folder``."""
        count = 0
        instances = self._call("WADO-RS", self._client.iter_series, series.study_uid, series.series_uid,
                               media_types=(("application/dicom", "*"),))
        iterator = iter(instances)
        while True:
            ds = self._call("WADO-RS", next, iterator, None)
            if ds is None:
                break
            buffer = DicomBytesIO()
            pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
            write_instance(folder, ds.SOPInstanceUID, buffer.getvalue())
            count += 1
        if not count:
            raise ArchiveRefused(f"PACS {self.name}: series {series.series_uid}: no instance was retrieved")
        return count

    def store(self, paths: list[Path]) -> int:
        """STOW-RS the files into their study; instances the archive already holds count as stored."""
        datasets = [pydicom.dcmread(path) for path in paths]
        for study_uid in sorted({str(ds.StudyInstanceUID) for ds in datasets}):
            group = [ds for ds in datasets if str(ds.StudyInstanceUID) == study_uid]
            answer = self._call("STOW-RS", self._client.store_instances, group, study_uid)
            failed = answer.get("FailedSOPSequence") or []  # may be present and empty
            if len(failed):
                reasons = sorted({int(item.get("FailureReason", 0)) for item in failed})
                text = ", ".join(f"0x{reason:04X}" for reason in reasons)
                if all(reason in _TRANSIENT_REASONS for reason in reasons):
                    raise ArchiveUnavailable(f"PACS {self.name}: STOW-RS: {len(failed)} instances not stored ({text})")
                raise ArchiveRefused(f"PACS {self.name}: STOW-RS refused {len(failed)} instances ({text})")
        return len(paths)
