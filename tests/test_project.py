"""What a user or a packager checks before adopting bnfold: the licence, bounded dependencies,
no deprecated click API in use."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import onnx
from click.testing import CliRunner

from bnfold.cli import main
from tests.test_cli import conv_bn_model

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()  # Python 3.10 has no tomllib


def test_license_file_is_the_apache_2_text_pyproject_declares():
    assert re.search(r'^license = \{ text = "Apache-2.0" \}$', PYPROJECT, re.M)
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_click_has_an_upper_bound_on_its_major_version():
    (click,) = re.findall(r'^    "(click[^"]*)",$', PYPROJECT, re.M)
    assert re.fullmatch(r"click>=8\.1,<9", click), click


def test_commands_use_no_deprecated_click_api(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(model))
    runs = [["--help"], ["--version"], *([c, "--help"] for c in main.commands),
            ["fold", model, "-o", tmp_path / "f.onnx", "--json", "-"],
            ["inspect", model], ["verify", model, tmp_path / "f.onnx"],
            ["fold", tmp_path / "missing.onnx", "-o", tmp_path / "g.onnx"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for args in runs:
            result = CliRunner().invoke(main, [str(a) for a in args])
            assert not isinstance(result.exception, DeprecationWarning), (args, result.exception)
            assert result.exit_code in (0, 2), (args, result.output)
