"""The ``dicom-heatmap`` command line.

    dicom-heatmap analyze INPUT [INPUT ...] --out DIR [options]
    dicom-heatmap demo [--out DIR]
    dicom-heatmap view RESULT_DIR [--port N] [--no-browser] [--source PATH]
    dicom-heatmap train --data labels.csv | --datalist datalist.json --out DIR [options]
    dicom-heatmap evaluate --csv labels.csv | --datalist datalist.json [--model MODEL] [--out DIR] [options]
    dicom-heatmap train-context --data labels.csv --out DIR
    dicom-heatmap bench [--sides PX,PX,...] [--rounds N]
    dicom-heatmap pacs poll|listen|status --config pacs.yaml

Errors print one line naming the input and the problem and exit with status 2; a
failure of the program itself is reported the same way, with the traceback only under
``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from dicom_heatmap.api import DEFAULT_MAX_PATCHES
from dicom_heatmap.errors import EXIT_CODE, ConfigurationError, DicomHeatmapError, OneLineFormatter, say
from dicom_heatmap.runtime import BACKENDS
from dicom_heatmap.scorer import PRECISIONS
from pipelines.arguments import pair, positive
from pipelines.lab import LAB_HANDLERS, LAB_PARSERS
from pipelines.pacs.ledger import STATES
from transforms.io.guards import DEFAULT_MAX_VALUES

__all__ = ["main", "run", "build_parser"]

log = logging.getLogger("dicom_heatmap")


def _add_analysis_options(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_argument_group("grid (give at most one; default: 8 tiles along the shorter side)")
    exclusive = grid.add_mutually_exclusive_group()
    exclusive.add_argument("--grid", type=pair, metavar="ROWSxCOLS", help="an exact grid, e.g. 8x12")
    exclusive.add_argument("--tile-size", type=int, metavar="PX", help="tile side in pixels")
    exclusive.add_argument("--tile-size-um", type=float, metavar="UM", help="tile side in micrometres (needs a known pixel spacing)")
    pre = parser.add_argument_group("preprocessing (applied in this order)")
    pre.add_argument("--crop", choices=["foreground", "template"], help="crop to the tissue box, or a template window on the most tissue")
    pre.add_argument("--crop-size", type=pair, metavar="ROWSxCOLS", help="size of the template window in pixels")
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
    parser.add_argument("--max-megavalues", type=positive(), default=DEFAULT_MAX_VALUES / 1e6, metavar="M",
                        help=f"refuse inputs that would decode to more than M million pixel values "
                             f"(default {DEFAULT_MAX_VALUES / 1e6:g})")
    parser.add_argument("--max-patches", type=positive(int), default=DEFAULT_MAX_PATCHES, metavar="N",
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


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="dicom-heatmap", description="Tile-wise tumour heatmaps and spread direction, written back as DICOM. Research use only, not for diagnosis.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected failures")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_analyze, _add_demo, _add_view, *LAB_PARSERS, _add_pacs):
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
    handlers = {"analyze": run_analyze, "demo": run_demo, "view": run_view, "pacs": run_pacs, **LAB_HANDLERS}
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
