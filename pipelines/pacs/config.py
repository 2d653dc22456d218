"""The PACS job's configuration file (YAML), read and checked in one place.

Every key is checked when the file is read, and a wrong one is reported with the file and
the key's dotted name, so a typo never surfaces as a failure hours into a batch. Secrets
never live in the file: the DICOMweb password comes from an environment variable or a
file of its own, and no ``repr`` or message ever shows it.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dicom_heatmap.api import SETTING_RANGES, AnalysisSettings
from dicom_heatmap.errors import ConfigurationError, one_line

__all__ = ["PacsConfig", "RemoteNode", "Query", "SelectionRule", "RetryPolicy", "TlsSettings", "load_config"]

_AE_TITLE = re.compile(r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$")
_DATE_RANGE = re.compile(r"^(\d{8})?-?(\d{8})?$")
_LAST_DAYS = re.compile(r"^last (\d+) days?$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h)?$")


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


# The shape of pacs.yaml, declared: every key's type and range. The file is checked against
# it before anything is read from it; the code below adds only what a schema cannot say
# (paths relative to the file, a real calendar date, one key requiring another).
_POSITIVE_DURATION = {"description": "a duration above 0: seconds, or such as 30s, 5m, 2h", "anyOf": [
    {"type": "number", "exclusiveMinimum": 0, "maximum": 604800},
    {"type": "string", "pattern": r"^(?!0+(\.0+)?\s*[smh]?$)\d{1,6}(\.\d+)?\s*[smh]?$"}]}
_DURATION_OR_ZERO = {"description": "a duration: seconds, or such as 30s, 5m, 2h", "anyOf": [
    {"type": "number", "minimum": 0, "maximum": 604800}, {"type": "string", "pattern": r"^\d{1,6}(\.\d+)?\s*[smh]?$"}]}
_NAME = {"type": "string", "minLength": 1, "maxLength": 64}
_NAMES = {"anyOf": [_NAME, {"type": "array", "items": _NAME, "maxItems": 64}]}
_PATH = {"type": "string", "minLength": 1, "maxLength": 4096}
_PAIR = {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 100000}, "minItems": 2, "maxItems": 2}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["ae_title", "pacs", "work_dir"],
    "properties": {
        "ae_title": {"type": "string"},
        "bind": {"type": "string", "minLength": 1, "maxLength": 255},
        "port": _PORT,
        "allowed_peers": _NAMES,
        "pacs": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "protocol": {"enum": ["dimse", "dicomweb"]},
                "ae_title": {"type": "string"},
                "host": {"type": "string", "minLength": 1, "maxLength": 255},
                "port": _PORT,
                "retrieve": {"enum": ["c-get", "c-move"]},
                "url": {"type": "string", "maxLength": 2048},
                "username": _NAME,
                "password_env": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,127}$"},
                "password_file": _PATH,
                "timeout": _POSITIVE_DURATION,
                "tls": {"type": "boolean"},
            },
        },
        "query": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": {
                "modalities": _NAMES,
                "study_date": {"type": ["string", "integer"]},
                "series_description": _NAME,
                "rules": _PATH,
            },
        },
        "quiet": _POSITIVE_DURATION,
        "work_dir": _PATH,
        "ledger": _PATH,
        "retry": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": {
                "max_attempts": {"type": "integer", "minimum": 1, "maximum": 1000},
                "backoff": _DURATION_OR_ZERO,
                "backoff_max": _DURATION_OR_ZERO,
            },
        },
        "tls": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": {"ca_file": _PATH, "cert_file": _PATH, "key_file": _PATH},
        },
        "analysis": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": {
                "model": _PATH,
                "precision": {"enum": ["auto", "fp32", "bf16", "fp16"]},
                "backend": {"enum": ["auto", "torch", "openvino"]},
                "grid": _PAIR,
                "crop": {"enum": ["foreground", "template"]},
                "crop_size": _PAIR,
                # the numeric settings, with the ranges AnalysisSettings itself checks
                **{name: {"type": "integer" if kind is int else "number", "minimum": low, "maximum": high}
                   for name, (kind, low, high) in SETTING_RANGES.items() if name != "pixel_size_um"},
            },
        },
    },
}
RULE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "modalities": _NAMES,
        "series_description": _NAME,
        "body_part": _NAME,
        "min_instances": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        "exclude": {"type": "boolean"},
    },
}


def _validate(raw: Any, schema: dict, path: Path, prefix: str = "") -> None:
    """Check ``raw`` against ``schema``; the first error names the file and the dotted key."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    error = next(iter(sorted(validator.iter_errors(raw), key=lambda e: list(map(str, e.absolute_path)))), None)
    if error is None:
        return
    key = ".".join(str(part) for part in error.absolute_path) or "the file"
    if error.validator == "additionalProperties":
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        message = f"unknown key {unknown[0]!r} (known: {', '.join(sorted(error.schema['properties']))})"
    elif error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        key, message = ".".join([*map(str, error.absolute_path), missing[0]]), "required"
    else:
        rule = error.schema.get("description") or f"{error.validator}: {one_line(str(error.validator_value), 160)}"
        message = f"{one_line(repr(error.instance), 80)} is not allowed here ({rule})"
    raise ConfigurationError(f"{path}: {prefix}{key}: {message}")


