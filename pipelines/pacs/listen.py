"""``dicom-heatmap pacs listen``: a storage SCP that analyses each series once it is complete.

Instances arrive by C-STORE from the allowed peers only and are written straight to
``work_dir/incoming/<series UID>/<SOP Instance UID>.dcm`` (whole or not at all). A series
that has been quiet for ``quiet_s`` is moved to ``work_dir/received/<series UID>`` and
recorded in the ledger; the runner then analyses it and stores the results in the
configured archive. Received instances are kept until their series' results are stored
(a failed series' instances move to ``work_dir/failed/``), so a killed listener loses
nothing: on restart it picks up ``incoming`` and ``received`` where it left them.

Instances that arrive for a series already analysed are set aside in ``work_dir/late/``
and logged: analysing the late part alone would be wrong, and ``pacs poll --force``
re-analyses the whole series from the archive.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import pydicom

from pipelines.pacs.archive import checked_uid, write_instance
from pipelines.pacs.connect import open_archive
from pipelines.pacs.config import PacsConfig
from pipelines.pacs.dimse import StorageServer
from pipelines.pacs.ledger import FAILED, SEEN, STORED, JobLock, Ledger, LedgerRow, SeriesRef
from pipelines.pacs.runner import RoundSummary, SeriesRunner, open_executor
from dicom_heatmap.errors import ConfigurationError, InputError

__all__ = ["Listener"]

log = logging.getLogger("dicom_heatmap.pacs")


class Listener:
    """The DICOM node.

    Args:
        config: the configuration (``allowed_peers`` must name at least one peer).
        workers: analyses in parallel processes on this machine.
        dask_scheduler: address of an existing Dask scheduler instead of local workers.
        progress: show a progress bar while a batch of series is analysed.
    """

    def __init__(self, config: PacsConfig, workers: int = 1, dask_scheduler: str | None = None,
                 progress: bool = False) -> None:
        if not config.allowed_peers:
            raise ConfigurationError(f"{config.source}: allowed_peers: name the AE titles allowed to send to us; "
                                     "pacs listen accepts no one otherwise")
        self.config = config
        self.workers = workers
        self.dask_scheduler = dask_scheduler
        self.progress = progress
        self.incoming = config.work_dir / "incoming"
        self.received = config.work_dir / "received"
        self._arrivals: dict[str, tuple[SeriesRef, float]] = {}
        self._lock = threading.Lock()

    # -- the SCP's side (runs in pynetdicom's association threads) -------------------------
    def _on_store(self, event) -> int:
        try:
            ds = event.dataset
            series = SeriesRef(checked_uid(ds.get("StudyInstanceUID"), "a received instance's Study Instance UID"),
                               checked_uid(ds.get("SeriesInstanceUID"), "a received instance's Series Instance UID"),
                               str(ds.get("Modality") or ""))
            write_instance(self.incoming / series.series_uid, event.request.AffectedSOPInstanceUID,
                           event.encoded_dataset())
        except InputError as error:
            log.warning("refused an instance from %s: %s", event.assoc.requestor.ae_title, error.problem)
            return 0xC000  # cannot understand
        except OSError as error:
            log.error("cannot keep a received instance: %s", error.strerror)
            return 0xA700  # out of resources
        except Exception as error:  # a header pydicom cannot parse
            log.warning("refused an unreadable instance from %s (%s)", event.assoc.requestor.ae_title,
                        type(error).__name__)
            return 0xC000
        with self._lock:
            self._arrivals[series.series_uid] = (series, time.monotonic())
        return 0x0000

    # -- the main thread's side -------------------------------------------------------------
    def _pick_up_leftovers(self) -> None:
        """Series a killed listener was still receiving: their quiet time starts now."""
        for folder in sorted(self.incoming.glob("*")) if self.incoming.exists() else []:
            files = sorted(folder.glob("*.dcm"))
            if not files:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                ds = pydicom.dcmread(files[0], stop_before_pixels=True)
                series = SeriesRef(checked_uid(ds.StudyInstanceUID, str(files[0])), folder.name, str(ds.get("Modality") or ""))
            except Exception:
                log.warning("%s: unreadable leftover; moved to %s", folder, self.config.work_dir / "failed")
                self._set_aside(folder, "failed")
                continue
            self._arrivals[folder.name] = (series, time.monotonic())

    def _set_aside(self, folder: Path, where: str) -> None:
        target = self.config.work_dir / where / folder.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            for file in folder.glob("*"):
                file.replace(target / file.name)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            folder.replace(target)

    def _complete_quiet_series(self, ledger: Ledger) -> None:
        now = time.monotonic()
        with self._lock:
            quiet = [(uid, series) for uid, (series, last) in self._arrivals.items() if now - last >= self.config.quiet_s]
            for uid, _ in quiet:
                del self._arrivals[uid]
        for uid, series in quiet:
            folder = self.incoming / uid
            row = ledger.get(uid)
            if row is not None and row.state == STORED:
                log.warning("series %s: instances arrived after its results were stored; set aside in %s "
                            "(use pacs poll --force to analyse the whole series again)", uid, self.config.work_dir / "late")
                self._set_aside(folder, "late")
                continue
            self._set_aside(folder, "received")
            count = sum(1 for _ in (self.received / uid).glob("*.dcm"))
            if row is None:
                ledger.add(SeriesRef(series.study_uid, uid, series.modality, count), "listen")
            elif row.state != SEEN:
                ledger.reset(uid)
            log.info("series %s complete (%d instances, quiet for %.0f s)", uid, count, self.config.quiet_s)

    def _fetch(self, row: LedgerRow, folder: Path) -> Path:
        source = self.received / row.series_uid
        if not any(source.glob("*.dcm")):
            raise InputError(source, "the received instances of this series are gone")
        return source

    def _finished(self, row: LedgerRow, state: str) -> None:
        source = self.received / row.series_uid
        if state == STORED:
            shutil.rmtree(source, ignore_errors=True)
        elif state == FAILED and source.exists():
            self._set_aside(source, "failed")

    def serve(self, stop: threading.Event, poll_s: float = 0.5) -> None:
        """Receive and analyse until ``stop`` is set."""
        with JobLock(self.config.work_dir):
            ledger = Ledger(self.config.ledger_path)
            try:
                resumed = ledger.recover()
                if resumed:
                    log.info("%d series interrupted by an earlier run are due again", len(resumed))
                self._pick_up_leftovers()
                archive = open_archive(self.config)
                with open_executor(self.workers, self.dask_scheduler) as (executor, capacity):
                    runner = SeriesRunner(self.config, ledger, archive, executor, capacity, self.progress, self._finished)
                    runner.clean_scratch()
                    with StorageServer(self.config, self._on_store, self.config.allowed_peers):
                        log.info("listening as %s on %s:%d (peers: %s); a series is complete after %.0f s of quiet",
                                 self.config.ae_title, self.config.bind, self.config.port,
                                 ", ".join(self.config.allowed_peers), self.config.quiet_s)
                        while not stop.is_set():
                            self._complete_quiet_series(ledger)
                            due = [row for row in ledger.due() if row.origin == "listen"]
                            if due:
                                summary = RoundSummary(found=len(due))
                                runner.run(due, self._fetch, summary)
                                log.info("%s", summary.line())
                            stop.wait(poll_s)
            finally:
                ledger.close()
