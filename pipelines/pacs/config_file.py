"""Reading ``pacs.yaml``: checked in one place, against a declared schema, before anything is used.

Every key is checked when the file is read, and a wrong one is reported with the file and
the key's dotted name, so a typo never surfaces as a failure hours into a batch. The
schema (:data:`SCHEMA`) says each key's type and range; the code adds only what a schema
cannot say (paths relative to the file, a real calendar date, one key requiring another,
certificates that load). The result is a :class:`~pipelines.pacs.config.PacsConfig`.
"""

from __future__ import annotations

import datetime as dt
import re
import ssl
from pathlib import Path
from typing import Any

import yaml

from dicom_heatmap.api import SETTING_RANGES, AnalysisSettings
from dicom_heatmap.errors import ConfigurationError, one_line
from dicom_heatmap.schema import check_schema
from dicom_heatmap.runtime import BACKENDS
from dicom_heatmap.scorer import PRECISIONS
from pipelines.pacs.config import (LAST_DAYS, MAX_LAST_DAYS, PacsConfig, Query, RemoteNode, RetryPolicy, SelectionRule,
                                   TlsSettings, parse_duration)

__all__ = ["load_config", "SCHEMA", "RULE_SCHEMA"]

_AE_TITLE = re.compile(r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$")
_DATE_RANGE = re.compile(r"^(\d{8})?-?(\d{8})?$")


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


# The shape of pacs.yaml, declared: every key's type and range.
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
                "precision": {"enum": list(PRECISIONS)},
                "backend": {"enum": list(BACKENDS)},
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


def _ae_title(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _AE_TITLE.match(value):
        raise ConfigurationError(f"{where}: an AE title is 1 to 16 printable characters without backslash, got {value!r}")
    return value


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
    protocol = raw.get("protocol", "dimse")
    given = {"timeout_s": parse_duration(raw["timeout"], _where(path, "pacs.timeout"))} if "timeout" in raw else {}
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
            **given,
        )
    for key in ("ae_title", "host", "port"):
        if key not in raw:
            raise ConfigurationError(f"{_where(path, 'pacs.' + key)}: required for protocol dimse")
    given.update({key: raw[key] for key in ("retrieve", "tls") if key in raw})
    return RemoteNode(protocol, ae_title=_ae_title(raw["ae_title"], _where(path, "pacs.ae_title")), host=str(raw["host"]),
                      port=raw["port"], **given)


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
        check_schema(item, RULE_SCHEMA, rules_path, f"rule {index + 1}.")
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
        if study_date != "today" and not LAST_DAYS.match(study_date) and not (
                _DATE_RANGE.match(study_date) and study_date.strip("-")):
            raise ConfigurationError(f"{_where(path, 'query.study_date')}: expected YYYYMMDD, YYYYMMDD-YYYYMMDD, "
                                     f"'today' or 'last N days', got {one_line(repr(study_date), 40)}")
        last = LAST_DAYS.match(study_date)
        if last and int(last.group(1)) > MAX_LAST_DAYS:
            raise ConfigurationError(f"{_where(path, 'query.study_date')}: at most 'last {MAX_LAST_DAYS} days', got "
                                     f"{one_line(repr(study_date), 40)}")
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
    backend = raw.pop("backend", "auto")
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
    check_schema(raw, SCHEMA, path)  # the types, ranges and required keys; below, what a schema cannot say
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
    # keys left out take the dataclasses' defaults (stated there only)
    given: dict[str, Any] = {key: raw[key] for key in ("bind", "port") if key in raw}
    if raw.get("allowed_peers"):
        given["allowed_peers"] = tuple(_ae_title(p, _where(path, "allowed_peers")) for p in _names(raw["allowed_peers"]))
    if "quiet" in raw:
        given["quiet_s"] = parse_duration(raw["quiet"], _where(path, "quiet"))
    if raw.get("ledger"):
        given["ledger"] = _path(raw["ledger"], path.parent, _where(path, "ledger"))
    retry = {name: parse_duration(retry[key], _where(path, f"retry.{key}")) if key != "max_attempts" else retry[key]
             for key, name in (("max_attempts", "max_attempts"), ("backoff", "backoff_s"), ("backoff_max", "backoff_max_s"))
             if key in retry}
    return PacsConfig(
        source=path,
        ae_title=_ae_title(raw["ae_title"], _where(path, "ae_title")),
        pacs=pacs,
        work_dir=_path(raw["work_dir"], path.parent, _where(path, "work_dir")),
        query=_query(raw.get("query"), path),
        retry=RetryPolicy(**retry),
        tls=tls,
        model=model,
        precision=precision,
        backend=backend,
        settings=settings,
        **given,
    )
