"""The check's inputs: valid for every model (indices, shapes, strings, sequences, optionals),
several draws, skipped draws, a candidate that fails where the reference runs, quiet onnxruntime."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import builders
from bnfold.cli import main
from bnfold.verify import random_inputs, run, verify
from bnfold.verify import inputs as inputs_module

F, I64, S, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.STRING, TensorProto.BOOL
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(nodes, inputs, outputs, inits=(), *, opset=17):
    def info(v):
        if isinstance(v, onnx.ValueInfoProto):
            return v
        if v[2] is None:  # any shape
            return helper.make_value_info(v[0], helper.make_tensor_type_proto(v[1], None))
        return helper.make_tensor_value_info(*v)
    graph = helper.make_graph(nodes, "g", [info(v) for v in inputs], [info(v) for v in outputs],
                              [numpy_helper.from_array(np.asarray(a), n)
                               for n, a in dict(inits).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if all(o.type.tensor_type.HasField("shape") or not o.type.HasField("tensor_type")
           for o in graph.output):  # the checker wants the outputs' shapes declared
        onnx.checker.check_model(model)
    return model


def _all_draws_run(model, runs=4):
    """verify(model, model) ran every draw whole: no draw skipped, no region check."""
    report = verify(model, model, runs=runs)
    assert report.passed and report.method == "whole model" and report.runs == runs, report
    assert not report.notes, report.notes
    return report


def _draws(model, count=4):
    return [random_inputs(model, draw=d) for d in range(count)]


# --- integer inputs drawn as the graph uses them ----------------------------------------------

def test_gather_indices_stay_below_the_indexed_dimension():
    # Into an initializer (11 rows), into a graph input along a symbolic axis, through a Cast.
    model = _model(
        [helper.make_node("Gather", ["table", "idx"], ["y"]),
         helper.make_node("Cast", ["idx32"], ["idx64"], to=I64),
         helper.make_node("Gather", ["data", "idx64"], ["z"], axis=1)],
        [("idx", I64, ["n"]), ("idx32", TensorProto.INT32, [4]), ("data", F, [2, "rows"])],
        [("y", F, ["n", 2]), ("z", F, [2, 4])],
        {"table": np.arange(22, dtype=np.float32).reshape(11, 2)},
    )
    for feeds in _draws(model):
        assert 0 <= feeds["idx"].min() and feeds["idx"].max() < 11
        assert feeds["idx32"].max() < feeds["data"].shape[1]
    assert max(f["idx"].max() for f in _draws(model)) > 4  # beyond the old 0..4
    _all_draws_run(model)


@pytest.mark.parametrize("op, axis", [("GatherElements", 1), ("ScatterElements", 0),
                                      ("GatherND", None), ("ScatterND", None)])
def test_gather_and_scatter_indices(op, axis):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    if op.endswith("ND"):
        idx_shape = [2, 1]
    else:
        idx_shape = [3, 4]
    inputs = ["data", "idx"] + (["upd"] if op.startswith("Scatter") else [])
    attrs = {"axis": axis} if axis is not None else {}
    upd_shape = {"ScatterElements": [3, 4], "ScatterND": [2, 4]}.get(op)
    model = _model(
        [helper.make_node(op, inputs, ["y"], **attrs)],
        [("idx", I64, idx_shape)] + ([("upd", F, upd_shape)] if upd_shape else []),
        [("y", F, None)], {"data": data},
    )
    _all_draws_run(model)


def test_onehot_depth_is_positive_and_reshape_gets_a_shape_that_fits():
    model = _model(
        [helper.make_node("OneHot", ["idx", "depth", "values"], ["hot"]),
         helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [("idx", I64, ["n"]), ("depth", I64, [1]), ("x", F, ["a", "b", 6]), ("shape", I64, [3])],
        [("hot", F, None), ("y", F, None)], {"values": np.array([0, 1], np.float32)},
    )
    for feeds in _draws(model):
        assert feeds["depth"].min() >= 2
        assert list(feeds["shape"]) == list(feeds["x"].shape)
    _all_draws_run(model)


def test_reshape_shape_of_another_rank_and_expand_tile_shapes():
    model = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"]),
         helper.make_node("Expand", ["flat", "ones"], ["e"]),
         helper.make_node("Tile", ["e", "reps"], ["y"])],
        [("x", F, ["a", 6]), ("shape", I64, [2]), ("ones", I64, [3]), ("reps", I64, [3])],
        [("y", F, None)],
    )
    feeds = random_inputs(model)
    assert list(feeds["shape"]) == list(feeds["x"].shape)  # the data's own shape
    _all_draws_run(model)


def test_slice_starts_ends_axes_steps_and_topk_k():
    model = _model(
        [helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["s"]),
         helper.make_node("TopK", ["s", "k"], ["y", "i"], axis=-1)],
        [("x", F, ["n", 6]), ("starts", I64, [2]), ("ends", I64, [2]), ("axes", I64, [2]),
         ("steps", I64, [2]), ("k", I64, [1])],
        [("y", F, None), ("i", I64, None)],
    )
    feeds = random_inputs(model)
    assert list(feeds["axes"]) == [0, 1] and list(feeds["steps"]) == [1, 1]
    _all_draws_run(model)


def test_counts_divisors_axes_and_loop_trip_counts():
    body = helper.make_graph(
        [helper.make_node("Add", ["acc", "one"], ["acc_out"]),
         helper.make_node("Identity", ["cond"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("cond", B, []),
         helper.make_tensor_value_info("acc", F, None)],
        [helper.make_tensor_value_info("cond_out", B, []),
         helper.make_tensor_value_info("acc_out", F, None)],
        [numpy_helper.from_array(np.float32(1), "one")],
    )
    model = _model(
        [helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
         helper.make_node("ConstantOfShape", ["dims"], ["c"]),
         helper.make_node("Mod", ["r", "divisor"], ["m"]),
         helper.make_node("Div", ["r", "divisor"], ["d"]),
         helper.make_node("Unsqueeze", ["x", "axes"], ["u"]),
         helper.make_node("ReduceSum", ["u", "axes"], ["rs"]),
         helper.make_node("Loop", ["trips", "keep", "x"], ["looped"], body=body)],
        [("start", I64, []), ("limit", I64, []), ("delta", I64, []), ("dims", I64, [2]),
         ("divisor", I64, []), ("x", F, ["n"]), ("axes", I64, [1]), ("trips", I64, []),
         ("keep", B, [])],
        [("c", F, None), ("m", I64, None), ("d", I64, None), ("rs", F, None),
         ("looped", F, None)],
    )
    for feeds in _draws(model):
        assert feeds["delta"] == 1 and feeds["divisor"] >= 1 and feeds["dims"].min() >= 1
        assert 5 <= feeds["trips"] <= 12  # past the first iterations
    _all_draws_run(model)


# --- strings, sequences, optionals --------------------------------------------------------------

def test_string_inputs_and_outputs():
    model = _model(
        [helper.make_node("Equal", ["s", "word"], ["eq"]),
         helper.make_node("Cast", ["eq"], ["y"], to=F),
         helper.make_node("Identity", ["s"], ["t"])],
        [("s", S, ["n"])], [("y", F, ["n"]), ("t", S, ["n"])],
        {"word": np.array(["s1"], dtype=object)}, opset=19,
    )
    assert random_inputs(model)["s"].tolist() == ["s0", "s1"]
    report = _all_draws_run(model)
    assert [o.name for o in report.outputs] == ["y", "t"]


def _sequence_model():
    seq = helper.make_tensor_sequence_value_info("seq", F, ["n", 3])
    out = helper.make_tensor_sequence_value_info("longer", F, None)
    return _model(
        [helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=0),
         helper.make_node("SequenceInsert", ["seq", "x"], ["longer"]),
         helper.make_node("SequenceAt", ["seq", "pos"], ["first"])],
        [seq, ("x", F, ["n", 3]), ("pos", I64, [])],
        [("y", F, None), out, ("first", F, None)],
    )


def test_sequence_inputs_and_outputs():
    model = _sequence_model()
    feeds = random_inputs(model)
    assert isinstance(feeds["seq"], list) and 1 <= len(feeds["seq"]) <= 2
    assert all(t.dtype == np.float32 and t.shape[1] == 3 for t in feeds["seq"])
    report = _all_draws_run(model)
    names = [o.name for o in report.outputs]
    assert names[0] == "y" and "longer[0]" in names and names[-1] == "first"
    different = _model(  # the same interface; the inserted tensor is x + 1
        [helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=0),
         helper.make_node("Add", ["x", "one"], ["x1"]),
         helper.make_node("SequenceInsert", ["seq", "x1"], ["longer"]),
         helper.make_node("SequenceAt", ["seq", "pos"], ["first"])],
        list(model.graph.input), list(model.graph.output), {"one": np.float32(1)},
    )
    report = verify(model, different)
    assert not report.passed and report.failures
    assert all(o.name.startswith("longer[") for o in report.failures)


def test_optional_inputs_are_fed_their_element():
    opt = helper.make_value_info(
        "opt", helper.make_optional_type_proto(helper.make_tensor_type_proto(F, ["n"])))
    model = _model(
        [helper.make_node("OptionalHasElement", ["opt"], ["has"]),
         helper.make_node("OptionalGetElement", ["opt"], ["y"])],
        [opt], [("has", B, []), ("y", F, ["n"])], opset=18,
    )
    assert random_inputs(model)["opt"].shape == (2,)
    _all_draws_run(model)


# --- draws ---------------------------------------------------------------------------------------

def test_two_draws_by_default_primes_then_ones_and_0_to_255():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, ["batch", "seq", 3])],
                   [("y", F, ["batch", "seq", 3])])
    first, second, third = _draws(model, 3)
    assert first["x"].shape == (2, 5, 3) and second["x"].shape == (1, 1, 3)
    assert first["x"].min() < 0 and 0 <= second["x"].min() and second["x"].max() <= 255
    assert second["x"].max() > 100
    assert third["x"].shape == first["x"].shape and not np.array_equal(third["x"], first["x"])
    report = verify(model, model)
    assert report.runs == 2 and "seq=5" in report.inputs and "uniform 0..255" in report.inputs
    assert verify(model, model, runs=5).runs == 5


def test_a_difference_only_the_wide_draw_reaches_fails_the_check():
    """A candidate that differs only above 100 (as an fp16 overflow on images): the standard
    normal draw passes it, the draw in 0..255 does not."""
    def clipped(high):
        return _model([helper.make_node("Clip", ["x", "low", "high"], ["y"])],
                      [("x", TensorProto.FLOAT16, ["n"])], [("y", TensorProto.FLOAT16, ["n"])],
                      {"low": np.float16(-1e4), "high": np.float16(high)})
    original, candidate = clipped(6e4), clipped(100)
    assert verify(original, candidate, runs=1).passed
    report = verify(original, candidate)
    assert not report.passed and report.outputs[0].max_abs > 1


def test_inputs_are_capped_in_size(monkeypatch):
    monkeypatch.setattr(inputs_module, "INPUT_BYTES_LIMIT", 4 * 1000)
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, ["a", "b", 100])],
                   [("y", F, None)])
    assert random_inputs(model)["x"].nbytes <= 4000
    assert random_inputs(model, dims={"a": 7})["x"].shape[0] == 7  # given sizes are kept


def test_resize_scales_are_ones_not_0_to_255():
    """Regression: scales drawn in 0..255 (draw 2) made Resize/Upsample outputs of 10^9 elements,
    and the backend-model run was OOM-killed."""
    model = _model(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear")],
        [("x", F, [1, 1, 64, 64]), ("scales", F, [4])], [("y", F, None)], opset=13,
    )
    for feeds in _draws(model, 2):
        assert feeds["scales"].tolist() == [1, 1, 1, 1]
    _all_draws_run(model, runs=2)


def test_a_draw_the_reference_cannot_run_is_skipped_and_made_up_for():
    add = _model([helper.make_node("Add", ["a", "b"], ["y"])], [("a", F, ["n"]), ("b", F, ["m"])],
                 [("y", F, None)])
    report = verify(add, add)  # draws 1 and 3 (n=2, m=3) do not broadcast, 2 and 4 (all 1) do
    assert report.passed and report.method == "whole model" and report.runs == 2
    assert len(report.notes) == 2 and all("skipped a draw" in n for n in report.notes)


def test_identical_models_no_draw_runs_regions_0():
    # Reshape to a fixed [2, -1]: fails on odd sizes, and n is 3 (2 is taken), then 1.
    model = _model([helper.make_node("Reshape", ["x", "two"], ["y"])], [("x", F, ["n"])],
                   [("y", F, [2, None])], {"two": np.array([2, -1])})
    report = verify(model, model)
    assert report.passed and report.method == "regions: 0" and not report.regions
    assert "no node differs between the models" in report.notes


def test_candidate_failing_where_the_reference_runs_fails_the_check(tmp_path):
    reference = _model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, ["n", 4])],
                       [("y", F, ["n", 4])])
    candidate = _model([helper.make_node("Reshape", ["x", "shape"], ["r"]),
                        helper.make_node("Relu", ["r"], ["y"])],
                       [("x", F, ["n", 4])], [("y", F, ["n", 4])], {"shape": np.array([2, 4])})
    report = verify(reference, candidate)
    assert not report.passed and report.error.startswith(
        "the candidate fails on inputs the reference runs on: [ONNXRuntimeError]")
    onnx.save(reference, tmp_path / "a.onnx")
    onnx.save(candidate, tmp_path / "b.onnx")
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"),
                                       "--json", "-"])
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["error"].startswith("the candidate fails")
    assert "verification failed" in result.stderr


def test_candidate_onnxruntime_cannot_load_fails_the_check():
    reference = _model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, ["n"])],
                       [("y", F, ["n"])])
    candidate = onnx.ModelProto()
    candidate.CopyFrom(reference)
    candidate.graph.node[0].domain = "no.such.domain"
    candidate.opset_import.append(helper.make_opsetid("no.such.domain", 1))
    report = verify(reference, candidate)
    assert not report.passed and "cannot load the candidate" in report.error


def test_cli_runs_option(tmp_path):
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, ["n"])],
                   [("y", F, ["n"])])
    onnx.save(model, tmp_path / "m.onnx")
    for runs in ("1", "3"):
        result = CliRunner().invoke(
            main, ["verify", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--runs", runs,
                   "--json", "-"])
        assert result.exit_code == 0 and json.loads(result.stdout)["runs"] == int(runs)
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "m.onnx"),
                                       str(tmp_path / "m.onnx"), "--runs", "0"])
    assert result.exit_code == 2


# Runs bnfold commands in one process; prints a marker to stderr after each (and checks the exit
# code), so that a test can tell apart what each wrote there, also onnxruntime's own lines.
_COMMANDS = """
import json, sys
from bnfold.cli import main
for args in json.loads(sys.argv[1]):
    try:
        main(args)
    except SystemExit as done:
        assert not done.code, (args, done.code)
    sys.stderr.write("\\n=== done ===\\n")
    sys.stderr.flush()
    if "--no-verify" in args or args[0] == "inspect":
        assert "onnxruntime" not in sys.modules, f"{args[0]} imported onnxruntime"
