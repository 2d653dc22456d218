"""What the PACS job's configuration holds: the archive, the query, retries, TLS, the analysis.

The dataclasses here are what the job reads; :mod:`pipelines.pacs.config_file` builds them
from a ``pacs.yaml`` and checks every key first. Secrets never live in the file: the
DICOMweb password comes from an environment variable or a file of its own, and no
``repr`` or message ever shows it.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from dicom_heatmap.api import AnalysisSettings
from dicom_heatmap.errors import ConfigurationError

__all__ = ["PacsConfig", "RemoteNode", "Query", "SelectionRule", "RetryPolicy", "TlsSettings", "parse_duration"]

#: ``last N days`` in a query's study date
LAST_DAYS = re.compile(r"^last (\d{1,5}) days?$")
#: The longest ``last N days`` (a hundred years): date arithmetic overflows long before 99,999.
MAX_LAST_DAYS = 36_500
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h)?$")


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """Seconds from ``60``, ``"60s"``, ``"5m"`` or ``"2h"``."""
    match = _DURATION.match(str(text).strip())
    if not match:
        raise ConfigurationError(f"{what}: expected seconds or a duration such as 60s, 5m or 2h, got {text!r}")
    return float(match.group(1)) * {"s": 1, None: 1, "m": 60, "h": 3600}[match.group(2)]


@dataclass(frozen=True)
class TlsSettings:
    """Certificates for DIMSE over TLS.

    Attributes:
        ca_file: certificates that peers must present (verification is always on).
        cert_file: our certificate (PEM).
        key_file: its private key (PEM).
    """

    ca_file: Path
    cert_file: Path
    key_file: Path

    def context(self, server: bool) -> ssl.SSLContext:
        """An SSL context for our SCP (``server``) or our SCU, with peer verification."""
        purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
        context = ssl.create_default_context(purpose, cafile=str(self.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = False  # DICOM peers are named by AE title and certificate, not host name
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


@dataclass(frozen=True)
class RemoteNode:
    """The archive the job queries, retrieves from and stores to.

    Attributes:
        protocol: ``dimse`` or ``dicomweb``.
        ae_title, host, port: the archive's DIMSE address.
        retrieve: ``c-get`` or ``c-move`` (DIMSE); DICOMweb always uses WADO-RS.
        url: the DICOMweb root, e.g. ``http://pacs:8042/dicom-web``.
        username: DICOMweb user name (the password comes from ``password_env`` or ``password_file``).
        timeout_s: seconds to wait for a connection or an answer.
        tls: use TLS (the configuration's ``tls`` certificates) for associations to the archive.
    """

    protocol: str
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    retrieve: str = "c-get"
    url: str | None = None
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    timeout_s: float = 30.0
    tls: bool = False

    def password(self) -> str | None:
        """The DICOMweb password, read when needed (never stored on the object)."""
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigurationError(f"pacs.password_env: the environment variable {self.password_env} is not set")
            return value
        if self.password_file:
            try:
                return self.password_file.read_text().strip()
            except OSError as error:
                raise ConfigurationError(f"pacs.password_file: {self.password_file}: cannot read ({error.strerror})") from None
        return None

    @property
    def name(self) -> str:
        """How logs name the archive (no credentials)."""
        if self.protocol == "dicomweb":
            return self.url or "?"
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class SelectionRule:
    """One rule of a selection-rule file: a series is taken when it matches every given key.

    Attributes:
        modalities: allowed Modality values.
        series_description: shell-style pattern (``*``, ``?``), case-insensitive.
        body_part: pattern for Body Part Examined.
        min_instances: least number of instances.
        exclude: a matching series is refused instead of taken.
    """

    modalities: tuple[str, ...] = ()
    series_description: str | None = None
    body_part: str | None = None
    min_instances: int = 0
    exclude: bool = False

    def matches(self, series) -> bool:
        """Whether a :class:`~pipelines.pacs.ledger.SeriesRef` meets every key of the rule."""
        if self.modalities and series.modality not in self.modalities:
            return False
        if self.series_description is not None and not fnmatch.fnmatchcase(
                series.series_description.lower(), self.series_description.lower()):
            return False
        if self.body_part is not None and not fnmatch.fnmatchcase(series.body_part.lower(), self.body_part.lower()):
            return False
        count = series.instances
        return not (self.min_instances and count is not None and count < self.min_instances)


@dataclass(frozen=True)
class Query:
    """Which series a poll looks for.

    Attributes:
        modalities: one C-FIND / QIDO query per modality.
        study_date: a DICOM date range ``YYYYMMDD-YYYYMMDD`` (either end may be open),
            ``today``, or ``last N days``; ``None`` for any date.
        series_description: a pattern the archive matches (``*`` wildcards).
        rules: from a selection-rule file; the first rule that matches decides, and a
            series no rule matches is not taken. Empty: every found series is taken.
    """

    modalities: tuple[str, ...] = ("CT", "MR", "SM")
    study_date: str | None = None
    series_description: str | None = None
    rules: tuple[SelectionRule, ...] = ()

    def date_range(self, today: dt.date | None = None) -> str | None:
        """The study date as a DICOM range, ``last N days`` resolved against ``today``."""
        if self.study_date is None:
            return None
        today = today or dt.date.today()
        if self.study_date == "today":
            return today.strftime("%Y%m%d")
        match = LAST_DAYS.match(self.study_date)
        if match:
            start = today - dt.timedelta(days=int(match.group(1)))
            return f"{start:%Y%m%d}-{today:%Y%m%d}"
        return self.study_date

    def describe(self, today: dt.date | None = None) -> str:
        """What the query asks for, in words (for a round that found nothing)."""
        date = self.date_range(today)
        parts = [f"modalities {', '.join(self.modalities)}", f"study date {date}" if date else "any study date"]
        if self.series_description:
            parts.append(f"series description {self.series_description!r}")
        return ", ".join(parts)

    def selects(self, series) -> bool:
        if not self.rules:
            return True
        for rule in self.rules:
            if rule.matches(series):
                return not rule.exclude
        return False


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient faults (archive down, association rejected, timeout).

    Attributes:
        max_attempts: attempts before a series is marked failed for good.
        backoff_s: wait after the first failure; doubles with every further one.
        backoff_max_s: the longest wait.
    """

    max_attempts: int = 5
    backoff_s: float = 60.0
    backoff_max_s: float = 3600.0

    def delay(self, attempts: int) -> float:
        return min(self.backoff_s * 2 ** max(attempts - 1, 0), self.backoff_max_s)


@dataclass(frozen=True)
class PacsConfig:
    """The whole configuration of ``dicom-heatmap pacs``.

    Attributes:
        source: the file it was read from (for messages).
        ae_title: our AE title.
        bind: the address our SCP listens on (``127.0.0.1`` unless told otherwise).
        port: our SCP's port (``pacs listen``, and the C-MOVE destination).
        allowed_peers: calling AE titles our SCP accepts; all others are rejected.
        pacs: the archive.
        query: what ``pacs poll`` looks for.
        quiet_s: ``pacs listen`` treats a series as complete after this long without a new instance.
        work_dir: the job's own folder: ledger, received and retrieved instances, results
            in progress. Nothing in it is named by a header value other than a checked UID.
        ledger: the SQLite ledger (default ``work_dir/ledger.sqlite``).
        retry: the retry policy.
        tls: certificates for DIMSE over TLS: our SCP always uses them when given; the
            associations we open to the archive use them when ``pacs.tls`` is true.
        model: model file (``None``: the shipped model).
        precision: conv-layer precision, as for ``analyze``.
        backend: the network's runtime, as for ``analyze``.
        settings: the analysis settings.
    """

    source: Path
    ae_title: str
    pacs: RemoteNode
    work_dir: Path
    bind: str = "127.0.0.1"
    port: int = 11112
    allowed_peers: tuple[str, ...] = ()
    query: Query = field(default_factory=Query)
    quiet_s: float = 30.0
    ledger: Path | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tls: TlsSettings | None = None
    model: Path | None = None
    precision: str = "auto"
    backend: str = "auto"
    settings: AnalysisSettings = field(default_factory=AnalysisSettings)

    @property
    def ledger_path(self) -> Path:
        return self.ledger or self.work_dir / "ledger.sqlite"
