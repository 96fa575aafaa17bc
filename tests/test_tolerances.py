"""Per-output tolerances: --atol/--rtol OUTPUT=VALUE (verify's atol/rtol given by output name)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bnfold.cli import main
from bnfold.errors import BadInput
from bnfold.verify import verify

F = TensorProto.FLOAT


def _two_outputs(shift: float) -> onnx.ModelProto:
    """y1 = x (exact in both models), y2 = 1 * x + shift: a candidate differs on y2 only."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y1"]),
         helper.make_node("Mul", ["x", "k"], ["m"]),
         helper.make_node("Add", ["m", "s"], ["y2"])],
        "g", [helper.make_tensor_value_info("x", F, ["n", 4])],
        [helper.make_tensor_value_info("y1", F, ["n", 4]),
         helper.make_tensor_value_info("y2", F, ["n", 4])],
        [numpy_helper.from_array(np.float32(1.0), "k"),
         numpy_helper.from_array(np.float32(shift), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


ORIGINAL, OFF_BY_1E3 = _two_outputs(0.0), _two_outputs(1e-3)


def _by_name(report):
    return {o.name: o for o in report.outputs}


def test_the_default_test_catches_a_shift_that_a_named_tolerance_allows():
    assert not verify(ORIGINAL, OFF_BY_1E3).passed
    report = verify(ORIGINAL, OFF_BY_1E3, atol={"y2": 2e-3})
    outputs = _by_name(report)
    assert report.passed
    assert outputs["y2"].criterion == "tolerance" and outputs["y2"].atol == 2e-3
    assert outputs["y1"].criterion != "tolerance"  # not named: the default test decided


def test_a_named_tolerance_smaller_than_the_difference_fails_that_output_only():
    report = verify(ORIGINAL, OFF_BY_1E3, atol={"y2": 1e-5}, rtol={"y2": 0.0})
    outputs = _by_name(report)
    assert not report.passed
    assert [o.name for o in report.failures] == ["y2"]
    assert outputs["y2"].max_abs == pytest.approx(1e-3, rel=0.1)


def test_star_sets_the_tolerance_of_the_outputs_not_named():
    report = verify(ORIGINAL, OFF_BY_1E3, atol={"*": 2e-3, "y1": 0.0}, rtol=0.0)
    outputs = _by_name(report)
    assert report.passed
    assert (outputs["y1"].atol, outputs["y2"].atol) == (0.0, 2e-3)
    assert report.reference.startswith("none")


def test_negative_named_tolerance_is_bad_input():
    with pytest.raises(BadInput, match="non-negative"):
        verify(ORIGINAL, ORIGINAL, atol={"y2": -1.0})


@pytest.fixture
def models(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(ORIGINAL, a)
    onnx.save(OFF_BY_1E3, b)
    return str(a), str(b)


@pytest.mark.parametrize("options, code", [
    ([], 1),
    (["--atol", "y2=2e-3"], 0),
    (["--atol", "y2=1e-5", "--rtol", "y2=0"], 1),
    (["--atol", "2e-3"], 0),  # one value for every output, as before
    (["--atol", "1e-6", "--atol", "y2=2e-3"], 0),
])
def test_cli_atol_per_output(models, options, code):
    result = CliRunner().invoke(main, ["verify", *models, "-q", *options])
    assert result.exit_code == code, result.output


@pytest.mark.parametrize("spec", ["y2=", "y2=abc", "-1", "y2=nan"])
def test_cli_bad_tolerance_is_one_line_exit_2(models, spec):
    result = CliRunner().invoke(main, ["verify", *models, "--atol", spec])
    assert result.exit_code == 2
    assert "--atol" in result.output and "Traceback" not in result.output