"""


def _stderr_of_each(*commands) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _COMMANDS, json.dumps([[str(a) for a in c] for c in commands])],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr.split("=== done ===")[:-1]


def test_onnxruntime_is_imported_only_when_a_check_runs_and_logs_only_with_verbose(tmp_path):
    # An unused initializer makes onnxruntime log a warning when it loads the model.
    model = builders.conv_bn()
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unused"))
    onnx.save(model, tmp_path / "m.onnx")
    fold = ["fold", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx"]
    verify_twice = ["verify", tmp_path / "m.onnx", tmp_path / "m.onnx"]
    outputs = _stderr_of_each(["inspect", tmp_path / "m.onnx"], [*fold, "--no-verify"],
                              fold, [*fold, "-v"], verify_twice, [*verify_twice, "--verbose"])
    logged = ["Removing initializer 'unused'" in text for text in outputs]
    assert logged == [False, False, False, True, False, True]


def test_run_reports_the_whole_onnxruntime_message():
    model = _model([helper.make_node("Reshape", ["x", "two"], ["y"])], [("x", F, ["n"])],
                   [("y", F, [2, None])], {"two": np.array([2, -1])})
    with pytest.raises(Exception, match="onnxruntime failed to run the model: .*Reshape"):
        run(model, {"x": np.ones(3, np.float32)})


@pytest.mark.slow
def test_backend_models_meet_the_targets(tmp_path):
    """onnx's backend models that onnxruntime runs: 0 errors, 0 changed, <= 1 % refused."""
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "backend_models.py"), "--memory-gb", "6",
         "--json", str(tmp_path / "outcomes.json")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
