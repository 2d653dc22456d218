"""Run many `dicom-heatmap analyze` cases in one process (the model loads once).

    python tests/fuzz_runner.py cases.json results.json

Each case is {"input": path, "out": folder, "args": [...]}; each result holds the exit
code, what went to stderr and the peak resident memory so far (kB).
"""

import contextlib
import functools
import io
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicom_heatmap.scorer import TileScorer  # noqa: E402
from pipelines import cli  # noqa: E402

TileScorer.load = functools.lru_cache(maxsize=4)(TileScorer.load)  # the harness's only change: load the model once


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    results = []
    for case in cases:
        stderr, stdout = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            try:
                code = cli.main(["analyze", case["input"], "--out", case["out"], "--quiet", *case.get("args", [])])
            except SystemExit as exit_:
                code = exit_.code
            except BaseException as error:  # what escapes main: the test reports it
                code = f"escaped {type(error).__name__}"
        results.append({"code": code, "stderr": stderr.getvalue(), "stdout": stdout.getvalue(),
                        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
