"""Generated hostile inputs through the real command, in a child process: what the user
sees (exit status, stderr lines) and what the machine pays (peak memory)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pydicom
import pytest

from conftest import ROOT
from hostile import PLANTED, make_cases

#: What no console line may hold: C0 controls but the line feed, DEL, C1 controls.
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
#: Peak memory any input the guard accepts or refuses may cost (the issue's bound).
PEAK_LIMIT_KB = 3 * 1024 * 1024
# Runs the command as its child and reports the child's peak resident memory.
WRAPPER = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[2:], capture_output=True, text=True)
json.dump({"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
           "peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")

    def run(case):
        out = folder / "out" / case.name
        report = folder / f"{case.name}.json"
        subprocess.run([sys.executable, "-c", WRAPPER, str(report), sys.executable, "-m", "pipelines.cli", "analyze",
                        str(case.path), "--out", str(out), "--quiet", *case.options], cwd=ROOT, timeout=600, check=True)
        return case.name, (case, out, json.loads(report.read_text()))

    # two at a time: each is mostly one process's start-up; peak memory is still each run's own
    with ThreadPoolExecutor(2) as runs:
        return dict(runs.map(run, make_cases(folder / "inputs")))


def test_every_hostile_input_ends_clean(outcomes, dciodvfy):
    problems = []
    for name, (case, out, run) in outcomes.items():
        console = run["stdout"] + run["stderr"]
        lines = run["stderr"].splitlines()
        if run["peak_kb"] > PEAK_LIMIT_KB:
            problems.append(f"{name}: peak memory {run['peak_kb'] / 1024:.0f} MB")
        if "Traceback" in console or "Warning" in console or "WARNING" in console or "warnings.warn" in console:
            problems.append(f"{name}: library output on the console: {console[:300]!r}")
        if CONTROL.search(console):  # every line printed is escaped: a path or header cannot act on the terminal
            problems.append(f"{name}: a control character reached the console: {console[:300]!r}")
        if case.expect == "refused":
            if run["rc"] != 2 or len(lines) != 1 or case.message not in lines[0]:
                problems.append(f"{name}: expected one line with {case.message!r} and exit 2, got {run['rc']}: {lines}")
            if PLANTED in console:
                problems.append(f"{name}: the planted patient string reached the console")
            if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
                problems.append(f"{name}: a result was written for a refused input")
            continue
        if run["rc"] != 0:
            problems.append(f"{name}: a valid input was refused: {lines}")
            continue
        if case.expect == "analysed":
            continue
        (folder,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
        source = pydicom.dcmread(case.path)
        for path in sorted(folder.glob("*.dcm")):
            written = pydicom.dcmread(path)
            if written.get("SpecificCharacterSet") != source.get("SpecificCharacterSet"):
                problems.append(f"{name}/{path.name}: Specific Character Set {written.get('SpecificCharacterSet')!r}")
            if written["PatientName"].value.original_string != source["PatientName"].value.original_string:
                problems.append(f"{name}/{path.name}: PatientName bytes differ from the source's")
            if dciodvfy(path):
                problems.append(f"{name}/{path.name}: dciodvfy: {dciodvfy(path)[:2]}")
    assert problems == []
