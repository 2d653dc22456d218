"""The archive over DICOMweb (dicomweb-client): QIDO-RS, WADO-RS, STOW-RS.

The password is read from the environment variable or file the configuration names when
the session is built, and lives only inside the ``requests`` session; error messages
name the archive by its URL and the HTTP status, never by credentials.

The archive's answers are untrusted (:class:`_BoundedSession`): each is read within a
size limit (:data:`MAX_JSON_BYTES` for QIDO-RS, :data:`MAX_INSTANCE_BYTES` for one
instance - a series is retrieved instance by instance) and a deadline for the whole body
(:data:`DEADLINE_FACTOR` times ``pacs.timeout``), a redirect off the configured host is
refused, paging stops when a page adds no series or instance not seen before (or after
:data:`MAX_PAGES`), and an answer that cannot be parsed is a typed error of that query
or series only.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from dicom_heatmap.errors import InputError
from pipelines.pacs.archive import ArchiveRefused, ArchiveUnavailable, checked_uid, series_from_answer, write_instance
from pipelines.pacs.config import PacsConfig, Query
from pipelines.pacs.ledger import SeriesRef

__all__ = ["DicomwebArchive", "MAX_JSON_BYTES", "MAX_INSTANCE_BYTES", "MAX_PAGES", "PAGE_SIZE", "DEADLINE_FACTOR"]

log = logging.getLogger("dicom_heatmap.pacs")

#: STOW-RS failure reasons that mean "try again later" (out of resources, processing failure).
_TRANSIENT_REASONS = range(0xA700, 0xA800)
#: Largest QIDO-RS answer (one page of DICOM JSON).
MAX_JSON_BYTES = 64 * 1024 * 1024
#: Largest WADO-RS answer: one instance (twice the size guard's default in 8-bit values).
MAX_INSTANCE_BYTES = 1024 * 1024 * 1024
#: Results a QIDO-RS page asks for, and the most pages one query reads.
PAGE_SIZE, MAX_PAGES = 1000, 1000
#: The whole of one answer, headers to last byte, must arrive within this many times
#: ``pacs.timeout`` (which bounds each wait for a byte).
DEADLINE_FACTOR = 10
#: Python's parse errors an answer that is no DICOM JSON or multipart can raise.
_PARSE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError)


class _AnswerTooLarge(ArchiveRefused):
    """The archive's answer passed its size limit."""


class _AnswerTooSlow(ArchiveUnavailable):
    """The archive's answer did not arrive whole by its deadline."""


class _ConnectionLost(ArchiveUnavailable):
    """The connection was refused or dropped before an answer (not a timeout)."""


class _BoundedSession(requests.Session):
    """A ``requests`` session for an untrusted archive.

    - Every answer is read through a counter: past its limit (by the Accept header: DICOM
      JSON, else one instance) the request fails; a watchdog shuts the connection when the
      whole answer has not arrived by its deadline, so one byte a second cannot hold it.
    - A redirect to another host than the configured one is refused.
    - It asks for DICOM JSON by its one media type: dicomweb-client sends ``Accept:
      application/dicom+json, application/json`` on QIDO-RS, which Orthanc's DICOMweb plugin
      reads as one unsupported type (PS3.18 names ``application/dicom+json`` alone).
    - Connections are not kept for reuse, so the watchdog never shuts one a later request
      would use.
    """

    def __init__(self, root: str, deadline_s: float) -> None:
        super().__init__()
        self._host = urlsplit(root).netloc.rpartition("@")[2].lower()
        self._deadline_s = deadline_s

    def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
        headers = dict(request.headers or {})
        if headers.get("Accept") == "application/dicom+json, application/json":
            headers["Accept"] = "application/dicom+json"
        headers["Connection"] = "close"
        request.headers = headers
        return super().prepare_request(request)

    def get_redirect_target(self, response: requests.Response) -> str | None:
        target = super().get_redirect_target(response)
        if target is not None and urlsplit(urljoin(response.url, target)).netloc.rpartition("@")[2].lower() != self._host:
            raise ArchiveRefused(f"the archive redirected a request to another host ({response.status_code}); "
                                 "refused")
        return target

    def send(self, request: requests.PreparedRequest, **kwargs) -> requests.Response:
        deadline = time.monotonic() + self._deadline_s
        kwargs["stream"] = True  # the body is read through _bounded_body, never whole by requests
        response = super().send(request, **kwargs)
        accept = request.headers.get("Accept", "")
        limit = MAX_JSON_BYTES if "json" in accept else MAX_INSTANCE_BYTES
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _shut, [response])
        watchdog.daemon = True
        watchdog.start()
        response.iter_content = _bounded_body(response.iter_content, limit, deadline, watchdog)
        return response


