"""What the MONAI bundle configs (``configs/*.json``) instantiate beyond the library itself."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Sequence

from monai.bundle import ConfigParser

from monai.data import Dataset

from dicom_heatmap.api import DEFAULT_MAX_PATCHES, AnalysisSettings, analyze_prepared, project_errors
from dicom_heatmap.errors import EXIT_CODE, find_cause, say
from dicom_heatmap.inferer import TileGridInferer
from dicom_heatmap.scorer import TileScorer
from pipelines.evaluation.evaluate import run_evaluation
from pipelines.training.tile_data import TileTable
from pipelines.training.plan import TrainSettings
from pipelines.training.radiology import DEFAULT_FIELD_OF_VIEW_MM, radiology_settings, train_datalist
from pipelines.training.train import train

__all__ = ["HeatmapWorkflow", "TrainWorkflow", "EvaluateWorkflow", "check_overrides"]

#: Arguments of ``python -m monai.bundle run`` itself; every other ``--key value`` pair
#: overrides (or, unchecked, silently adds) a config id.
MONAI_RUN_ARGUMENTS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking",
                       "args_file", "workflow_type", "workflow_name", "properties_path"}


def _override_ids(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The config files and the override ids of a ``monai.bundle run`` command line."""
    config_files, ids = [], []
    tokens = list(argv)
    for index, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        key, _, inline = token[2:].partition("=")
        key = key.replace("-", "_")  # fire reads --max-epochs as max_epochs
        if key == "config_file":
            value = inline or (tokens[index + 1] if index + 1 < len(tokens) else "")
            config_files += [v.strip(" '\"") for v in value.strip("[]").split(",") if v.strip(" '\"")]
        elif key not in MONAI_RUN_ARGUMENTS:
            ids.append(key)
    return config_files, ids


def _one_line_hook(kind, error, trace) -> None:
    """``sys.excepthook`` of a bundle run: a failure the user can mend (a bad override value,
    a missing input or model file) is one line on stderr and exit status 2, as the command
    line gives it; anything else keeps Python's traceback. MONAI's runner owns the process
    and wraps whatever a config item raises in ``RuntimeError``, and an uncaught exception
    ends Python with status 1, so the hook ends the process itself."""
    mendable = find_cause(error)
    if mendable is None:
        sys.__excepthook__(kind, error, trace)
        return
    say(f"monai.bundle: error: {mendable}", sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CODE)


def check_overrides(argv: Sequence[str] | None = None) -> None:
    """The configs' ``initialize`` step: refuse a ``monai.bundle run`` override that names no
    id of the config, and make every later failure the user can mend one line.

    MONAI adds an unknown id to the config without a word, so a mistyped or unsupported
    setting (``--crop_sise``) would run with the default and look as if it had been
    applied; it is refused with one line naming it and the ids the config has, exit status
    2. A bad value of a known id (``--crop foregroud``) fails where the config uses it,
    inside MONAI: :func:`_one_line_hook` prints that as one line. This reads the command
    line, so it checks only runs started as ``python -m monai.bundle run``.

    Args:
        argv: the command line (default ``sys.argv``).
    """
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or Path(argv[0]).parent.name != "bundle" or argv[1] != "run":
        return
    sys.excepthook = _one_line_hook
    config_files, ids = _override_ids(argv[2:])
    if not config_files:
        return
    parser = ConfigParser(ConfigParser.load_config_files(config_files))
    unknown = []
    for id_ in ids:
        try:
            parser[id_]
        except (KeyError, IndexError, ValueError):
            unknown.append(id_)
    if unknown:
        # the ids a user sets: plain values, and paths built from the bundle's folders
        settings = sorted(k for k, v in parser.config.items() if not isinstance(v, (dict, list))
                          and (not str(v).startswith("$") or "_dir" in str(v) or "@bundle_root" in str(v)))
        say(f"monai.bundle: error: unknown override {', '.join('--' + u for u in unknown)} for "
            f"{', '.join(config_files)}; its settings are: {', '.join(settings)}", sys.stderr)
        raise SystemExit(EXIT_CODE)


