"""The README's two opening commands stay true: the fold command runs, and .ci/run runs the test
command the README gives."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The indented command lines of the README's opening section (before the first heading)."""
    opening = (ROOT / "README.md").read_text().split("\n## ")[0]
    return [line.strip() for line in opening.splitlines() if line.startswith("    ")]


def test_readme_opens_with_an_install_and_fold_command_and_a_test_command():
    install_and_fold, install_and_test = readme_commands()[:2]
    assert re.match(r"pip install \. && bnfold fold models/\S+\.onnx -o \S+$", install_and_fold)
    assert re.match(r'pip install "\.\[test\]" && python -m pytest$', install_and_test)


def test_readme_fold_command_works(tmp_path):
    command = readme_commands()[0].split(" && ", 1)[1]
    args = shlex.split(command)
    output = tmp_path / args[args.index("-o") + 1]
    args[args.index("-o") + 1] = str(output)
    done = subprocess.run([sys.executable, "-m", "bnfold", *args[1:]], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "verification passed" in done.stderr
    onnx.checker.check_model(onnx.load(output), full_check=True)


def test_ci_runs_the_readme_test_command():
    install, test = readme_commands()[1].split(" && ")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci and test in ci
    assert ci.index(install) < ci.index(test)


def test_readme_fold_output_is_ignored_by_git():
    from fnmatch import fnmatch

    args = shlex.split(readme_commands()[0].split(" && ", 1)[1])
    output = args[args.index("-o") + 1]
    assert "/" not in output  # in the checkout's top folder
    patterns = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert any(p.startswith("/") and fnmatch(output, p[1:]) for p in patterns), output
