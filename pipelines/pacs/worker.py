"""The per-series work that runs in a worker: analyse one folder, write the results.

It runs in the job's own thread, in a process of a local pool (``--workers N``) or on a
Dask worker (``--dask-scheduler``); the same function and the same core as
``dicom-heatmap analyze`` in all three. A worker process loads the model once and keeps
it for every later series. Errors come back as an :class:`AnalysisOutcome` (exceptions
with extra arguments do not survive pickling between processes).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from dicom_heatmap.api import AnalysisSettings, analyze
from dicom_heatmap.errors import DicomHeatmapError, InputError, OutputError
from dicom_heatmap.scorer import TileScorer

__all__ = ["AnalysisRequest", "AnalysisOutcome", "analyse_series", "set_threads"]

_SCORERS: dict[tuple[str | None, str, str], TileScorer] = {}
_SCORERS_LOCK = threading.Lock()


@dataclass(frozen=True)
class AnalysisRequest:
    """One series to analyse.

    Attributes:
        series_uid: the series (for the outcome and the logs).
        input_dir: a folder holding only that series' instances.
        output_dir: where the result folder is written.
        model: the model file, ``None`` for the shipped one.
        precision: the conv-layer precision.
        backend: the network's runtime.
        settings: the analysis settings.
    """

    series_uid: str
    input_dir: str
    output_dir: str
    model: str | None
    precision: str
    backend: str
    settings: AnalysisSettings


@dataclass(frozen=True)
class AnalysisOutcome:
    """What became of one request.

    Attributes:
        series_uid: the series.
        folder: the result folder (``None`` when it failed).
        summary: one line on the result, or the error.
        failed: whether it failed.
        permanent: a failure that retrying cannot mend (the input itself is unusable).
    """

    series_uid: str
    folder: str | None
    summary: str
    failed: bool = False
    permanent: bool = False


def set_threads(threads: int) -> None:
    """Pool initializer: share the cores between worker processes."""
    import torch

    torch.set_num_threads(max(1, threads))


def _scorer(model: str | None, precision: str, backend: str) -> TileScorer:
    with _SCORERS_LOCK:
        key = (model, precision, backend)
        if key not in _SCORERS:
            _SCORERS[key] = TileScorer.load(model, precision=precision, backend=backend)
        return _SCORERS[key]


def analyse_series(request: AnalysisRequest) -> AnalysisOutcome:
    """Analyse one series folder and save the results; never raises."""
    try:
        scorer = _scorer(request.model, request.precision, request.backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = analyze(Path(request.input_dir), scorer, request.settings, progress=False)
            folder = result.save(request.output_dir)
    except OutputError as error:  # the work folder (disk full, permissions): may mend
        return AnalysisOutcome(request.series_uid, None, str(error), failed=True)
    except InputError as error:  # the series itself cannot be analysed: retrying will not help
        return AnalysisOutcome(request.series_uid, None, error.problem, failed=True, permanent=True)
    except DicomHeatmapError as error:
        return AnalysisOutcome(request.series_uid, None, str(error), failed=True, permanent=True)
    except MemoryError:
        return AnalysisOutcome(request.series_uid, None, "out of memory", failed=True)
    except Exception as error:  # the text may quote header values: only the type leaves the worker
        return AnalysisOutcome(request.series_uid, None, f"unexpected failure ({type(error).__name__})", failed=True)
    warning = f"WARNING: {result.domain_warning}; " if result.domain_warning else ""
    return AnalysisOutcome(request.series_uid, str(folder), warning + result.summary_line())
