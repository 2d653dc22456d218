"""The job's ledger: one SQLite row per series and the history of its states.

A series moves ``seen`` → ``retrieving`` → ``analysing`` → ``storing`` → ``stored``
(``pacs listen`` starts it at ``receiving``). A transient fault sends it back to ``seen``
with a time before which it is not tried again; a permanent one, or too many attempts,
ends it at ``failed`` with the reason. Only the job's main process writes; a job killed
mid-series leaves that series in an in-progress state, and the next start puts it back
to ``seen`` (:meth:`Ledger.recover`) - retrieval, analysis and storage are all
repeatable, and the results' UIDs are deterministic, so finishing it again cannot
duplicate anything in the archive.

The ledger holds UIDs, modality, counts and error texts - never patient data.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dicom_heatmap.errors import ConfigurationError

__all__ = ["Ledger", "LedgerRow", "SeriesRef", "JobLock", "SEEN", "RECEIVING", "RETRIEVING", "ANALYSING", "STORING",
           "STORED", "FAILED", "STATES", "IN_PROGRESS"]

SEEN, RECEIVING, RETRIEVING, ANALYSING, STORING, STORED, FAILED = (
    "seen", "receiving", "retrieving", "analysing", "storing", "stored", "failed")
#: Every state a series can be in, in the order a series passes them.
STATES = (SEEN, RECEIVING, RETRIEVING, ANALYSING, STORING, STORED, FAILED)
IN_PROGRESS = (RETRIEVING, ANALYSING, STORING)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid   TEXT PRIMARY KEY,
    study_uid    TEXT NOT NULL,
    modality     TEXT,
    instances    INTEGER,
    origin       TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    next_attempt REAL NOT NULL DEFAULT 0,
    outputs      INTEGER,
    first_seen   REAL NOT NULL,
    updated      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outputs (
    series_uid   TEXT PRIMARY KEY,
    source_uid   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    at           REAL NOT NULL,
    series_uid   TEXT NOT NULL,
    state        TEXT NOT NULL,
    detail       TEXT
);
"""


@dataclass(frozen=True)
class SeriesRef:
    """A series as the archive (or a sender) describes it.

    The ledger keeps the UIDs, the modality and the count; the description and body part
    are only for selection rules.
    """

    study_uid: str
    series_uid: str
    modality: str = ""
    instances: int | None = None
    series_description: str = ""
    body_part: str = ""


@dataclass(frozen=True)
class LedgerRow:
    series_uid: str
    study_uid: str
    modality: str
    instances: int | None
    origin: str
    state: str
    attempts: int
    last_error: str | None
    next_attempt: float
    outputs: int | None
    first_seen: float
    updated: float


