"""Argument types of the command line, shared by its commands (:mod:`pipelines.cli`, :mod:`pipelines.lab`)."""

from __future__ import annotations

import argparse
import math

__all__ = ["pair", "sides", "positive"]


def pair(text: str) -> tuple[int, int]:
    """An argparse type: ROWSxCOLS such as 8x12."""
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 8x12, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"rows and columns must be positive, got {text!r}")
    return rows, cols


def sides(text: str) -> tuple[int, ...]:
    """An argparse type: slide sides in pixels, comma-separated (at least 2048 each); ``0`` for none."""
    values = tuple(int(value) for value in text.split(",") if value.strip().isdigit())
    if values != (0,) and (len(values) != len(text.split(",")) or min(values) < 2048):
        raise argparse.ArgumentTypeError(f"expected sides of at least 2048 pixels such as 12000,40000, got {text!r}")
    return () if values == (0,) else values


def positive(kind: type = float):
    """An argparse type: a finite number above 0 (a whole one for ``int``), for options that
    are no analysis setting; settings are checked, with the rest, by AnalysisSettings."""
    what = "a whole number" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected {what} above 0, got {text!r}")
        return value

    return parse
