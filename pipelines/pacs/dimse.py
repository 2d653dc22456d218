"""The archive over DIMSE (pynetdicom): C-FIND, C-GET or C-MOVE, C-STORE; and our SCP.

Every association is opened by :meth:`DimseArchive._associate`, which turns "no answer",
"rejected" and "aborted" into :class:`~pipelines.pacs.archive.ArchiveUnavailable` with
the reason, and uses TLS when the configuration gives it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pipelines.pacs.archive import ArchiveRefused, ArchiveUnavailable, series_from_answer, write_instance
from pipelines.pacs.config import PacsConfig, Query
from pipelines.pacs.ledger import SeriesRef

__all__ = ["DimseArchive", "StorageServer", "store_status_is_success"]

log = logging.getLogger("dicom_heatmap.pacs")

_PENDING = (0xFF00, 0xFF01)
#: C-STORE warnings that still mean "the archive holds it" (coercion, elements discarded).
_STORE_WARNINGS = (0x0001, 0xB000, 0xB006, 0xB007)


#: Transfer syntaxes a C-GET offers, each in a context of its own.
_RETRIEVE_SYNTAXES = (
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, JPEG2000, RLELossless,
    ExplicitVRLittleEndian, ImplicitVRLittleEndian,
)


def store_status_is_success(status: int) -> bool:
    return status == 0x0000 or status in _STORE_WARNINGS


#: Associations our SCP holds at once (pynetdicom's default is 10).
MAX_ASSOCIATIONS = 64
#: Seconds a peer has, once connected, to complete its association request.
HANDSHAKE_TIMEOUT_S = 5.0
#: Largest PDU our SCP reads before an association is established (an A-ASSOCIATE-RQ is a
#: few kilobytes), and the largest it advertises and reads after: with
#: :data:`MAX_ASSOCIATIONS`, what peers can make the listener hold is bounded.
MAX_REQUEST_PDU = 1024 * 1024
MAX_PDU = 16 * 1024 * 1024


def _new_ae(config: PacsConfig) -> AE:
    ae = AE(ae_title=config.ae_title)
    for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, name, config.pacs.timeout_s)
    ae.maximum_pdu_size = 0
    return ae


class DimseArchive:
    """A DICOM archive spoken to over DIMSE.

    Args:
        config: the job's configuration (our AE title, the archive's address, TLS).
    """

    def __init__(self, config: PacsConfig) -> None:
        self.config = config
        self.node = config.pacs
        self.name = self.node.name

    def _associate(self, ae: AE, ext_neg: list | None = None, handlers: list | None = None) -> Association:
        tls_args = (self.config.tls.context(server=False), None) if self.node.tls else None
        try:
            assoc = ae.associate(self.node.host, self.node.port, ae_title=self.node.ae_title, ext_neg=ext_neg,
                                 evt_handlers=handlers, tls_args=tls_args)
        except OSError as error:
            raise ArchiveUnavailable(f"PACS {self.name}: cannot connect ({error.strerror or error})") from None
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            raise ArchiveUnavailable(f"PACS {self.name}: association rejected (check that it knows our AE title "
                                     f"{self.config.ae_title} and our address)")
        raise ArchiveUnavailable(f"PACS {self.name}: no association (connection refused, aborted or timed out)")

    # -- C-FIND ---------------------------------------------------------------------------
    def _find(self, identifier: Dataset) -> list[Dataset]:
        ae = _new_ae(self.config)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae)
        found = []
        try:
            for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
                if not status:
                    raise ArchiveUnavailable(f"PACS {self.name}: the query was cut off (connection lost or timed out)")
                if status.Status in _PENDING and answer is not None:
                    found.append(answer)
                elif status.Status != 0x0000:
                    raise ArchiveRefused(f"PACS {self.name}: C-FIND failed with status 0x{status.Status:04X}")
        finally:
            assoc.release()
        return found

    def find_series(self, query: Query) -> list[SeriesRef]:
        """C-FIND at series level, one query per modality."""
        found: list[SeriesRef] = []
        for modality in query.modalities:
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "SERIES"
            identifier.Modality = modality
            identifier.StudyDate = query.date_range() or ""
            identifier.SeriesDescription = query.series_description or ""
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "NumberOfSeriesRelatedInstances", "BodyPartExamined"):
                setattr(identifier, keyword, "")
            for answer in self._find(identifier):
                found.append(series_from_answer(answer, modality, f"PACS {self.name} (C-FIND)"))
        return found

    def _sop_classes(self, series: SeriesRef) -> set[str]:
        """The storage classes the series holds (C-GET must offer a context for each)."""
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = series.study_uid
        identifier.SeriesInstanceUID = series.series_uid
        identifier.SOPInstanceUID = ""
        identifier.SOPClassUID = ""
        return {str(answer.SOPClassUID) for answer in self._find(identifier) if answer.get("SOPClassUID")}

    # -- C-GET / C-MOVE -------------------------------------------------------------------
    def retrieve(self, series: SeriesRef, folder: Path) -> int:
        """Fetch the series into ``folder`` by C-GET or by C-MOVE to our own SCP."""
        received: list[str] = []

        def on_store(event) -> int:
            try:
                write_instance(folder, event.request.AffectedSOPInstanceUID, event.encoded_dataset())
            except OSError:
                log.exception("cannot write a retrieved instance")
                return 0xA700  # out of resources
            except Exception:  # an unusable SOP Instance UID
                return 0xC210
            received.append(event.request.AffectedSOPInstanceUID)
            return 0x0000

        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = series.study_uid
        identifier.SeriesInstanceUID = series.series_uid
        if self.node.retrieve == "c-move":
            with StorageServer(self.config, on_store, calling_aets=(self.node.ae_title,)):
                self._retrieve(identifier, StudyRootQueryRetrieveInformationModelMove, self.config.ae_title)
        else:
            classes = self._sop_classes(series)
            if not classes:
                raise ArchiveRefused(f"PACS {self.name}: series {series.series_uid} has no instances")
            self._retrieve(identifier, StudyRootQueryRetrieveInformationModelGet, None, classes, on_store)
        if not received:
            raise ArchiveRefused(f"PACS {self.name}: series {series.series_uid}: no instance was retrieved")
        return len(received)

    def _retrieve(self, identifier: Dataset, model: str, move_aet: str | None, classes: set[str] = frozenset(),
                  on_store: Callable | None = None) -> None:
        ae = _new_ae(self.config)
        ae.add_requested_context(model)
        roles = []
        # One context per (class, transfer syntax), so the archive can send each instance as
        # it holds it; one context with several syntaxes makes it transcode everything to
        # the one it accepted - decoded by its codec, not ours.
        for uid in sorted(classes)[: 127 // len(_RETRIEVE_SYNTAXES)]:
            for syntax in _RETRIEVE_SYNTAXES:
                ae.add_requested_context(uid, syntax)
            roles.append(build_role(uid, scp_role=True))
        handlers = [(evt.EVT_C_STORE, on_store)] if on_store else None
        assoc = self._associate(ae, roles or None, handlers)
        final = None
        try:
            responses = (assoc.send_c_move(identifier, move_aet, model) if move_aet
                         else assoc.send_c_get(identifier, model))
            for status, _ in responses:
                if not status:
                    raise ArchiveUnavailable(f"PACS {self.name}: the retrieve was cut off (connection lost or timed out)")
                final = status
        finally:
            assoc.release()
        if final is None or final.Status != 0x0000:  # 0xB000: some instances failed - not a whole series
            code = f"0x{final.Status:04X}" if final is not None else "none"
            failed = int(final.get("NumberOfFailedSuboperations", 0) or 0) if final is not None else 0
            raise ArchiveRefused(f"PACS {self.name}: retrieve failed with status {code} ({failed} sub-operations failed)")

    # -- C-STORE --------------------------------------------------------------------------
    def store(self, paths: list[Path]) -> int:
        """C-STORE the files; "already stored" answers count as stored."""
        datasets = [pydicom.dcmread(path) for path in paths]
        ae = _new_ae(self.config)
        for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
            ae.add_requested_context(sop_class, list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
        assoc = self._associate(ae)
        try:
            for path, ds in zip(paths, datasets):
                status = assoc.send_c_store(ds)
                if not status:
                    raise ArchiveUnavailable(f"PACS {self.name}: storing was cut off (connection lost or timed out)")
                if not store_status_is_success(status.Status):
                    if 0xA700 <= status.Status <= 0xA7FF:
                        raise ArchiveUnavailable(f"PACS {self.name}: out of resources (status 0x{status.Status:04X})")
                    raise ArchiveRefused(f"PACS {self.name}: refused {path.name} (status 0x{status.Status:04X})")
        finally:
            assoc.release()
        return len(paths)


class _BoundedSocket(AssociationSocket):
    """The SCP's side of one connection: a PDU larger than the peer may send is refused at
    its header (the connection is closed, nothing of it read), and a PDU must arrive whole
    within a deadline from its first byte - the handshake limit before the association is
    established, pacs.timeout after - so a peer that sends part of one and then a byte now
    and then cannot hold a slot."""

    _handshake_s = _pdu_s = _deadline = 0.0
    _next_is_header = True  # pynetdicom reads a PDU's 6-byte header, then its body

    @classmethod
    def adopt(cls, sock: AssociationSocket, handshake_s: float, pdu_s: float) -> None:
        """Make pynetdicom's socket of a new connection one of these. A second wrapper of the
        same connection cannot be made instead: making one announces the connection to the
        association's state machine again."""
        sock.__class__ = cls
        sock._handshake_s, sock._pdu_s = handshake_s, pdu_s

    def recv(self, nr_bytes: int) -> bytearray:
        established = self.assoc.is_established
        if nr_bytes > (MAX_PDU if established else MAX_REQUEST_PDU):
            log.warning("closed a connection from %s: it announced a PDU of %d bytes", self.assoc.requestor.address,
                        nr_bytes)
            return bytearray()  # short: pynetdicom closes the connection without reading on
        if self._next_is_header:  # a new PDU starts
            self._deadline = time.monotonic() + (self._pdu_s if established else self._handshake_s)
        self._next_is_header = not self._next_is_header
        received = bytearray()
        timeout = self.socket.gettimeout()
        try:
            while len(received) < nr_bytes:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.socket.settimeout(remaining)
                chunk = self.socket.recv(min(65536, nr_bytes - len(received)))
                if not chunk:
                    break
                received.extend(chunk)
        except (TimeoutError, OSError):
            pass  # what arrived is short: the connection is closed
        finally:
            self.socket.settimeout(timeout)
        return received