class Ledger:
    """The SQLite ledger (WAL journal, so ``pacs status`` can read while a job writes).

    Args:
        path: the database file; its folder is created.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a stored series must survive a power cut
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as error:
            raise ConfigurationError(f"{self.path}: cannot open the ledger ({error})") from None

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _event(self, db: sqlite3.Connection, series_uid: str, state: str, detail: str | None = None) -> None:
        db.execute("INSERT INTO events VALUES (?, ?, ?, ?)", (time.time(), series_uid, state, detail))

    def _select(self, where: str, *args: object) -> list[LedgerRow]:
        return [LedgerRow(*row) for row in self._db.execute(f"SELECT * FROM series WHERE {where}", args).fetchall()]

    def get(self, series_uid: str) -> LedgerRow | None:
        found = self._select("series_uid = ?", series_uid)
        return found[0] if found else None

    def rows(self, state: str | None = None) -> list[LedgerRow]:
        return self._select("state = ? ORDER BY first_seen", state) if state else self._select("1 ORDER BY first_seen")

    def events(self, series_uid: str) -> list[tuple]:
        """(time, state, detail) of every change of one series, oldest first."""
        return self._db.execute("SELECT at, state, detail FROM events WHERE series_uid = ? ORDER BY rowid",
                                (series_uid,)).fetchall()

    def add(self, series: SeriesRef, origin: str, state: str = SEEN) -> LedgerRow:
        """Record a series the first time it is seen; a known series is left as it is."""
        now = time.time()
        with self._transaction() as db:
            inserted = db.execute(
                "INSERT OR IGNORE INTO series (series_uid, study_uid, modality, instances, origin, state, first_seen, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (series.series_uid, series.study_uid, series.modality, series.instances, origin, state, now, now),
            ).rowcount
            if inserted:
                self._event(db, series.series_uid, state)
        return self.get(series.series_uid)

    def set_state(self, series_uid: str, state: str, detail: str | None = None) -> None:
        with self._transaction() as db:
            db.execute("UPDATE series SET state = ?, updated = ? WHERE series_uid = ?", (state, time.time(), series_uid))
            self._event(db, series_uid, state, detail)

    def due(self, now: float | None = None) -> list[LedgerRow]:
        """Series waiting to be processed whose retry time has come, oldest first."""
        now = time.time() if now is None else now
        return self._select("state = ? AND next_attempt <= ? ORDER BY first_seen", SEEN, now)

    def record_failure(self, series_uid: str, message: str, permanent: bool, max_attempts: int, delay_s: float) -> str:
        """Count a failed attempt; returns the new state (``seen`` to retry later, or ``failed``)."""
        with self._transaction() as db:
            attempts = db.execute("SELECT attempts FROM series WHERE series_uid = ?", (series_uid,)).fetchone()[0] + 1
            state = FAILED if permanent or attempts >= max_attempts else SEEN
            db.execute("UPDATE series SET state = ?, attempts = ?, last_error = ?, next_attempt = ?, updated = ? "
                       "WHERE series_uid = ?",
                       (state, attempts, message, time.time() + delay_s, time.time(), series_uid))
            self._event(db, series_uid, state, message)
        return state

    def record_stored(self, series_uid: str, output_series: list[str]) -> None:
        """Mark a series done and remember the series its results went into."""
        with self._transaction() as db:
            db.execute("UPDATE series SET state = ?, outputs = ?, last_error = NULL, updated = ? WHERE series_uid = ?",
                       (STORED, len(output_series), time.time(), series_uid))
            db.executemany("INSERT OR IGNORE INTO outputs VALUES (?, ?)", [(uid, series_uid) for uid in output_series])
            self._event(db, series_uid, STORED, f"{len(output_series)} output series")

    def is_output(self, series_uid: str) -> bool:
        """Whether a series holds our own results (never analysed again)."""
        return self._db.execute("SELECT 1 FROM outputs WHERE series_uid = ?", (series_uid,)).fetchone() is not None

    def reset(self, series_uid: str) -> None:
        """Make a series due again with a fresh count of attempts (``--force``)."""
        with self._transaction() as db:
            db.execute("UPDATE series SET state = ?, attempts = 0, next_attempt = 0, updated = ? WHERE series_uid = ?",
                       (SEEN, time.time(), series_uid))
            self._event(db, series_uid, SEEN, "forced")

    def recover(self) -> list[str]:
        """Put series a killed job left in progress back to ``seen``; returns their UIDs."""
        with self._transaction() as db:
            uids = [row[0] for row in db.execute(
                f"SELECT series_uid FROM series WHERE state IN ({','.join('?' * len(IN_PROGRESS))})", IN_PROGRESS)]
            for uid in uids:
                db.execute("UPDATE series SET state = ?, next_attempt = 0, updated = ? WHERE series_uid = ?",
                           (SEEN, time.time(), uid))
                self._event(db, uid, SEEN, "interrupted; resumed")
        return uids

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall())


class JobLock:
    """An exclusive lock on the work folder: one job per ledger at a time.

    The kernel drops the lock when the process dies, even by ``kill -9``, so a killed
    job never blocks the next one.
    """

    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / ".lock"
        self._file = None

    def __enter__(self) -> "JobLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+")
        except OSError as error:
            raise ConfigurationError(f"{self.path.parent}: cannot use the work folder ({error.strerror})") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "?"
            self._file.close()
            raise ConfigurationError(f"{self.path.parent}: another dicom-heatmap pacs job (pid {holder}) is using this "
                                     "work folder; run one job per work folder") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._file:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
