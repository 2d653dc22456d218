"""The ``dicom-heatmap`` command line.

    dicom-heatmap analyze INPUT [INPUT ...] --out DIR [options]
    dicom-heatmap demo [--out DIR]
    dicom-heatmap view RESULT_DIR [--port N] [--no-browser] [--source PATH]
    dicom-heatmap train --data labels.csv --out DIR [--test-fold K] [--hold-out FILE]
    dicom-heatmap evaluate --csv labels.csv [--folds 3] [--patients FILE] [--slides] [--mosaics N] [--out DIR]
    dicom-heatmap bench [--sides PX,PX,...] [--rounds N]
    dicom-heatmap pacs poll|listen|status --config pacs.yaml

Errors print one line naming the input and the problem and exit with status 2; a
failure of the program itself is reported the same way, with the traceback only under
``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import traceback
from pathlib import Path

from dicom_heatmap.api import DEFAULT_MAX_PATCHES
from dicom_heatmap.errors import EXIT_CODE, ConfigurationError, DicomHeatmapError, OneLineFormatter, say
from dicom_heatmap.runtime import BACKENDS
from dicom_heatmap.scorer import PRECISIONS
from pipelines.pacs.ledger import STATES
from transforms.io.guards import DEFAULT_MAX_VALUES

__all__ = ["main", "run", "build_parser"]

log = logging.getLogger("dicom_heatmap")


def _pair(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 8x12, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"rows and columns must be positive, got {text!r}")
    return rows, cols


def _sides(text: str) -> tuple[int, ...]:
    """An argparse type: slide sides in pixels, comma-separated (at least 2048 each); ``0`` for none."""
    sides = tuple(int(value) for value in text.split(",") if value.strip().isdigit())
    if sides != (0,) and (len(sides) != len(text.split(",")) or min(sides) < 2048):
        raise argparse.ArgumentTypeError(f"expected sides of at least 2048 pixels such as 12000,40000, got {text!r}")
    return () if sides == (0,) else sides


def _positive(kind: type = float):
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


def _add_analysis_options(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_argument_group("grid (give at most one; default: 8 tiles along the shorter side)")
    exclusive = grid.add_mutually_exclusive_group()
    exclusive.add_argument("--grid", type=_pair, metavar="ROWSxCOLS", help="an exact grid, e.g. 8x12")
    exclusive.add_argument("--tile-size", type=int, metavar="PX", help="tile side in pixels")
    exclusive.add_argument("--tile-size-um", type=float, metavar="UM", help="tile side in micrometres (needs a known pixel spacing)")
    pre = parser.add_argument_group("preprocessing (applied in this order)")
    pre.add_argument("--crop", choices=["foreground", "template"], help="crop to the tissue box, or a template window on the most tissue")
    pre.add_argument("--crop-size", type=_pair, metavar="ROWSxCOLS", help="size of the template window in pixels")
    pre.add_argument("--zoom", type=float, default=1.0, help="resampling factor (default 1)")
    pre.add_argument("--rotate", type=float, default=0.0, metavar="DEG", help="counter-clockwise rotation in degrees")
    parser.add_argument("--model", type=Path, help="model file (default: the shipped models/model.pt)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="precision of the conv layers: auto = bf16 on CPUs with bf16 instructions, fp16 on a GPU, "
                             "else fp32 (the reference); it enters the output UIDs")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="runtime of the network: auto = OpenVINO (the whole network as one graph) for bf16 on a CPU, torch otherwise; "
                             "it enters the output UIDs")
    parser.add_argument("--tissue-threshold", type=float, default=0.25, help="least tissue share of an analysed tile (default 0.25)")
    parser.add_argument("--threshold", type=float, default=0.5, help="score at or above which a tile counts as tumour (default "
                        "0.5; with the whole-slide stage, on scores calibrated to the slide's own threshold)")
    parser.add_argument("--no-context", dest="context", action="store_false",
                        help="skip the whole-slide stage (context network and per-slide calibration): the tile model's "
                             "raw patch scores and the fixed threshold")
    parser.add_argument("--series", metavar="UID", help="Series Instance UID to analyse from a folder holding several")
    parser.add_argument("--resolution-um", type=float, metavar="UM", help="slide pixel spacing to read (nearest level)")
    parser.add_argument("--level", type=int, metavar="N", help="SVS/TIFF pyramid level to read (0 = full resolution; "
                                                               "levels over 64 megapixels are streamed tile by tile)")
    parser.add_argument("--pixel-size-um", type=float, metavar="UM",
                        help="pixel size of a PNG/JPEG picture in micrometres (a picture cannot say it)")
    parser.add_argument("--max-megavalues", type=_positive(), default=DEFAULT_MAX_VALUES / 1e6, metavar="M",
                        help=f"refuse inputs that would decode to more than M million pixel values "
                             f"(default {DEFAULT_MAX_VALUES / 1e6:g})")
    parser.add_argument("--max-patches", type=_positive(int), default=DEFAULT_MAX_PATCHES, metavar="N",
                        help=f"refuse inputs with more than N patches (or tiles) of tissue to score, before scoring "
                             f"(default {DEFAULT_MAX_PATCHES:,}, about 14 minutes on two CPU cores)")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the project's promise for every failure)."""

    def error(self, message: str) -> None:
        self.exit(EXIT_CODE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_analyze(commands) -> None:
    """``analyze``: the product's main command."""
    analyze = commands.add_parser("analyze", help="analyse DICOM series/images, whole-slide images, slides or pictures")
    analyze.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="DICOM folder or file, SVS/TIFF slide, PNG/JPEG")
    analyze.add_argument("--out", type=Path, required=True, help="output folder (one subfolder per input)")
    analyze.add_argument("--quiet", action="store_true", help="no progress bar")
    analyze.add_argument("--no-viewer-files", dest="viewer_files", action="store_false",
                         help="write no scores.nii.gz / analysed.nii.gz / seg.dcm (CT, MR) or heatmap.geojson (slides, pictures)")
    _add_analysis_options(analyze)


