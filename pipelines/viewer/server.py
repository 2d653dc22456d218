"""The viewer's web server: 127.0.0.1 only, a fixed set of routes, nothing fetched from elsewhere.

Routes: ``/`` (the page), ``/viewer.js`` and ``/viewer.css`` (``page/``), ``/osd/...``
(OpenSeadragon's build: the script and its button images), ``/scene.json`` (the overlay),
``/dzi/<slice>.dzi`` and ``/dzi/<slice>_files/<level>/<col>_<row>.jpeg`` (the pyramids).
A request whose Host is not this server's own address is refused (a page elsewhere cannot
reach it through DNS rebinding), and the page's Content Security Policy allows this origin
only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from dicom_heatmap.errors import ConfigurationError
from pipelines.viewer.scene import Scene

__all__ = ["ViewerServer", "openseadragon_folder", "OPENSEADRAGON_VERSION"]

log = logging.getLogger(__name__)

#: The OpenSeadragon release the Makefile installs (npm) and the page is written for.
OPENSEADRAGON_VERSION = "6.1.1"
PAGE = Path(__file__).resolve().parent / "page"
_PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/viewer.js": ("viewer.js", "text/javascript"),
               "/viewer.css": ("viewer.css", "text/css")}
_TILE = re.compile(r"/dzi/(\d+)_files/(\d+)/(\d+)_(\d+)\.jpeg")
_DZI = re.compile(r"/dzi/(\d+)\.dzi")
_OSD_FILE = re.compile(r"/osd/((?:images/)?[A-Za-z0-9_.-]+\.(?:js|png))")
_POLICY = "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"


def openseadragon_folder() -> Path:
    """The folder of OpenSeadragon's build (``openseadragon.min.js`` and ``images/``):
    ``$DICOM_HEATMAP_OPENSEADRAGON``, else where the Makefile installs it in the
    environment (``<prefix>/share/dicom-heatmap/node_modules/openseadragon``)."""
    given = os.environ.get("DICOM_HEATMAP_OPENSEADRAGON")
    package = Path(given) if given else Path(sys.prefix) / "share" / "dicom-heatmap" / "node_modules" / "openseadragon"
    build = package / "build" / "openseadragon"
    if not (build / "openseadragon.min.js").is_file():
        raise ConfigurationError(f"OpenSeadragon {OPENSEADRAGON_VERSION} is not installed in {package}: run `make viewer` "
                                 f"(npm install --prefix {package.parent.parent} openseadragon@{OPENSEADRAGON_VERSION})")
    return build


class ViewerServer(ThreadingHTTPServer):
    """Serves one :class:`~pipelines.viewer.scene.Scene` on 127.0.0.1.

    Args:
        scene: what to show.
        port: the port (0: a free one).
        library: OpenSeadragon's build folder (:func:`openseadragon_folder` by default).
    """

    daemon_threads = True

    def __init__(self, scene: Scene, port: int = 0, library: Path | None = None) -> None:
        self.scene = scene
        self.library = library or openseadragon_folder()
        super().__init__(("127.0.0.1", port), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("viewer: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        port = self.server.server_address[1]
        if self.headers.get("Host") not in (f"127.0.0.1:{port}", f"localhost:{port}"):
            self._send(HTTPStatus.FORBIDDEN, b"this viewer answers its own address only\n", "text/plain")
            return
        path = self.path.split("?", 1)[0]
        scene = self.server.scene
        try:
            if path in _PAGE_FILES:
                name, kind = _PAGE_FILES[path]
                self._send(HTTPStatus.OK, (PAGE / name).read_bytes(), kind)
            elif path == "/scene.json":
                self._send(HTTPStatus.OK, json.dumps(scene.overlay, separators=(",", ":")).encode(), "application/json")
            elif (match := _DZI.fullmatch(path)) and int(match[1]) < len(scene.pyramids):
                self._send(HTTPStatus.OK, scene.dzi(int(match[1])).encode(), "application/xml")
            elif (match := _TILE.fullmatch(path)) and int(match[1]) < len(scene.pyramids):
                self._send(HTTPStatus.OK, scene.tile(*(int(v) for v in match.groups())), "image/jpeg", cache=True)
            elif (match := _OSD_FILE.fullmatch(path)) and (self.server.library / match[1]).is_file():
                kind = "text/javascript" if match[1].endswith(".js") else "image/png"
                self._send(HTTPStatus.OK, (self.server.library / match[1]).read_bytes(), kind, cache=True)
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        except ValueError:  # a tile outside the pyramid
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went on to other tiles

    def _send(self, status: HTTPStatus, body: bytes, kind: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", _POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        self.wfile.write(body)
