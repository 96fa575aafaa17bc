"""fold --strict: a kept batch norm fails the run with its own exit code, 3."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import onnx
from click.testing import CliRunner

import bnfold.cli.fold
from bnfold.cli import main
from tests.builders import conv_bn, conv_bn_relu_bn_conv
from tests.test_cli import with_changed_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def kept_model(tmp_path):
    """bn1 (training mode) is kept, bn2 folds."""
    path = tmp_path / "kept.onnx"
    onnx.save(conv_bn_relu_bn_conv(first_bn_training=True), str(path))
    return path


def test_strict_exits_3_when_a_batch_norm_is_kept_and_writes_the_output(tmp_path):
    result = run("fold", kept_model(tmp_path), "-o", tmp_path / "out.onnx", "--strict")
    assert result.exit_code == 3, result.output
    assert "bnfold: --strict: 1 batch norm(s) kept: bn1" in result.stderr.splitlines()[-1]
    assert "verification passed" in result.stderr and (tmp_path / "out.onnx").exists()


def test_without_strict_a_kept_batch_norm_exits_0(tmp_path):
    assert run("fold", kept_model(tmp_path), "-o", tmp_path / "out.onnx").exit_code == 0


def test_strict_exits_0_when_every_batch_norm_folds(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn(), str(path))
    assert run("fold", path, "-o", tmp_path / "out.onnx", "--strict").exit_code == 0


def test_strict_dry_run_exits_3(tmp_path):
    result = run("fold", kept_model(tmp_path), "--dry-run", "--strict", "-q")
    assert result.exit_code == 3 and result.stderr.startswith("bnfold: --strict")


def test_a_failed_verification_exits_1_even_with_strict(tmp_path, monkeypatch):
    monkeypatch.setattr(bnfold.cli.fold, "fold", with_changed_weight(bnfold.cli.fold.fold))
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn(), str(path))
    assert run("fold", path, "-o", tmp_path / "out.onnx", "--strict").exit_code == 1


def test_strict_exit_code_in_a_subprocess(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bnfold", "fold", str(kept_model(tmp_path)),
                           "-o", str(tmp_path / "out.onnx"), "--strict", "--no-verify"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr


def test_exit_codes_are_documented_in_the_readme_and_help():
    readme = open(os.path.join(ROOT, "README.md")).read()
    codes = re.findall(r"^\| (\d+(?:, \d+)?) \|", readme, re.M)
    assert codes == ["0", "1", "2", "3", "130, 143"]
    assert "--strict" in readme.split("| 3 |")[1].splitlines()[0]
    help_text = " ".join(run("--help").stdout.split())
    assert "3: a batch norm was kept (fold --strict)" in help_text
    assert "Exit 3 if any batch norm is kept" in " ".join(run("fold", "--help").stdout.split())