def _add_demo(commands) -> None:
    """``demo``: the embedded samples."""
    demo = commands.add_parser("demo", help="analyse the sample data shipped in the repository")
    demo.add_argument("--out", type=Path, default=Path("demo-output"))


def _add_train(commands) -> None:
    """``train``: the method's three stages (the model lab)."""
    train = commands.add_parser("train", help="train the model in the method's three stages")
    train.add_argument("--data", type=Path, required=True, help="labels.csv (columns path, patient_id, label, fold)")
    train.add_argument("--out", type=Path, required=True, help="folder for checkpoints and the model")
    # the plan's defaults live in one place, pipelines.training.plan.TrainSettings: an option not given is not passed
    plan_default = argparse.SUPPRESS
    train.add_argument("--epochs", type=int, default=plan_default, help="stage-1 epochs (default: the shipped model's, 10)")
    train.add_argument("--test-fold", type=int, help="patient fold held out for testing (cross-validation); by default "
                       "every fold trains and only the --hold-out patients are kept out (the shipped model)")
    train.add_argument("--hold-out", type=Path, metavar="FILE",
                       help="patient IDs, one a line, kept out of every stage and tested (default without --test-fold: "
                            "models/held_out_patients.txt; with it: none)")
    train.add_argument("--input-size", type=int, default=plan_default, help="tile side the network sees (default 48)")
    train.add_argument("--max-tiles", type=int, help="cap every split (smoke runs)")
    train.add_argument("--colour-jitter", type=float, default=plan_default, metavar="F",
                       help="scale of the H&E colour jitter (default 1, the shipped model's)")
    train.add_argument("--balanced-sampling", action="store_true",
                       help="stage 1 draws both classes equally often instead of weighting the loss by class")
    train.add_argument("--stain-jitter", type=float, default=plan_default, metavar="SIGMA",
                       help="scale and shift each stain's optical density by up to SIGMA (default 0.2, the shipped "
                            "model's; 0 turns it off)")
    train.add_argument("--label-smoothing", type=float, default=plan_default, metavar="EPS",
                       help="stage 1 learns soft targets: 1 - EPS/2 for the tile's class (default 0, hard labels)")
    train.add_argument("--stain-normalisation", action="store_true",
                       help="the network scales each tile's haematoxylin and eosin to the training tiles' 99th "
                            "percentiles, in training and when it scores (stored with the model)")
    train.add_argument("--cross-fit", action="store_true",
                       help="the fusion learns from heads fit on the other half of the head patients (cross-fitting); "
                            "the heads are then fit on both halves")
    train.add_argument("--head-share", type=float, metavar="F",
                       help="share of the head folds' patients kept for the heads and the fusion; the rest train the "
                            "extractor (default: 1 with --test-fold, 2/3 without)")


