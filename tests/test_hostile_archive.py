"""A hostile DICOMweb archive: every answer it can give ends in a typed error of that query
or series, in bounded time and memory - never an endless read, an untyped exception, or a
request followed to another host."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipelines.pacs.archive import ArchiveRefused, ArchiveUnavailable
from pipelines.pacs.config import PacsConfig, Query, RemoteNode
from pipelines.pacs.dicomweb import DEADLINE_FACTOR, MAX_JSON_BYTES, DicomwebArchive
from pipelines.pacs.ledger import SeriesRef

#: Seconds the archive may make us wait for one byte (the test configuration's pacs.timeout).
TIMEOUT_S = 0.5


def _series(uid: str) -> dict:
    return {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "0020000E": {"vr": "UI", "Value": [uid]},
            "00080060": {"vr": "CS", "Value": ["CT"]}}


class _Archive(BaseHTTPRequestHandler):
    """Answers every request the way ``server.behaviour`` says."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, body: bytes, content_type: str = "application/dicom+json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        behaviour = self.server.behaviour
        try:
            if behaviour == "malformed":
                self._send(b'[{"0020000E": {"vr": "UI", "Value": ["1.2.')
            elif behaviour == "not_a_list":
                self._send(b'"a string where DICOM JSON should be"')
            elif behaviour == "deeply_nested":
                self._send(b"[" * 200_000 + b"]" * 200_000)
            elif behaviour == "ignores_offset":
                self._send(json.dumps([_series("1.2.3.1"), _series("1.2.3.2")]).encode())
            elif behaviour == "endless":
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b" " * (1 << 20)
                while True:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            elif behaviour == "drip":
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                for _ in range(100000):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(TIMEOUT_S / 3)  # each byte well within the per-read timeout
            elif behaviour == "redirect":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_port}{self.path}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif behaviour == "broken_multipart":
                if "/instances?" in self.path or self.path.endswith("/instances"):
                    self._send(json.dumps([{"00080018": {"vr": "UI", "Value": ["1.2.3.4.5"]}}]).encode())
                else:
                    self._send(b"--x\r\nno header end, no closing boundary", 'multipart/related; type="application/dicom"; '
                                                                               "boundary=x")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should


@pytest.fixture
def archive(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Archive)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    node = RemoteNode("dicomweb", url=f"http://127.0.0.1:{server.server_port}/dicom-web", timeout_s=TIMEOUT_S)
    config = PacsConfig(source=tmp_path / "pacs.yaml", ae_title="DHEATMAP", pacs=node, work_dir=tmp_path)

    def with_behaviour(behaviour: str) -> DicomwebArchive:
        server.behaviour = behaviour
        return DicomwebArchive(config)

    yield with_behaviour
    server.shutdown()


@pytest.mark.parametrize("behaviour, error, message", [
    ("malformed", ArchiveRefused, "malformed"),
    ("not_a_list", ArchiveRefused, "not a list"),
    ("deeply_nested", ArchiveRefused, "malformed (RecursionError)"),
    ("endless", ArchiveRefused, f"passed {MAX_JSON_BYTES:,} bytes"),
    ("drip", ArchiveUnavailable, "did not arrive whole in time"),
    ("redirect", ArchiveRefused, "redirected a request to another host"),
])
def test_a_hostile_query_answer_is_a_typed_error_in_bounded_time(archive, behaviour, error, message):
    started = time.monotonic()
    with pytest.raises(error, match=re.escape(message)):
        archive(behaviour).find_series(Query(modalities=("CT",)))
    assert time.monotonic() - started < DEADLINE_FACTOR * TIMEOUT_S + 10


def test_an_archive_that_ignores_offset_is_paged_to_an_end(archive):
    found = archive("ignores_offset").find_series(Query(modalities=("CT",)))
    assert sorted(s.series_uid for s in found) == ["1.2.3.1", "1.2.3.2"]


def test_a_broken_multipart_answer_fails_that_series_only_with_a_typed_error(archive, tmp_path):
    series = SeriesRef(study_uid="1.2.3", series_uid="1.2.3.4", modality="CT", instances=1)
    with pytest.raises((ArchiveRefused, ArchiveUnavailable), match="series 1.2.3.4"):
        archive("broken_multipart").retrieve(series, tmp_path / "series")
    assert not list(Path(tmp_path).glob("series/*.dcm"))