class _StrictLoader(yaml.SafeLoader):
    """YAML as configuration needs it: no duplicate keys (the second would silently win), no
    anchors or aliases (an alias bomb expands a small file into gigabytes)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            mark = self.peek_event().start_mark
            raise yaml.constructor.ConstructorError(None, None, "anchors and aliases are not allowed here", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {one_line(repr(key), 64)} appears twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """Seconds from ``60``, ``"60s"``, ``"5m"`` or ``"2h"``."""
    match = _DURATION.match(str(text).strip())
    if not match:
        raise ConfigurationError(f"{what}: expected seconds or a duration such as 60s, 5m or 2h, got {text!r}")
    return float(match.group(1)) * {"s": 1, None: 1, "m": 60, "h": 3600}[match.group(2)]


def _ae_title(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _AE_TITLE.match(value):
        raise ConfigurationError(f"{where}: an AE title is 1 to 16 printable characters without backslash, got {value!r}")
    return value


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
        match = _LAST_DAYS.match(self.study_date)
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
        backend: conv-layer runtime, as for ``analyze``.
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


_TLS_KEYS = {"ca_file", "cert_file", "key_file"}


def _path(value: Any, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{where}: expected a path, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _names(value: str | list) -> tuple[str, ...]:
    """One name or a list of names (the schema has checked them) as a tuple."""
    return (value,) if isinstance(value, str) else tuple(value)


def _read_yaml(path: Path, what: str) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ConfigurationError(f"{path}: cannot read the {what} ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ConfigurationError(f"{path}: the {what} is not UTF-8 text (byte {error.start})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        place = f" at line {mark.line + 1}" if mark else ""
        problem = f": {one_line(error.problem, 120)}" if getattr(error, "problem", None) else ""
        raise ConfigurationError(f"{path}: not valid YAML{place}{problem}") from None


def _remote(raw: Any, path: Path) -> RemoteNode:
    raw = raw or {}
    protocol = raw.get("protocol", "dimse")
    if protocol not in ("dimse", "dicomweb"):
        raise ConfigurationError(f"{_where(path, 'pacs.protocol')}: 'dimse' or 'dicomweb', got {protocol!r}")
    timeout = parse_duration(raw.get("timeout", 30), _where(path, "pacs.timeout"))
    if protocol == "dicomweb":
        url = raw.get("url")
        if not isinstance(url, str) or not re.match(r"^https?://", url):
            raise ConfigurationError(f"{_where(path, 'pacs.url')}: the DICOMweb root URL (http:// or https://) is required")
        if raw.get("password_env") and raw.get("password_file"):
            raise ConfigurationError(f"{_where(path, 'pacs')}: give password_env or password_file, not both")
        if re.match(r"^https?://[^/]*@", url):
            raise ConfigurationError(f"{_where(path, 'pacs.url')}: put no credentials in the URL; use username and "
                                     "password_env or password_file")
        return RemoteNode(
            protocol, ae_title=raw.get("ae_title"), url=url.rstrip("/"), username=raw.get("username"),
            password_env=raw.get("password_env"),
            password_file=_path(raw["password_file"], path.parent, _where(path, "pacs.password_file"))
            if raw.get("password_file") else None,
            timeout_s=timeout,
        )
    for key in ("ae_title", "host", "port"):
        if key not in raw:
            raise ConfigurationError(f"{_where(path, 'pacs.' + key)}: required for protocol dimse")
    retrieve = raw.get("retrieve", "c-get")
    if retrieve not in ("c-get", "c-move"):
        raise ConfigurationError(f"{_where(path, 'pacs.retrieve')}: 'c-get' or 'c-move', got {retrieve!r}")
    if not isinstance(raw.get("tls", False), bool):
        raise ConfigurationError(f"{_where(path, 'pacs.tls')}: true or false, got {raw['tls']!r}")
    return RemoteNode(
        protocol, ae_title=_ae_title(raw["ae_title"], _where(path, "pacs.ae_title")), host=str(raw["host"]),
        port=raw["port"], retrieve=retrieve, timeout_s=timeout,
        tls=raw.get("tls", False),
    )


def _rules(value: Any, path: Path) -> tuple[SelectionRule, ...]:
    rules_path = _path(value, path.parent, _where(path, "query.rules"))
    raw = _read_yaml(rules_path, "selection-rule file")
    if isinstance(raw, dict) and "rules" in raw:
        raw = raw["rules"]
    if not isinstance(raw, list) or not raw:
        raise ConfigurationError(f"{rules_path}: expected a list of rules (each a mapping such as "
                                 "{{modalities: [CT], series_description: '*chest*'}})")
    rules = []
    for index, item in enumerate(raw):
        _validate(item, RULE_SCHEMA, rules_path, f"rule {index + 1}.")
        rules.append(SelectionRule(
            modalities=_names(item.get("modalities", ())),
            series_description=item.get("series_description"),
            body_part=item.get("body_part"),
            min_instances=item.get("min_instances", 0),
            exclude=item.get("exclude", False),
        ))
    return tuple(rules)


def _query(raw: Any, path: Path) -> Query:
    raw = raw or {}
    modalities = _names(raw.get("modalities", ["CT", "MR", "SM"]))
    study_date = raw.get("study_date")
    if study_date is not None:
        study_date = str(study_date).strip()
        if study_date != "today" and not _LAST_DAYS.match(study_date) and not (
                _DATE_RANGE.match(study_date) and study_date.strip("-")):
            raise ConfigurationError(f"{_where(path, 'query.study_date')}: expected YYYYMMDD, YYYYMMDD-YYYYMMDD, "
                                     f"'today' or 'last N days', got {one_line(repr(study_date), 40)}")
        for day in re.findall(r"\d{8}", study_date):
            try:
                dt.datetime.strptime(day, "%Y%m%d")
            except ValueError:
                raise ConfigurationError(f"{_where(path, 'query.study_date')}: {day} is no date of the calendar") from None
    return Query(modalities, study_date, raw.get("series_description"),
                 _rules(raw["rules"], path) if "rules" in raw else ())


def _analysis(raw: Any, path: Path) -> tuple[Path | None, str, str, AnalysisSettings]:
    raw = dict(raw or {})
    model = raw.pop("model", None)
    model = _path(model, path.parent, _where(path, "analysis.model")) if model else None
    precision = raw.pop("precision", "auto")
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigurationError(f"{_where(path, 'analysis.precision')}: auto, fp32, bf16 or fp16, got {precision!r}")
    backend = raw.pop("backend", "auto")
    if backend not in ("auto", "torch", "openvino"):
        raise ConfigurationError(f"{_where(path, 'analysis.backend')}: auto, torch or openvino, got {backend!r}")
    for pair in ("grid", "crop_size"):
        if pair in raw:
            value = raw[pair]
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
                raise ConfigurationError(f"{_where(path, 'analysis.' + pair)}: expected [rows, cols], got {value!r}")
            raw[pair] = tuple(value)
    try:
        settings = AnalysisSettings(**raw)
    except ConfigurationError as error:
        raise ConfigurationError(f"{_where(path, 'analysis')}: {error}") from None
    except TypeError:
        raise ConfigurationError(f"{_where(path, 'analysis')}: a value has the wrong type") from None
    return model, precision, backend, settings


def load_config(path: str | Path) -> PacsConfig:
    """Read and check a ``pacs.yaml``; relative paths in it are relative to the file.

    Raises:
        ConfigurationError: naming the file and the key that is wrong.
    """
    path = Path(path).resolve()
    raw = _read_yaml(path, "PACS configuration")
    _validate(raw, SCHEMA, path)
    for key in ("ae_title", "pacs", "work_dir"):
        if key not in raw:
            raise ConfigurationError(f"{_where(path, key)}: required")
    retry = raw.get("retry") or {}
    tls = raw.get("tls") or None
    if tls is not None:
        missing = sorted(_TLS_KEYS - set(tls))
        if missing:
            raise ConfigurationError(f"{_where(path, 'tls.' + missing[0])}: required when tls is given")
        tls = TlsSettings(*(_path(tls[k], path.parent, _where(path, 'tls.' + k)) for k in ("ca_file", "cert_file", "key_file")))
        for file in (tls.ca_file, tls.cert_file, tls.key_file):
            if not file.is_file():
                raise ConfigurationError(f"{_where(path, 'tls')}: {file} does not exist")
        try:
            tls.context(server=True)  # read now: a file that is no PEM certificate or key fails here, not mid-job
        except (ssl.SSLError, OSError, ValueError) as error:
            raise ConfigurationError(f"{_where(path, 'tls')}: the certificates cannot be used "
                                     f"({one_line(getattr(error, 'reason', None) or type(error).__name__, 80)}); "
                                     "give PEM files of a certificate, its key and the CA") from None
    pacs = _remote(raw["pacs"], path)
    if pacs.tls and tls is None:
        raise ConfigurationError(f"{_where(path, 'pacs.tls')}: needs the certificates of the top-level tls section")
    model, precision, backend, settings = _analysis(raw.get("analysis"), path)
    bind = str(raw.get("bind", "127.0.0.1"))
    return PacsConfig(
        source=path,
        ae_title=_ae_title(raw["ae_title"], _where(path, "ae_title")),
        pacs=pacs,
        work_dir=_path(raw["work_dir"], path.parent, _where(path, "work_dir")),
        bind=bind,
        port=raw.get("port", 11112),
        allowed_peers=tuple(_ae_title(p, _where(path, "allowed_peers")) for p in
                            _names(raw.get("allowed_peers", [])))
        if raw.get("allowed_peers") else (),
        query=_query(raw.get("query"), path),
        quiet_s=parse_duration(raw.get("quiet", 30), _where(path, "quiet")),
        ledger=_path(raw["ledger"], path.parent, _where(path, "ledger")) if raw.get("ledger") else None,
        retry=RetryPolicy(
            max_attempts=retry.get("max_attempts", 5),
            backoff_s=parse_duration(retry.get("backoff", 60), _where(path, "retry.backoff")),
            backoff_max_s=parse_duration(retry.get("backoff_max", 3600), _where(path, "retry.backoff_max")),
        ),
        tls=tls,
        model=model,
        precision=precision,
        backend=backend,
        settings=settings,
    )
