"""Checking what users write (``pacs.yaml``, a training datalist) against a JSON schema,
with the first problem as one line that names the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicom_heatmap.errors import ConfigurationError, one_line

__all__ = ["check_schema"]


def check_schema(raw: Any, schema: dict, path: str | Path, prefix: str = "") -> None:
    """Check ``raw`` against ``schema`` (JSON Schema 2020-12).

    Args:
        raw: the parsed file.
        schema: the schema.
        path: the file, named in the message.
        prefix: put before the dotted key (e.g. ``"rule 2."``).

    Raises:
        ConfigurationError: the first problem (by key), naming the file and the dotted key.
    """
    import jsonschema  # only the commands that read such files pay for it

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