def _add_train_context(commands) -> None:
    """``train-context``: the whole-slide stage (the model lab)."""
    context = commands.add_parser("train-context", help="train the whole-slide context stage on whole slides and add it "
                                  "to a model")
    context.add_argument("--data", type=Path, required=True, help="labels.csv of the IDC tiles (whole patients are rebuilt "
                         "as slides; the held-out patients are left out)")
    context.add_argument("--out", type=Path, required=True, help="folder for the model, the report and the cached maps")
    context.add_argument("--model", type=Path, help="the model to extend (default: the shipped model)")
    context.add_argument("--map-model", type=Path, action="append", default=[], metavar="MODEL",
                         help="a cross-validation run's model (its training.json beside it): the slides of the patients "
                              "it never saw are scored by it, so the stage learns from maps like those of new patients; "
                              "may be given several times")
    context.add_argument("--epochs", type=int, default=None, help="passes over the slides (default 30)")
    context.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_bench(commands) -> None:
    """``bench``: speed as ratios measured in one run."""
    bench = commands.add_parser("bench", help="speed as ratios in one run: tile scoring, the fixed cost, and the default "
                                              "analysis of synthetic slides against a MONAI pipeline")
    bench.add_argument("--model", type=Path, help="model file (default: the shipped model)")
    bench.add_argument("--seconds", type=float, default=4.0, help="time per measurement (default 4)")
    bench.add_argument("--sides", type=_sides, default=(12000, 40000, 80000), metavar="PX,PX,...",
                       help="sides of the synthetic slides raced against a MONAI pipeline (default 12000,40000,80000; "
                            "0: no race)")
    bench.add_argument("--rounds", type=_positive(int), default=3, help="interleaved rounds of the race (default 3)")


def _add_view(commands) -> None:
    """``view``: the heatmap over the source image in a local web page."""
    view = commands.add_parser("view", help="show a result over its source image in a local web page (127.0.0.1)")
    view.add_argument("result", type=Path, metavar="RESULT_DIR", help="a result folder: OUT/<UID>/ as analyze wrote it")
    view.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    view.add_argument("--no-browser", action="store_true", help="print the address only; open no browser")
    view.add_argument("--source", type=Path, help="the source image, where it is no longer at the path result.json names")


def _add_pacs(commands) -> None:
    """``pacs poll|listen|status``: next to a PACS."""
    pacs = commands.add_parser("pacs", help="run next to a PACS: poll it, or receive series as a DICOM node")
    pacs_commands = pacs.add_subparsers(dest="pacs_command", required=True)
    poll = pacs_commands.add_parser("poll", help="find new series in the archive, analyse them, store the results back")
    listen = pacs_commands.add_parser("listen", help="a storage SCP: analyse each received series once it is complete")
    status = pacs_commands.add_parser("status", help="list the ledger: every series and its state")
    for sub in (poll, listen, status):
        sub.add_argument("--config", type=Path, required=True, help="the pacs.yaml file")
    for sub in (poll, listen):
        sub.add_argument("--workers", type=int, default=1, metavar="N", help="analyse N series in parallel processes")
        sub.add_argument("--dask-scheduler", metavar="ADDRESS",
                         help="send the analyses to an existing Dask cluster (e.g. tcp://10.0.0.5:8786)")
    poll.add_argument("--every", metavar="DURATION", help="keep polling, e.g. 60s or 5m (default: one round)")
    poll.add_argument("--force", action="store_true", help="analyse and store again series already done or failed")
    poll.add_argument("--quiet", action="store_true", help="no progress bar")
    status.add_argument("--state", choices=STATES,
                        help="only series in this state")


