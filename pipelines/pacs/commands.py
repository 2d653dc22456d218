"""The ``dicom-heatmap pacs`` subcommands: poll, listen, status."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
import sys
import threading

from dicom_heatmap.errors import EXIT_CODE, OneLineFormatter, one_line, say

from pipelines.pacs.config import parse_duration
from pipelines.pacs.config_file import load_config
from pipelines.pacs.ledger import Ledger

__all__ = ["poll", "listen", "status"]

log = logging.getLogger("dicom_heatmap.pacs")


def _log_to_stderr() -> None:
    """Timestamped lines for a batch job's log (UIDs only, never patient data)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # it logs peers' headers at INFO/DEBUG


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum, frame):
        log.info("stopping (signal %d); series in progress are resumed by the next start", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def poll(args: argparse.Namespace) -> int:
    from pipelines.pacs.poll import PollJob

    config = load_config(args.config)
    every = parse_duration(args.every, "--every") if args.every else None
    _log_to_stderr()
    with PollJob(config, args.workers, args.dask_scheduler, args.force, progress=not args.quiet) as job:
        if every:
            job.every(every, _stop_on_signals())
            return 0
        summary = job.round()
    say(summary.line())
    for failure in summary.failures:
        say(f"  failed: {failure}")
    if summary.stopped:
        say(f"dicom-heatmap: error: {summary.stopped}; the series not done are tried again by the next run", sys.stderr)
    return 0 if summary.ok else EXIT_CODE


def listen(args: argparse.Namespace) -> int:
    from pipelines.pacs.listen import Listener

    config = load_config(args.config)
    _log_to_stderr()
    Listener(config, args.workers, args.dask_scheduler).serve(_stop_on_signals())
    return 0


def status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not config.ledger_path.exists():
        say(f"no ledger yet at {config.ledger_path}: no job has run with this configuration")
        return 0
    ledger = Ledger(config.ledger_path)
    try:
        rows = ledger.rows(args.state)
        counts = ledger.counts()
    finally:
        ledger.close()
    print(f"{'series instance UID':64}  {'origin':6}  {'mod':3}  {'state':10}  {'tries':>5}  {'outputs':>7}  "
          f"{'updated':19}  last error")
    for row in rows:
        updated = dt.datetime.fromtimestamp(row.updated).strftime("%Y-%m-%d %H:%M:%S")
        outputs = "" if row.outputs is None else str(row.outputs)
        print(f"{one_line(row.series_uid, 64):64}  {row.origin:6}  {one_line(row.modality, 3):3}  {row.state:10}  {row.attempts:>5}  "
              f"{outputs:>7}  {updated:19}  {one_line(row.last_error or '')}")
    print("total: " + (", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no series"))
    return 0
