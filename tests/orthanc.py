"""A real Orthanc for the tests: free loopback ports, its own storage, stopped by PID."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: The distribution's GDCM plugin: Orthanc decodes and renders with it, as sites that
#: install it do (a result it cannot render must not bring the archive down).
GDCM_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancGdcm.so")


def free_port(exclude: tuple[int, ...] = ()) -> int:
    """A loopback port nothing listens on now, other than those in ``exclude``."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in exclude:
            return port


class Orthanc:
    """One Orthanc process and its storage folder.

    Args:
        folder: where its configuration, storage and log go.
        peer_ae: our AE title (allowed to query and retrieve).
        peer_port: our SCP's port (the C-MOVE destination and listen's port).
        password: the HTTP password of user ``heatmap`` (REST and DICOMweb).
    """

    AE_TITLE = "ORTHANC"
    USER = "heatmap"

    def __init__(self, folder: Path, peer_ae: str, peer_port: int, password: str = "s3cret-Pa55") -> None:
        self.folder = folder
        self.password = password
        self.http_port = free_port(exclude=(peer_port,))
        self.dicom_port = free_port(exclude=(peer_port, self.http_port))
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "dicom-heatmap-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.AE_TITLE,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {self.USER: password},
            "DicomCheckCalledAet": True, "DicomAlwaysAllowFind": False, "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False, "DicomAlwaysAllowStore": True, "DicomScuTimeout": 10,
            "DicomModalities": {"heatmap": [peer_ae, "127.0.0.1", peer_port]},
            "Plugins": [str(DICOMWEB_PLUGIN), str(GDCM_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1, "HttpTimeout": 10,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "Orthanc":
        log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=log, stderr=log,
                                        start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.process.poll() is not None:
                    raise RuntimeError(f"Orthanc exited: see {self.folder / 'orthanc.log'}")
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not answer within 30 s")

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(timeout=30)
        self.process = None

    def raw(self, path: str, data: bytes | None = None, method: str | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        token = base64.b64encode(f"{self.USER}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.read()

    def _request(self, path: str, data: bytes | None = None, method: str | None = None):
        body = self.raw(path, data, method)
        return json.loads(body) if body else None

    def delete_instance(self, sop_uid: str) -> None:
        found = self._request("/tools/lookup", sop_uid.encode(), "POST")
        for item in found:
            if item["Type"] == "Instance":
                self._request(item["Path"], method="DELETE")

    def get(self, path: str):
        return self._request(path)

    def upload(self, *paths: Path) -> None:
        for path in paths:
            answer = self._request("/instances", Path(path).read_bytes(), "POST")
            assert answer["Status"] in ("Success", "AlreadyStored"), answer

    def instances(self) -> list[dict]:
        """Every instance with its main DICOM tags (for checks)."""
        found = []
        for instance_id in self.get("/instances"):
            tags = self.get(f"/instances/{instance_id}/simplified-tags")
            found.append(tags)
        return found

    def results_by_source(self) -> dict[str, list[dict]]:
        """Our result instances, grouped by the study they went into."""
        grouped: dict[str, list[dict]] = {}
        for tags in self.instances():
            if tags.get("Manufacturer") == "dicom-heatmap":
                grouped.setdefault(tags["StudyInstanceUID"], []).append(tags)
        return grouped