def _add_evaluate(commands) -> None:
    """``evaluate``: metrics of a model (the model lab)."""
    evaluate = commands.add_parser("evaluate", help="metrics of a model on labelled tiles, with a ROC plot")
    evaluate.add_argument("--csv", type=Path, required=True, help="labels.csv (columns path, patient_id, label, fold)")
    evaluate.add_argument("--root", type=Path, help="folder the csv paths are relative to (default: the csv's folder)")
    evaluate.add_argument("--model", type=Path, help="model file (default: the shipped model)")
    evaluate.add_argument("--folds", type=lambda t: [int(v) for v in t.split(",")], help="only these patient folds, e.g. 3")
    evaluate.add_argument("--patients", type=Path, metavar="FILE",
                          help="only these patients (IDs one a line), e.g. models/held_out_patients.txt")
    evaluate.add_argument("--slides", action="store_true",
                          help="also rebuild the slide of every whole patient among those chosen (every tile in the "
                               "table), analyse it and compare heatmap and spread direction with the annotation")
    evaluate.add_argument("--mosaics", type=int, default=0, metavar="N",
                          help="also build N mosaics of real tiles of the patients chosen (a focus with a tail in "
                               "N - N//4 directions round the compass, and N//4 round lesions), analyse them and compare "
                               "with their layout")
    evaluate.add_argument("--out", type=Path, default=Path("evaluation"),
                          help="folder for metrics.json and roc.png (with --slides also slides.md, slides.json, slides/; "
                               "with --mosaics mosaics.md, mosaics.json, mosaics/)")
    evaluate.add_argument("--precision", choices=PRECISIONS, default="auto", help="as for analyze")
    evaluate.add_argument("--backend", choices=BACKENDS, default="auto", help="as for analyze")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="dicom-heatmap", description="Tile-wise tumour heatmaps and spread direction, written back as DICOM. Research use only, not for diagnosis.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected failures")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_analyze, _add_demo, _add_view, _add_train, _add_train_context, _add_bench, _add_pacs, _add_evaluate):
        add(commands)
    return parser


def _settings(args: argparse.Namespace):
    from dicom_heatmap.api import AnalysisSettings

    return AnalysisSettings(
        grid=args.grid,
        tile_size=args.tile_size,
        tile_size_um=args.tile_size_um,
        tissue_threshold=args.tissue_threshold,
        threshold=args.threshold,
        crop=args.crop,
        crop_size=args.crop_size,
        zoom=args.zoom,
        rotate=args.rotate,
        series_uid=args.series,
        resolution_um=args.resolution_um,
        level=args.level,
        pixel_size_um=args.pixel_size_um,
        context=args.context,
    )


def run_analyze(args: argparse.Namespace) -> int:
    from dicom_heatmap.api import analyze
    from dicom_heatmap.scorer import TileScorer
    from dicom_heatmap.writers.common import read_standard_tables_in_background

    settings = _settings(args)
    read_standard_tables_in_background()
    scorer = TileScorer.load(args.model, precision=args.precision, backend=args.backend)
    failed = 0
    for path in args.inputs:
        try:
            result = analyze(path, scorer, settings, progress=not args.quiet, max_values=int(args.max_megavalues * 1e6),
                             max_patches=args.max_patches)
            folder = result.save(args.out, viewer_files=args.viewer_files)
        except DicomHeatmapError as error:
            say(f"dicom-heatmap: error: {error}", sys.stderr)
            failed += 1
            continue
        except Exception as error:  # one bad input must not stop the others
            # the exception's text may quote header values (patient data): only its type is shown
            if args.debug:
                traceback.print_exc()
            say(f"dicom-heatmap: error: {path}: unexpected failure ({type(error).__name__}); "
                "rerun with --debug and report it", sys.stderr)
            failed += 1
            continue
        if result.domain_warning:
            say(f"dicom-heatmap: warning: {path}: {result.domain_warning}", sys.stderr)
        if result.scale_notice:
            say(f"dicom-heatmap: notice: {path}: {result.scale_notice}", sys.stderr)
        say(f"{path}: {result.summary_line()}")
        say(f"  -> {folder}")
    return EXIT_CODE if failed else 0


def run_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo as demo

    return demo(args.out)