class _BoundedRequestHandler(RequestHandler):
    """pynetdicom's request handler, each connection read through a :class:`_BoundedSocket`."""

    def _create_association(self):
        assoc = super()._create_association()
        pdu_s = self.server.pdu_timeout_s
        _BoundedSocket.adopt(assoc.dul.socket, min(HANDSHAKE_TIMEOUT_S, pdu_s), pdu_s)  # before any read
        return assoc


class _BoundedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with :class:`_BoundedRequestHandler` and the PDU deadline."""

    def __init__(self, *args, pdu_timeout_s: float, **kwargs) -> None:
        self.pdu_timeout_s = pdu_timeout_s
        super().__init__(*args, request_handler=_BoundedRequestHandler, **kwargs)


class StorageServer:
    """Our storage SCP: every storage class (Parametric Map and SR included), Verification,
    only from the allowed calling AE titles, only to our own AE title.

    Args:
        config: our AE title, bind address, port and TLS.
        on_store: the C-STORE handler (returns a status).
        calling_aets: the peers allowed to associate.
    """

    def __init__(self, config: PacsConfig, on_store: Callable, calling_aets: tuple[str, ...]) -> None:
        self.config = config
        self.on_store = on_store
        self.calling_aets = calling_aets
        self._server = None

    def __enter__(self) -> "StorageServer":
        ae = _new_ae(self.config)
        # Half-open connections (a peer that connects, sends part of a request and goes
        # quiet) must not hold the slots real peers need: many slots, and a short time
        # to complete the association request; an established one idles out after
        # pacs.timeout.
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.maximum_pdu_size = MAX_PDU
        ae.acse_timeout = min(HANDSHAKE_TIMEOUT_S, self.config.pacs.timeout_s)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.calling_aets)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ssl_context = self.config.tls.context(server=True) if self.config.tls else None
        try:
            self._server = ae.make_server((self.config.bind, self.config.port), ssl_context=ssl_context,
                                          evt_handlers=[(evt.EVT_C_STORE, self.on_store), (evt.EVT_REJECTED, _log_rejected)],
                                          server_class=_BoundedServer, pdu_timeout_s=self.config.pacs.timeout_s)
            # what AE.start_server(block=False) does, with our server class
            ae._servers.append(self._server)
            threading.Thread(target=self._server.serve_forever, name="storage-scp", daemon=True).start()
        except OSError as error:
            raise ArchiveUnavailable(f"cannot listen on {self.config.bind}:{self.config.port} "
                                     f"({error.strerror or error}); is another program using the port?") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()


def _log_rejected(event) -> None:
    requestor = event.assoc.requestor
    # the AE title the peer asked for is in its request; the acceptor's own is always ours
    requested = getattr(requestor.primitive, "called_ae_title", None)
    log.warning("refused an association from %s (calling AE %r, called AE %r; ours is %r)", requestor.address,
                requestor.ae_title, requested, event.assoc.acceptor.ae_title)