def _shut(response: requests.Response) -> None:
    """Shut the connection an answer arrives on (its reader then fails at once). With
    ``Connection: close`` http.client hands the socket to the response, so it is found
    under the response's file; urllib3's connection holds it otherwise."""
    connection = getattr(response.raw, "connection", None)
    reader = getattr(getattr(response.raw, "_fp", None), "fp", None)  # http.client's buffered socket file
    for sock in (getattr(connection, "sock", None), getattr(getattr(reader, "raw", None), "_sock", None)):
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _bounded_body(iter_content, limit: int, deadline: float, watchdog: threading.Timer):
    """``response.iter_content`` counting what arrives: past ``limit`` bytes, or once the
    watchdog has cut the connection at ``deadline``, the request fails."""
    def bounded(chunk_size: int | None = 1, decode_unicode: bool = False):
        total = 0
        try:
            for chunk in iter_content(chunk_size, decode_unicode):
                total += len(chunk)
                if total > limit:
                    raise _AnswerTooLarge(f"the answer passed {limit:,} bytes; refused")
                yield chunk
        except (requests.RequestException, OSError):
            if time.monotonic() >= deadline:
                raise _AnswerTooSlow("the answer did not arrive whole in time") from None
            raise
        finally:
            watchdog.cancel()
    return bounded


