"""models/*.npz are usable as --inputs as they are: their input__NAME arrays are the inputs,
their expected outputs and notes are left out."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from bnfold.io import load_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = sorted(glob.glob(os.path.join(ROOT, "models", "*.onnx")))


@pytest.mark.parametrize("model", MODELS, ids=os.path.basename)
def test_fold_checks_on_the_models_own_samples(model, tmp_path):
    npz = model[:-len(".onnx")] + ".npz"
    result = CliRunner().invoke(main, ["fold", model, "-o", str(tmp_path / "f.onnx"),
                                       "--inputs", npz])
    assert result.exit_code == 0, result.output
    assert "verification passed" in result.stderr and f"on inputs from {npz}" in result.stderr


def test_input_prefix_is_stripped_and_other_keys_left_out(tmp_path):
    x = np.ones((2, 3), np.float32)
    np.savez(tmp_path / "a.npz", input__x=x, expected__y=x, source=np.array("torch"))
    assert list(load_inputs(tmp_path / "a.npz")) == ["x"]
    np.savez(tmp_path / "b.npz", x=x, y=x)  # no prefix: every array is an input
    assert list(load_inputs(tmp_path / "b.npz")) == ["x", "y"]
