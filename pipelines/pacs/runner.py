"""Series through the job: fetch, analyse (in a worker), store, with the ledger kept.

:class:`SeriesRunner` is shared by ``pacs poll`` (which fetches by C-GET, C-MOVE or
WADO-RS) and ``pacs listen`` (whose series have already arrived). Fetching and storing
happen in the job's main thread; analyses run in the executor, up to ``capacity`` at a
time, so the next series is fetched while one is analysed. When the archive stops
answering, the round stops fetching: the series not yet started stay due, untouched
(an outage must not use up every series' attempts), and the next round takes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator

import pydicom
from tqdm import tqdm

from dicom_heatmap.errors import ConfigurationError, InputError

from pipelines.pacs.archive import Archive, ArchiveRefused, ArchiveUnavailable
from pipelines.pacs.config import PacsConfig
from pipelines.pacs.ledger import ANALYSING, FAILED, RETRIEVING, STORING, Ledger, LedgerRow
from pipelines.pacs.worker import AnalysisOutcome, AnalysisRequest, analyse_series, set_threads

__all__ = ["RoundSummary", "SeriesRunner", "open_executor"]

log = logging.getLogger("dicom_heatmap.pacs")

#: ``fetch(row, folder)`` puts the series' instances somewhere and returns that folder.
Fetch = Callable[[LedgerRow, Path], Path]


@dataclass
class RoundSummary:
    """What one round did, for the closing line and the exit status."""

    found: int = 0
    analysed: int = 0
    already_done: int = 0
    not_selected: int = 0
    failed: int = 0
    failed_earlier: int = 0
    retry_later: int = 0
    stopped: str | None = None
    failures: list[str] = field(default_factory=list)
    queried: str | None = None  # what was asked of the archive, said when nothing was found

    @property
    def ok(self) -> bool:
        return not (self.failed or self.retry_later or self.stopped)

    def line(self) -> str:
        parts = [f"{self.analysed} analysed and stored", f"{self.already_done} already done"]
        if self.not_selected:
            parts.append(f"{self.not_selected} not selected")
        parts.append(f"{self.failed} failed")
        if self.failed_earlier:
            parts.append(f"{self.failed_earlier} failed earlier (not retried)")
        parts.append(f"{self.retry_later} to retry later")
        text = f"found {self.found} series: " + ", ".join(parts)
        if not self.found and self.queried:
            text += f" (asked {self.queried})"
        if self.stopped:
            text += f"; stopped early: {self.stopped}"
        return text


@contextlib.contextmanager
def open_executor(workers: int = 1, dask_scheduler: str | None = None) -> Iterator[tuple[Executor, int]]:
    """Where analyses run, and how many may run at once.

    One worker: a thread of this process (the model is loaded once, here). ``workers`` > 1:
    a pool of that many processes, the cores shared between them. ``dask_scheduler``: the
    workers of an existing Dask cluster, through its ``concurrent.futures`` executor.
    """
    if dask_scheduler:
        try:
            from distributed import Client
        except ImportError:
            raise ConfigurationError("--dask-scheduler needs the dask extra: pip install 'dicom-heatmap[dask]'") from None
        try:
            client = Client(dask_scheduler, timeout=30)
        except (OSError, TimeoutError) as error:
            raise ConfigurationError(f"cannot reach the Dask scheduler at {dask_scheduler} ({error})") from None
        try:
            threads = sum(client.nthreads().values())
            if not threads:
                raise ConfigurationError(f"the Dask cluster at {dask_scheduler} has no workers")
            yield client.get_executor(pure=False), threads
        finally:
            client.close()
        return
    if workers < 1:
        raise ConfigurationError(f"--workers must be at least 1, got {workers}")
    if workers == 1:
        with ThreadPoolExecutor(1, thread_name_prefix="analysis") as executor:
            yield executor, 1
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    executor = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=set_threads, initargs=(threads,))
    try:
        yield executor, workers
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


class SeriesRunner:
    """Takes due series through fetch → analysis → store, recording every step.

    Args:
        config: the job's configuration.
        ledger: the ledger.
        archive: where results are stored.
        executor: where analyses run.
        capacity: analyses in flight at once.
        progress: show a progress bar.
        on_finished: called with each series' row and its final state of the round
            (``pacs listen`` tidies its received instances there).
    """

    def __init__(self, config: PacsConfig, ledger: Ledger, archive: Archive, executor: Executor, capacity: int,
                 progress: bool = True, on_finished: Callable[[LedgerRow, str], None] | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self.archive = archive
        self.executor = executor
        self.capacity = capacity
        self.progress = progress
        self.on_finished = on_finished
        self.scratch = config.work_dir / "tmp"

    def clean_scratch(self) -> None:
        """Remove what killed runs left (call only while holding the job lock)."""
        shutil.rmtree(self.scratch, ignore_errors=True)

    def run(self, rows: list[LedgerRow], fetch: Fetch, summary: RoundSummary) -> None:
        pending = deque(rows)
        in_flight: dict = {}
        outage: str | None = None
        done = 0
        bar = tqdm(total=len(rows), unit="series", desc="series", disable=not self.progress or not rows, leave=False)
        try:
            while pending or in_flight:
                while pending and outage is None and len(in_flight) < self.capacity + 1:
                    row = pending.popleft()
                    try:
                        request = self._fetch(row, fetch)
                    except (ArchiveUnavailable, ArchiveRefused, InputError) as error:
                        if isinstance(error, ArchiveUnavailable):
                            outage = str(error)
                        self._fail(row, str(error), False, summary)
                        shutil.rmtree(self.scratch / row.series_uid, ignore_errors=True)
                        done += 1
                        bar.update()
                        continue
                    in_flight[self.executor.submit(analyse_series, request)] = (row, time.monotonic())
                if not in_flight:
                    break
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    row, started = in_flight.pop(future)
                    try:
                        outcome: AnalysisOutcome = future.result()
                    except Exception as error:  # the worker itself died (killed, out of memory, cluster lost)
                        outcome = AnalysisOutcome(row.series_uid, None, f"the analysis worker failed ({type(error).__name__})",
                                                  failed=True)
                    outage = self._finish(row, outcome, outage, summary, time.monotonic() - started, done + 1, len(rows))
                    done += 1
                    bar.update()
        finally:
            bar.close()
        if outage:
            summary.stopped = outage
            summary.retry_later += len(pending)

    def _fetch(self, row: LedgerRow, fetch: Fetch) -> AnalysisRequest:
        folder = self.scratch / row.series_uid
        shutil.rmtree(folder, ignore_errors=True)
        self.ledger.set_state(row.series_uid, RETRIEVING)
        source = fetch(row, folder / "input")
        count = sum(1 for _ in source.glob("*.dcm"))
        self.ledger.set_state(row.series_uid, ANALYSING, f"{count} instances")
        model = str(self.config.model) if self.config.model else None
        return AnalysisRequest(row.series_uid, str(source), str(folder / "results"), model, self.config.precision,
                               self.config.backend, self.config.settings)

    def _finish(self, row: LedgerRow, outcome: AnalysisOutcome, outage: str | None, summary: RoundSummary,
                seconds: float, index: int, total: int) -> str | None:
        """Store a finished analysis (unless the archive is out); returns the outage, if any."""
        uid = row.series_uid
        try:
            if outcome.failed:
                self._fail(row, outcome.summary, outcome.permanent, summary)
                return outage
            if outage:
                self._fail(row, outage, False, summary)
                return outage
            self.ledger.set_state(uid, STORING)
            files = sorted(Path(outcome.folder).glob("*.dcm"))
            output_series = sorted({str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in files})
            try:
                stored = self.archive.store(files)
            except ArchiveUnavailable as error:
                self._fail(row, str(error), False, summary)
                return str(error)
            except ArchiveRefused as error:  # the archive will not take our objects: retrying cannot help
                self._fail(row, str(error), True, summary)
                return outage
            self.ledger.record_stored(uid, output_series)
            summary.analysed += 1
            log.info("[%d/%d] series %s: %d objects stored in %.1f s; %s", index, total, uid, stored, seconds,
                     outcome.summary)
            if self.on_finished:
                self.on_finished(row, "stored")
            return outage
        finally:
            shutil.rmtree(self.scratch / uid, ignore_errors=True)

    def _fail(self, row: LedgerRow, message: str, permanent: bool, summary: RoundSummary) -> None:
        attempts = (self.ledger.get(row.series_uid) or row).attempts + 1
        state = self.ledger.record_failure(row.series_uid, message, permanent, self.config.retry.max_attempts,
                                           self.config.retry.delay(attempts))
        if state == FAILED:
            summary.failed += 1
            summary.failures.append(f"series {row.series_uid}: {message}")
            log.warning("series %s failed after %d attempt(s): %s", row.series_uid, attempts, message)
        else:
            summary.retry_later += 1
            log.warning("series %s: %s; will retry (attempt %d of %d)", row.series_uid, message, attempts,
                        self.config.retry.max_attempts)
        if self.on_finished:
            self.on_finished(row, state)