class DicomwebArchive:
    """A DICOM archive spoken to over DICOMweb.

    Args:
        config: the job's configuration (URL, user, where the password is, timeout).
    """

    def __init__(self, config: PacsConfig) -> None:
        self.node = config.pacs
        self.name = self.node.name
        session = _BoundedSession(self.node.url, DEADLINE_FACTOR * self.node.timeout_s)
        password = self.node.password()
        if self.node.username or password:
            session.auth = (self.node.username or "", password or "")
        self._client = DICOMwebClient(self.node.url, session=session, timeout=self.node.timeout_s)
        # one attempt a request: dicomweb-client would retry any failure five times with growing
        # waits (half a minute); the job's retry policy and ledger decide when to try again
        self._client.set_http_retry_params(retry=False)

    def _read(self, what: str, function, *args, **kwargs):
        """:meth:`_call` for a query or retrieval, tried once more a second later when the
        connection was refused or dropped: it changes nothing on the archive, and a lost
        connection now and then (seen twice in about 45 test runs against a local
        Orthanc) should not stop a whole round."""
        try:
            return self._call(what, function, *args, **kwargs)
        except _ConnectionLost:
            log.info("PACS %s: %s: the connection was lost; trying once more", self.name, what)
            time.sleep(1.0)
            return self._call(what, function, *args, **kwargs)

    def _call(self, what: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (ArchiveUnavailable, ArchiveRefused) as error:
            raise type(error)(f"PACS {self.name}: {what}: {error}") from None
        except requests.HTTPError as error:
            code = error.response.status_code if error.response is not None else 0
            if code in (401, 403):
                raise ArchiveUnavailable(f"PACS {self.name}: {what}: refused our credentials (HTTP {code}); check "
                                         "pacs.username and the password source") from None
            if code >= 500 or code in (408, 429):
                raise ArchiveUnavailable(f"PACS {self.name}: {what}: HTTP {code}") from None
            raise ArchiveRefused(f"PACS {self.name}: {what}: HTTP {code}") from None
        except requests.Timeout:  # a connect timeout included
            raise ArchiveUnavailable(f"PACS {self.name}: {what}: timed out") from None
        except requests.ConnectionError:
            raise _ConnectionLost(f"PACS {self.name}: {what}: cannot connect") from None
        except _PARSE_ERRORS as error:  # requests' JSONDecodeError included: it is a ValueError
            raise ArchiveRefused(f"PACS {self.name}: {what}: the answer is malformed ({type(error).__name__})") from None
        except requests.RequestException as error:  # a broken transfer (chunking, content decoding)
            raise ArchiveUnavailable(f"PACS {self.name}: {what}: the answer broke off ({type(error).__name__})") from None

    def _pages(self, what: str, search, key: str, **kwargs) -> list[dict]:
        """Every result of a QIDO-RS search, page by page; paging stops at an empty page, a
        page that adds no result not seen before (an archive that ignores ``offset``), or
        after :data:`MAX_PAGES` pages."""
        results, seen = [], set()
        for page in range(MAX_PAGES):
            answers = self._read(what, search, offset=len(results), limit=PAGE_SIZE, **kwargs)
            if not isinstance(answers, list) or not all(isinstance(answer, dict) for answer in answers):
                raise ArchiveRefused(f"PACS {self.name}: {what}: the answer is not a list of DICOM JSON objects")
            fresh = [(uid, answer) for uid, answer in ((_json_value(a, key), a) for a in answers) if uid not in seen]
            if not fresh:
                break
            seen.update(uid for uid, _ in fresh)
            results += [answer for _, answer in fresh]
        else:
            log.warning("PACS %s: %s: stopped after %d pages of results", self.name, what, MAX_PAGES)
        return results

    def find_series(self, query: Query) -> list[SeriesRef]:
        """QIDO-RS at series level, one query per modality; an answer whose UIDs are not
        valid is passed over (and logged), the others kept."""
        found = []
        for modality in query.modalities:
            filters = {"Modality": modality}
            if query.date_range():
                filters["StudyDate"] = query.date_range()
            if query.series_description:
                filters["SeriesDescription"] = query.series_description
            answers = self._pages("QIDO-RS", self._client.search_for_series, "0020000E", search_filters=filters,
                                  fields=["StudyInstanceUID", "NumberOfSeriesRelatedInstances", "BodyPartExamined",
                                          "SeriesDescription"])
            for answer in answers:
                try:
                    found.append(series_from_answer(Dataset.from_json(answer), modality, f"PACS {self.name} (QIDO-RS)"))
                except InputError as error:
                    log.warning("%s", error)
                except _PARSE_ERRORS as error:
                    log.warning("PACS %s (QIDO-RS): an answer is malformed (%s); passed over", self.name,
                                type(error).__name__)
        return found

    def retrieve(self, series: SeriesRef, folder: Path) -> int:
        """The series' instances (QIDO-RS), then WADO-RS of each into ``folder``: one answer
        holds one instance, within :data:`MAX_INSTANCE_BYTES`."""
        what = f"series {series.series_uid}"
        answers = self._pages(f"QIDO-RS of {what}", self._client.search_for_instances, "00080018",
                              study_instance_uid=series.study_uid, series_instance_uid=series.series_uid,
                              fields=["SOPInstanceUID"])
        count = 0
        for answer in answers:
            sop_uid = checked_uid(_json_value(answer, "00080018"), f"PACS {self.name}: {what}: an instance found")
            ds = self._read(f"WADO-RS of {what}", self._client.retrieve_instance, series.study_uid, series.series_uid,
                            sop_uid, media_types=(("application/dicom", "*"),))
            buffer = DicomBytesIO()
            try:
                pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
            except _PARSE_ERRORS as error:
                raise ArchiveRefused(f"PACS {self.name}: WADO-RS of {what}: the instance cannot be written "
                                     f"({type(error).__name__})") from None
            write_instance(folder, sop_uid, buffer.getvalue())
            count += 1
        if not count:
            raise ArchiveRefused(f"PACS {self.name}: {what}: no instance was retrieved")
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


def _json_value(answer: dict, tag: str) -> str | None:
    """The first value of ``tag`` (8 hex digits) in a DICOM JSON object, as text; None if absent."""
    try:
        return str(answer[tag]["Value"][0])
    except (KeyError, IndexError, TypeError):
        return None
