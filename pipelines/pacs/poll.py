"""``dicom-heatmap pacs poll``: find new series in the archive, analyse them, store the results.

One round: query (C-FIND or QIDO-RS, one query per modality), keep what the selection
rules take, record new series in the ledger, then take every due series through
:class:`~pipelines.pacs.runner.SeriesRunner`. A series already stored, or failed for
good, is not touched again unless ``force`` is given; forcing is safe because the
results' UIDs are deterministic and the archive answers "already stored".
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from pipelines.pacs.archive import ArchiveUnavailable, is_our_output
from pipelines.pacs.connect import open_archive
from pipelines.pacs.config import PacsConfig
from pipelines.pacs.ledger import FAILED, SEEN, STORED, JobLock, Ledger, LedgerRow, SeriesRef
from pipelines.pacs.runner import RoundSummary, SeriesRunner, open_executor

__all__ = ["PollJob"]

log = logging.getLogger("dicom_heatmap.pacs")


class PollJob:
    """The polling job; use as a context manager, then call :meth:`round`.

    Args:
        config: the configuration.
        workers: analyses in parallel processes on this machine.
        dask_scheduler: address of an existing Dask scheduler instead of local workers.
        force: analyse and store again series that are already done or failed.
        progress: show a progress bar.
    """

    def __init__(self, config: PacsConfig, workers: int = 1, dask_scheduler: str | None = None, force: bool = False,
                 progress: bool = True) -> None:
        self.config = config
        self.workers = workers
        self.dask_scheduler = dask_scheduler
        self.force = force
        self.progress = progress
        self._forced: set[str] = set()

    def __enter__(self) -> "PollJob":
        self._lock = JobLock(self.config.work_dir).__enter__()
        try:
            self.ledger = Ledger(self.config.ledger_path)
            resumed = self.ledger.recover()
            if resumed:
                log.info("%d series interrupted by an earlier run are due again", len(resumed))
            self.archive = open_archive(self.config)
            self._executor_context = open_executor(self.workers, self.dask_scheduler)
            executor, capacity = self._executor_context.__enter__()
            self.runner = SeriesRunner(self.config, self.ledger, self.archive, executor, capacity, self.progress)
            self.runner.clean_scratch()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._executor_context.__exit__(*exc)
            self.ledger.close()
        finally:
            self._lock.__exit__(*exc)

    def round(self) -> RoundSummary:
        """Query once and process every due series."""
        pacs = self.config.pacs
        how = "QIDO-RS" if pacs.protocol == "dicomweb" else "C-FIND"
        summary = RoundSummary(queried=f"PACS {pacs.name} by {how} at series level for {self.config.query.describe()}")
        try:
            found = self.archive.find_series(self.config.query)
        except ArchiveUnavailable as error:
            summary.stopped = str(error)
            return summary
        for series in found:
            if is_our_output(series) or self.ledger.is_output(series.series_uid):
                continue
            summary.found += 1
            if not self.config.query.selects(series):
                summary.not_selected += 1
                continue
            row = self.ledger.get(series.series_uid) or self.ledger.add(series, "poll")
            if self.force and series.series_uid not in self._forced:
                self._forced.add(series.series_uid)
                if row.state != SEEN:
                    self.ledger.reset(series.series_uid)
                continue
            if row.state == STORED:
                summary.already_done += 1
            elif row.state == FAILED:
                summary.failed_earlier += 1
        now = time.time()
        due = [row for row in self.ledger.due(now) if row.origin == "poll"]
        summary.retry_later += sum(1 for row in self.ledger.rows(SEEN) if row.origin == "poll" and row.next_attempt > now)
        self.runner.run(due, self._fetch, summary)
        return summary

    def _fetch(self, row: LedgerRow, folder: Path) -> Path:
        self.archive.retrieve(SeriesRef(row.study_uid, row.series_uid, row.modality), folder)
        return folder

    def every(self, seconds: float, stop: threading.Event) -> None:
        """Run rounds until ``stop`` is set, ``seconds`` apart (start to start)."""
        while not stop.is_set():
            started = time.monotonic()
            summary = self.round()
            log.info("%s", summary.line())
            stop.wait(max(0.0, seconds - (time.monotonic() - started)))