def run_train(args: argparse.Namespace) -> int:
    from pipelines.training.tile_data import read_patient_list
    from pipelines.training.plan import TrainSettings, fold_plan
    from pipelines.training.train import train

    plan = fold_plan(args.test_fold)
    if args.head_share is not None:
        plan["head_share"] = args.head_share
    if args.hold_out is not None:
        plan["held_out_patients"] = read_patient_list(args.hold_out)
    given = {name: getattr(args, name) for name in ("epochs", "input_size", "colour_jitter", "stain_jitter", "label_smoothing") if hasattr(args, name)}
    settings = TrainSettings(max_tiles=args.max_tiles, balanced_sampling=args.balanced_sampling, cross_fit=args.cross_fit,
                             stain_normalisation=args.stain_normalisation, **given, **plan)
    model = train(args.data, args.out, settings)
    say(f"model written to {model}")
    return 0


def run_train_context(args: argparse.Namespace) -> int:
    from dicom_heatmap.errors import checked_number
    from pipelines.training.context_stage import CONTEXT_EPOCHS, train_context

    epochs = checked_number("epochs", args.epochs if args.epochs is not None else CONTEXT_EPOCHS, int, 1, 10_000)
    model = train_context(args.data, args.out, args.model, args.map_model, epochs, progress=not args.quiet)
    say(f"model with the context stage written to {model}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from pipelines.evaluation.evaluate import run_evaluation
    from pipelines.training.tile_data import read_patient_list

    patients = read_patient_list(args.patients) if args.patients is not None else None
    run_evaluation(args.csv, args.out, args.model, args.root, args.folds, patients, args.slides, args.mosaics,
                   args.precision, args.backend)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from pipelines.evaluation.bench import run_bench as bench

    bench(args.model, args.seconds, args.sides, args.rounds)
    return 0


def run_view(args: argparse.Namespace) -> int:
    import webbrowser

    from pipelines.viewer.scene import open_scene
    from pipelines.viewer.server import ViewerServer

    if not 0 <= args.port <= 65535:
        raise ConfigurationError(f"--port must be a port number 0..65535, got {args.port}")
    scene = open_scene(args.result, args.source)
    try:
        server = ViewerServer(scene, args.port)
    except OSError as error:
        raise ConfigurationError(f"cannot listen on 127.0.0.1:{args.port} ({error.strerror})") from None
    say(f"viewer of {args.result} at {server.url}  (Ctrl-C to stop)")
    sys.stdout.flush()
    if not args.no_browser:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def run_pacs(args: argparse.Namespace) -> int:
    from pipelines.pacs.commands import listen, poll, status

    return {"poll": poll, "listen": listen, "status": status}[args.pacs_command](args)


def _console_logging(debug: bool) -> None:
    """The console carries the project's own lines only: one per failure, warnings and
    notices. Libraries' log records (pydicom logs a traceback for every failed decode) and
    Python warnings (numpy, highdicom) go to the logging system at debug level, which
    ``--debug`` shows."""
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(name)s: %(message)s"))
    if not debug:
        handler.addFilter(lambda record: record.name == log.name or record.name.startswith(log.name + "."))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _console_logging(args.debug)
    handlers = {"analyze": run_analyze, "demo": run_demo, "train": run_train, "train-context": run_train_context,
                "evaluate": run_evaluate, "bench": run_bench, "view": run_view,
                "pacs": run_pacs}
    try:
        return handlers[args.command](args)
    except DicomHeatmapError as error:
        say(f"dicom-heatmap: error: {error}", sys.stderr)
        return EXIT_CODE
    except KeyboardInterrupt:
        say("dicom-heatmap: interrupted", sys.stderr)
        return 130
    except Exception as error:  # a bug or an unforeseen input: one line, never a traceback by default
        if args.debug:
            traceback.print_exc()
        say(f"dicom-heatmap: error: unexpected failure ({type(error).__name__}); rerun with --debug and report it",
            sys.stderr)
        return EXIT_CODE


def run() -> None:
    """The console script: :func:`main`, then the process ends at once, skipping the
    interpreter's teardown of torch, MONAI and OpenVINO (1.1 s of 4.7 s on the PNG sample)."""
    status = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(status)


if __name__ == "__main__":
    run()
