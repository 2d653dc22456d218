"""The README's examples run as written: every Python block, the bundle's check and export
commands, and every option its tables name exists in the command's --help."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
BUNDLE_README = (ROOT / "docs" / "README.md").read_text()


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def commands(text: str) -> list[str]:
    """Shell lines of ``sh`` blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in blocks(text, "sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                lines.append(line)
    return lines


@pytest.mark.parametrize("index", range(len(blocks(README, "python"))))
def test_readme_python_block_runs(index, tmp_path):
    """Run in a folder of its own (it writes out/), with the sample data where the README
    says it is; a failure prints the block's own traceback."""
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    script = tmp_path / "example.py"
    script.write_text(blocks(README, "python")[index])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    if "result.save(" in script.read_text():
        assert any((tmp_path / "out").glob("*/sr.dcm"))


BUNDLE_CHECKS = sorted({c for c in commands(README) + commands(BUNDLE_README)
                        if "monai.bundle" in c and re.search(r"verify_metadata|verify_net_in_out|ckpt_export", c)})


@pytest.mark.parametrize("command", BUNDLE_CHECKS)
def test_readme_bundle_command_runs(command, tmp_path):
    argv = shlex.split(command)
    argv[0] = sys.executable
    argv = [str(tmp_path / "model.ts") if a == "models/model.ts" else a for a in argv]  # never overwrite the repo
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _options_in_table(section: str) -> set[str]:
    text = README.split(section)[1].split("\n## ")[0]
    return {m for row in text.splitlines() if row.startswith("| `--") for m in re.findall(r"--[a-z][a-z-]+", row.split(" | ")[0])}


@pytest.mark.parametrize("section,command", [("## Command line", "analyze")])
def test_every_documented_option_exists(section, command):
    documented = _options_in_table(section)
    assert len(documented) >= 10
    shown = subprocess.run([sys.executable, "-m", "pipelines.cli", command, "--help"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    assert {o for o in documented if o not in shown} == set()
    offered = set(re.findall(r"(--[a-z][a-z-]+)", shown)) - {"--help", "--out", "--debug"}
    assert offered - documented == set(), "options of --help the README's table does not name"