class HeatmapWorkflow:
    """The inference bundle's ``evaluator``: every item of ``dataset`` (already through the
    preprocessing transforms) is scored, summarised and written to ``output_dir``.

    Args:
        dataset: a MONAI ``Dataset`` whose items hold the image, its metadata and its grid.
        scorer: the loaded model.
        inferer: the :class:`TileGridInferer`.
        settings: the :class:`AnalysisSettings` the preprocessing was configured with.
        output_dir: where each input's result folder goes.
        viewer_files: also write the files viewers open (see :meth:`AnalysisResult.save`).
        max_patches: most patches (or tiles) an input may have scored (see :func:`analyze_prepared`).
    """

    def __init__(self, dataset: Dataset, scorer: TileScorer, inferer: TileGridInferer, settings: AnalysisSettings,
                 output_dir: str | Path, viewer_files: bool = True, max_patches: int = DEFAULT_MAX_PATCHES) -> None:
        self.viewer_files = viewer_files
        self.max_patches = max_patches
        self.dataset = dataset
        self.scorer = scorer
        self.inferer = inferer
        self.settings = settings
        self.output_dir = Path(output_dir)

    def run(self) -> list[Path]:
        """Analyse every item; return the result folders."""
        folders = []
        for index in range(len(self.dataset)):
            with project_errors():
                data = self.dataset[index]
            result = analyze_prepared(data, self.scorer, self.settings, self.inferer, max_patches=self.max_patches)
            folder = result.save(self.output_dir, viewer_files=self.viewer_files)
            if result.domain_warning:
                say(f"warning: {result.meta['source_path']}: {result.domain_warning}")
            say(f"{result.meta['source_path']}: {result.summary_line()}")
            say(f"  -> {folder}")
            folders.append(folder)
        return folders


class TrainWorkflow:
    """The training bundle's ``trainer``: the three stages of :func:`pipelines.training.train.train`.

    The tiles of ``table`` are split by patient fold as ``settings`` says; with ``datalist``
    (the override ``--datalist FILE``) the CT/MR series of a MONAI datalist are trained on
    instead (:func:`pipelines.training.radiology.train_datalist`, its own split and
    settings, with this seed and these epochs). ``train#inferer`` of the config (MONAI's
    SimpleInferer) is there for the bundle's property check only: stage 1 calls the
    network's extractor and classifier directly.

    Args:
        table: the labelled tiles (``train#dataset``); None with ``datalist``.
        output_dir: checkpoints, ``model.pt`` and ``training.json`` go here.
        settings: a :class:`pipelines.training.plan.TrainSettings`.
        max_epochs: stage-1 epochs (replaces ``settings.epochs``).
        datalist: a datalist of CT/MR series and lesion labels, or None.
        field_of_view_mm: with ``datalist``, the side of a tile in mm.
    """

    def __init__(self, table: TileTable | None, output_dir: str | Path, settings: TrainSettings, max_epochs: int | None = None,
                 datalist: str | Path | None = None, field_of_view_mm: float = DEFAULT_FIELD_OF_VIEW_MM) -> None:
        self.table, self.output_dir = table, output_dir
        self.settings = settings if max_epochs is None else dataclasses.replace(settings, epochs=max_epochs)
        self.max_epochs = self.settings.epochs
        self.datalist, self.field_of_view_mm = datalist, field_of_view_mm

    def run(self) -> Path:
        if self.datalist:
            settings = radiology_settings(epochs=self.settings.epochs, seed=self.settings.seed)
            model = train_datalist(self.datalist, self.output_dir, settings, self.field_of_view_mm)
        else:
            model = train(self.table, self.output_dir, self.settings)
        say(f"model written to {model}")
        return model


class EvaluateWorkflow:
    """The evaluation bundle's ``evaluator``: what ``dicom-heatmap evaluate`` runs
    (:func:`pipelines.evaluation.evaluate.run_evaluation`): metrics and ROC plot of a model on labelled
    tiles; with ``slides``, the whole-slide table; with ``mosaics``, the mosaic table.

    Args:
        data_csv: the labels table.
        model_path: the model file.
        output_dir: where ``metrics.json``, ``roc.png`` (and ``slides.*``, ``mosaics.*``) go.
        folds: only these patient folds.
        patients: only these patients.
        slides: rebuild and analyse the whole patients among those chosen.
        mosaics: build and analyse this many mosaics of the patients chosen.
    """

    def __init__(self, data_csv: str | Path, model_path: str | Path, output_dir: str | Path,
                 folds: Sequence[int] | None = None, patients: Sequence[str] | None = None, slides: bool = False,
                 mosaics: int = 0) -> None:
        self.data_csv, self.model_path, self.output_dir = data_csv, model_path, output_dir
        self.folds = list(folds) if folds is not None else None
        self.patients = list(patients) if patients is not None else None
        self.slides = slides
        self.mosaics = mosaics

    def run(self) -> dict:
        return run_evaluation(self.data_csv, self.output_dir, self.model_path, folds=self.folds, patients=self.patients,
                              slides=self.slides, mosaics=self.mosaics)
