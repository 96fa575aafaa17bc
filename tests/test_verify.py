"""bnfold.verify: both models run unoptimised in onnxruntime on the same inputs."""

from __future__ import annotations

import importlib
import re

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import BadInput
from bnfold.verify import random_inputs, run, verify

runtime = importlib.import_module("bnfold.verify.runtime")

F, D = TensorProto.FLOAT, TensorProto.DOUBLE
W = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)


def _model(nodes, inputs, outputs, inits=(), *, opset=17, ir=None):
    """A checked model from (name, elem_type, shape) inputs/outputs and initializers by name."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(*v) for v in inputs],
        [helper.make_tensor_value_info(*v) for v in outputs],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in dict(inits).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir is not None:
        model.ir_version = ir
    onnx.checker.check_model(model)
    return model


def _unary(op, elem_type=F, shape=("n",)):
    return _model([helper.make_node(op, ["x"], ["y"])], [("x", elem_type, shape)],
                  [("y", elem_type, shape[::-1] if op == "Transpose" else shape)])


def _matmul(w=W, *, elem_type=F, x_shape=("batch", 3), x="x", y="y"):
    return _model([helper.make_node("MatMul", [x, "w"], [y])], [(x, elem_type, x_shape)],
                  [(y, elem_type, [*x_shape[:-1], w.shape[1]])], {"w": w})


def _shift(delta):
    """float64 y = x + delta."""
    return _model([helper.make_node("Add", ["x", "d"], ["y"])], [("x", D, ["n"])],
                  [("y", D, ["n"])], {"d": np.asarray(delta, np.float64)})


def test_identical_models_pass():
    report = verify(_matmul(), _matmul(), runs=2)
    assert report.passed and report.runs == 2
    [out] = report.outputs
    assert (out.name, out.dtype, out.shape, out.max_abs) == ("y", "float32", [2, 4], 0.0)
    assert report.inputs == ("random inputs (seed 0, batch=2, floats normal; "
                             "seed 1, batch=1, floats uniform 0..255)")


def test_perturbed_weight_fails_and_names_the_output():
    report = verify(_matmul(), _matmul(W + np.float32(1e-2)))
    assert [o.name for o in report.failures] == ["y"] and not report.passed
    assert report.outputs[0].max_abs > 1e-3
    assert "y (float32 [2, 4])" in report.to_text() and "FAILED" in report.to_text()
    assert verify(_matmul(), _matmul(W + np.float32(1e-2)), atol=10.0).passed  # x up to 255


def test_needed_tolerances_on_a_hand_computed_example():
    x = {"x": np.array([1.0, -2.0, 0.5, 4.0])}
    delta = [0.1, 0.0, -0.06, 0.02]  # |a-b| = .1, 0, .06, .02 against |b| = 1, 2, .5, 4
    [out] = verify(_shift(0.0), _shift(delta), inputs=x, atol=1e-3, rtol=1e-2).outputs
    assert out.max_abs == pytest.approx(0.1) and out.max_rel == pytest.approx(0.12)
    assert out.needed_atol == pytest.approx(0.1 - 1e-2 * 1)  # first element
    assert out.needed_rtol == pytest.approx((0.06 - 1e-3) / 0.5)  # third element
    assert not out.passed
    report = verify(_shift(0.0), _shift(delta), inputs=x, atol=out.needed_atol * 1.001, rtol=1e-2)
    assert report.passed and report.inputs == "given inputs"


def test_needed_rtol_is_infinite_where_the_reference_is_zero():
    x = {"x": np.array([1.0, 0.0])}
    [out] = verify(_shift(0.0), _shift([0.0, 2e-3]), inputs=x, atol=1e-3, rtol=1e-2).outputs
    assert out.needed_rtol == np.inf and out.max_rel == 0.0  # b == 0 is left out of max_rel
    assert out.needed_atol == pytest.approx(2e-3)


def test_symbolic_dims_avoid_the_models_sizes_and_dims_override():
    # Every integer dimension (3, 5) is avoided; each symbolic name gets its own size (draw 1:
    # primes from 2; draw 2: all 1).
    model = _matmul(np.ones((3, 5), np.float32), x_shape=("batch", "seq", 3))
    assert random_inputs(model)["x"].shape == (2, 7, 3)
    assert random_inputs(model, draw=1)["x"].shape == (1, 1, 3)
    assert verify(model, model).inputs == ("random inputs (seed 0, batch=2, seq=7, floats normal; "
                                           "seed 1, batch=1, seq=1, floats uniform 0..255)")
    assert random_inputs(model, dims={"batch": 11})["x"].shape == (11, 2, 3)
    assert random_inputs(model, dims={"batch": 2})["x"].shape == (2, 7, 3)  # 2 is taken
    assert random_inputs(model, dims={"batch": 2}, draw=1)["x"].shape == (2, 1, 3)
    with pytest.raises(BadInput, match="unknown dimension btach"):
        verify(model, model, dims={"btach": 2})


def test_unnamed_dims_get_a_size_too():
    model = _matmul(x_shape=(None, 3))
    assert verify(model, model, runs=1).inputs == "random inputs (seed 0, x[0]=2, floats normal)"
    assert random_inputs(model, dims={"x[0]": 2})["x"].shape == (2, 3)


def test_each_seed_gives_its_own_inputs():
    first, again, second = (random_inputs(_matmul(), seed=s)["x"] for s in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second)


def _gather_where(offset=0):
    """y = mask ? table[idx] : 0 (float), and k = idx + offset (int64)."""
    return _model(
        [helper.make_node("Gather", ["table", "idx"], ["g"]),
         helper.make_node("Unsqueeze", ["mask", "axis"], ["m"]),
         helper.make_node("Where", ["m", "g", "zero"], ["y"]),
         helper.make_node("Add", ["idx", "offset"], ["k"])],
        [("idx", TensorProto.INT64, ["n"]), ("mask", TensorProto.BOOL, ["n"])],
        [("y", F, ["n", 2]), ("k", TensorProto.INT64, ["n"])],
        {"table": np.arange(10, dtype=np.float32).reshape(5, 2), "axis": np.array([1]),
         "zero": np.float32(0), "offset": np.int64(offset)},
    )


def test_int64_and_bool_inputs_and_exact_integer_outputs():
    feeds = random_inputs(_gather_where())
    assert feeds["idx"].dtype == np.int64 and feeds["mask"].dtype == np.bool_
    assert 0 <= feeds["idx"].min() and feeds["idx"].max() <= 4
    assert verify(_gather_where(), _gather_where()).passed
    report = verify(_gather_where(), _gather_where(offset=1))
    assert [o.name for o in report.failures] == ["k"]
    assert report.failures[0].atol == 0.0 and report.failures[0].max_abs == 1.0


def test_npz_inputs_and_bad_names(tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, x=np.ones((2, 3), np.float64))  # cast to the declared float32
    report = verify(_matmul(), _matmul(), inputs=path)
    assert report.passed and report.inputs == f"inputs from {path}"
    assert report.outputs[0].shape == [2, 4]
    np.savez(path, x=np.ones((2, 3)), z=np.ones(1))
    with pytest.raises(BadInput, match="unknown z"):
        verify(_matmul(), _matmul(), inputs=path)
    with pytest.raises(BadInput, match="missing x"):
        verify(_matmul(), _matmul(), inputs={"z": np.ones(1)})


@pytest.mark.parametrize("candidate, message", [
    (_matmul(x="u"), "inputs differ: only in the reference: x; only in the candidate: u"),
    (_matmul(y="z"), "outputs differ: only in the reference: y; only in the candidate: z"),
    (_matmul(W.astype(np.float16), elem_type=TensorProto.FLOAT16),
     "input 'x' is tensor(float) in the reference, tensor(float16) in the candidate"),
    (_matmul(x_shape=("batch", "seq", 3)),
     "input 'x' has rank 2 in the reference, 3 in the candidate"),
])
def test_interface_mismatch_is_bad_input(candidate, message):
    with pytest.raises(BadInput, match=re.escape(message)):
        verify(_matmul(), candidate)


def test_half_precision_outputs_use_their_own_ulps():
    # Changed by issue 7: the default check no longer uses onnxruntime's op-test tolerances but
    # the output dtype's ulps (and, past them, a float64 reference; see test_check.py).
    fp16 = _matmul(W.astype(np.float16), elem_type=TensorProto.FLOAT16)
    x = {"x": np.random.default_rng(0).standard_normal((5, 3)).astype(np.float16)}
    [out] = verify(fp16, fp16, inputs=x).outputs
    magnitude = np.abs(run(fp16, x)["y"].astype(np.float64)).max()
    assert out.dtype == "float16" and out.criterion == "close" and out.passed
    assert out.bound == 8 * 2.0 ** (np.floor(np.log2(magnitude)) - 10)  # 8 ulps of float16
    [out] = verify(fp16, fp16, inputs=x, atol=1e-3).outputs  # given: the old tolerance test
    assert out.criterion == "tolerance" and out.rtol == 1e-3 and out.atol == 1e-3
    bf16 = _unary("Identity", TensorProto.BFLOAT16)
    [out] = verify(bf16, bf16).outputs
    assert out.passed and out.dtype == "bfloat16" and out.criterion == "close"
    assert run(bf16, {"x": np.array([1.5, -2], ml_dtypes.bfloat16)})["y"].tolist() == [1.5, -2]


def test_nan_agrees_only_in_the_same_places():
    log_abs = _model([helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Log", ["a"], ["y"])],
                     [("x", F, ["n"])], [("y", F, ["n"])])
    x = {"x": np.array([-1, 2, np.inf], np.float32)}
    assert verify(_unary("Log"), _unary("Log"), inputs=x).passed  # NaN = NaN, inf = inf
    [out] = verify(_unary("Log"), log_abs, inputs=x).outputs
    assert not out.passed and out.note == "NaN in reference only at 1 position"


def test_shape_mismatch_fails_with_a_note():
    [out] = verify(_unary("Identity", shape=("n", 3)), _unary("Transpose", shape=("n", 3))).outputs
    assert not out.passed and out.note == "shape mismatch: reference [2, 3], candidate [3, 2]"


@pytest.mark.parametrize("ir, opset", [(3, 8), (8, 17)])
def test_initializers_listed_as_inputs_are_not_fed(ir, opset):
    # IR < 4 lists every initializer as an input; in IR >= 4 such an input has a default.
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                   [("x", F, ["batch", 3]), ("w", F, [3, 4])], [("y", F, ["batch", 4])],
                   {"w": W}, opset=opset, ir=ir)
    assert list(random_inputs(model)) == ["x"]
    assert verify(model, model).passed


def test_graph_optimizations_are_disabled():
    options = runtime.session(_matmul(), None, "reference").get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


@pytest.mark.parametrize("limit", [None, 0])  # serialised to bytes, or saved to a temp dir
def test_in_memory_model_with_external_data(tmp_path, monkeypatch, limit):
    if limit is not None:
        monkeypatch.setattr(runtime, "_PROTOBUF_LIMIT", limit)
    onnx.save(_matmul(), tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    external = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    report = verify(tmp_path / "m.onnx", external, base_dir=tmp_path)
    assert report.passed and report.outputs[0].max_abs == 0.0
    with pytest.raises(BadInput, match="external data files: base_dir is needed"):
        verify(_matmul(), external)


def test_onnxruntime_errors_are_bad_input():
    double_conv = _model([helper.make_node("Conv", ["x", "w"], ["y"])],
                         [("x", D, [1, 1, 4, 4])], [("y", D, [1, 1, 4, 4])],
                         {"w": np.ones((1, 1, 1, 1))})
    with pytest.raises(BadInput, match="onnxruntime cannot load the reference: .*NOT_IMPLEMENTED"):
        verify(double_conv, double_conv)
    add = _model([helper.make_node("Add", ["a", "b"], ["y"])],
                 [("a", F, ["n"]), ("b", F, ["m"])], [("y", F, ["k"])])
    with pytest.raises(BadInput, match=re.escape(
            "failed to run the reference on given inputs: [ONNXRuntimeError]")):
        verify(add, add, inputs={"a": np.ones(2), "b": np.ones(3)})
    # Draw 1 (n=2, m=3) does not broadcast: skipped with a note; draw 2 (all 1) runs, and a
    # third draw makes up for the skipped one.
    report = verify(add, add)
    assert report.passed and report.runs == 2 and report.method == "whole model"
    assert report.notes[0].startswith("skipped a draw the reference cannot run "
                                      "(seed 0, n=2, m=3, floats normal): [ONNXRuntimeError]")
    assert "Attempting to broadcast an axis by a dimension other than 1. 2 by 3" in report.notes[0]
