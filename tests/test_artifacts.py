"""`bnfold artifacts` without the trainer: what will train (`training_plan`), the loss's input, the
versions the trainer reads, the one-line error when onnxruntime-training is missing, and the
names `bnfold insert` reports. The training itself is tests/test_training.py (marked `training`).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from builders import run_unoptimised
from bnfold.artifacts import TRAINER_INSTALL, training_artifacts, training_plan
from bnfold.cli import main
from bnfold.errors import BadInput
from bnfold.insert import insert

ROOT = Path(__file__).resolve().parents[1]
BN = "BatchNormalization"


def mlp(*, final: str | None = "Softmax", classes: int = 2, opset: int = 17,
        ir_version: int = 8, keras_casts: bool = False, listed: bool = False) -> onnx.ModelProto:
    """x[batch, 5] -> dense_1 (Gemm 5->6) -> Relu -> dense_2 (MatMul 6->classes + bias Add)
    [-> final]. `keras_casts`: the MatMul weight reaches it through a no-op Cast, as Keras
    exports it. `listed`: initializers also listed as graph inputs (required in IR 3)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (6, 5)).astype(np.float32), "d1.W"),
             numpy_helper.from_array(rng.normal(0, 0.5, 6).astype(np.float32), "d1.b"),
             numpy_helper.from_array(rng.normal(0, 0.5, (6, classes)).astype(np.float32), "d2.W"),
             numpy_helper.from_array(rng.normal(0, 0.5, classes).astype(np.float32), "d2.b")]
    weight = "d2.W"
    nodes = [helper.make_node("Gemm", ["x", "d1.W", "d1.b"], ["h1"], name="dense_1", transB=1),
             helper.make_node("Relu", ["h1"], ["a1"], name="relu_1")]
    if keras_casts:
        nodes.append(helper.make_node("Cast", ["d2.W"], ["d2.W.cast"], name="cast",
                                      to=TensorProto.FLOAT))
        weight = "d2.W.cast"
    last = "logits" if final else "y"
    nodes += [helper.make_node("MatMul", ["a1", weight], ["m2"], name="dense_2"),
              helper.make_node("Add", ["m2", "d2.b"], [last], name="dense_2/add")]
    if final:
        nodes.append(helper.make_node(final, ["logits"], ["y"], name="final"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])]
    if listed:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    graph = helper.make_graph(
        nodes, "mlp", inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=ir_version)
    onnx.checker.check_model(model, full_check=True)
    return model


def inserted(model=None, **options) -> tuple[onnx.ModelProto, object]:
    return insert(model or mlp(), after=["dense_1"], **options)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --------------------------------------------------------------------------- what trains

def test_plan_freezes_the_running_statistics_and_trains_the_rest():
    model, insertion_report = inserted()
    (ins,) = insertion_report.insertions
    base, report = training_plan(model, loss="cross-entropy")
    assert report.state == [ins.params["mean"], ins.params["var"]]
    assert report.trainable == ["d1.W", "d1.b", ins.params["gamma"], ins.params["beta"],
                                "d2.W", "d2.b"]
    assert report.constants == [] and report.frozen == []
    # The same names as insert reports, and the BN's own inputs.
    assert report.state == insertion_report.state
    assert set(insertion_report.trainable) <= set(report.trainable)
    (bn,) = [n for n in base.graph.node if n.op_type == BN]
    assert list(bn.input[3:5]) == report.state and list(bn.input[1:3]) == insertion_report.trainable


def test_loss_reads_the_input_of_a_final_softmax_and_takes_int64_labels():
    base, report = training_plan(inserted()[0], loss="cross-entropy")
    assert report.logits == "logits" and "Softmax" in report.logits_from
    assert (report.target.name, report.target.dtype, report.target.shape) == (
        "labels", "int64", ["batch"])
    assert report.inputs == ["x", "labels"] and report.outputs == ["y"]
    # The logits become a graph output, typed, for the loss to read; the model's own stays first.
    assert [o.name for o in base.graph.output] == ["y", "logits"]
    logits = base.graph.output[1].type.tensor_type
    assert logits.elem_type == TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in logits.shape.dim] == ["batch", 2]


def test_the_model_is_otherwise_unchanged():
    model = inserted()[0]
    base, _ = training_plan(model, loss="cross-entropy")
    assert [(n.op_type, list(n.input), list(n.output)) for n in base.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    feeds = {"x": np.random.default_rng(1).normal(0, 1, (3, 5)).astype(np.float32)}
    np.testing.assert_array_equal(run_unoptimised(base, feeds)["y"],
                                  run_unoptimised(model, feeds)["y"])


@pytest.mark.parametrize("final, loss, logits, target", [
    ("LogSoftmax", "cross-entropy", "logits", ("labels", "int64", ["batch"])),
    ("Sigmoid", "bce", "logits", ("target", "float32", ["batch", 2])),
    (None, "cross-entropy", "y", ("labels", "int64", ["batch"])),  # the model outputs logits
    (None, "mse", "y", ("target", "float32", ["batch", 2])),
    ("Softmax", "mse", "y", ("target", "float32", ["batch", 2])),  # mse reads the output as is
])
def test_loss_input_by_final_activation(final, loss, logits, target):
    _, report = training_plan(inserted(mlp(final=final))[0], loss=loss)
    assert report.logits == logits
    assert (report.target.name, report.target.dtype, report.target.shape) == target


@pytest.mark.parametrize("final, loss, message", [
    ("Softmax", "bce", "ends in Softmax ('final'): use --loss cross-entropy"),
    ("Sigmoid", "cross-entropy", "ends in Sigmoid ('final'): use --loss bce"),
])
def test_a_loss_that_does_not_fit_the_final_activation_is_refused(final, loss, message):
    with pytest.raises(BadInput, match=re.escape(message)):
        training_plan(inserted(mlp(final=final))[0], loss=loss)


def test_logits_named_explicitly():
    _, report = training_plan(inserted()[0], loss="mse", logits="logits")
    assert (report.logits, report.logits_from) == ("logits", "--logits")
    with pytest.raises(BadInput, match="--logits nope: no node of the main graph computes it"):
        training_plan(inserted()[0], loss="mse", logits="nope")


def test_several_outputs_need_logits_named():
    model = inserted()[0]
    model.graph.output.append(helper.make_tensor_value_info("a1", TensorProto.FLOAT,
                                                            ["batch", 6]))
    with pytest.raises(BadInput, match=r"2 outputs \(y, a1\): name the tensor .* --logits"):
        training_plan(model, loss="cross-entropy")
    _, report = training_plan(model, loss="cross-entropy", logits="logits")
    assert report.outputs == ["y", "a1"]


def test_cross_entropy_needs_batch_by_classes_logits():
    model = inserted()[0]
    model.graph.node.append(helper.make_node("Unsqueeze", ["y", "axes"], ["y3"], name="unsq"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    model.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("y3", TensorProto.FLOAT, ["batch", 1, 2]))
    with pytest.raises(BadInput, match="cross-entropy needs logits \\[batch, classes\\]; y3 has "
                                       "rank 3"):
        training_plan(model, loss="cross-entropy")


def test_softmax_over_the_batch_is_refused():
    model = mlp()
    model.graph.node[-1].attribute.append(helper.make_attribute("axis", 0))
    with pytest.raises(BadInput, match="normalises axis 0"):
        training_plan(model, loss="cross-entropy")


def test_parameters_off_the_loss_path_stay_constants():
    """onnxruntime refuses a trainable tensor the loss does not reach: a second head's weight
    stays a constant (and the logits must be named, with two outputs)."""
    model = inserted()[0]
    model.graph.initializer.append(numpy_helper.from_array(np.ones((5, 3), np.float32), "aux.W"))
    model.graph.node.append(helper.make_node("MatMul", ["x", "aux.W"], ["aux"], name="aux"))
    model.graph.output.append(helper.make_tensor_value_info("aux", TensorProto.FLOAT,
                                                            ["batch", 3]))
    _, report = training_plan(model, loss="cross-entropy", logits="logits")
    assert "aux.W" not in report.trainable and report.constants == ["aux.W"]


def test_weights_through_no_op_casts_are_trainable():
    _, report = training_plan(inserted(mlp(keras_casts=True))[0], loss="cross-entropy")
    assert "d2.W" in report.trainable and "d2.b" in report.trainable


def test_freeze_globs():
    model, insertion_report = inserted()
    _, report = training_plan(model, loss="cross-entropy", freeze=["d1.*", "*/bn.mean"])
    assert report.frozen == ["d1.W", "d1.b"]  # the running mean is state already
    assert "d1.W" not in report.trainable and report.state == insertion_report.state
    with pytest.raises(BadInput, match="--freeze zz\\*: matches no trainable tensor; trainable: "
                                       "d1.W, d1.b"):
        training_plan(model, loss="cross-entropy", freeze=["zz*"])
    with pytest.raises(BadInput, match="nothing left to train"):
        training_plan(model, loss="cross-entropy", freeze=["*"])


def test_ir_version_is_capped_for_the_trainer():
    model = inserted(mlp(ir_version=8))[0]
    model.ir_version = 12  # as onnx >= 1.19 writes it; onnxruntime-training reads 10 at most
    base, report = training_plan(model, loss="cross-entropy")
    assert base.ir_version == 10 and report.ir_version == [12, 10]
    assert model.ir_version == 12  # the input is not touched
    _, report = training_plan(inserted(mlp(ir_version=8))[0], loss="cross-entropy")
    assert report.ir_version is None


@pytest.mark.parametrize("ir_version, opset", [(3, 8), (8, 17)])
def test_initializers_listed_as_inputs_are_unlisted(ir_version, opset):
    """The trainer lists the parameters as inputs itself; a second listing (IR 3, or torch's
    keep_initializers_as_inputs) is a duplicate definition to it. IR 3 requires the listing, so
    the trainer's copy becomes IR 4."""
    model = inserted(mlp(ir_version=ir_version, opset=opset, listed=True))[0]
    if ir_version >= 4:  # insert lists its new initializers in IR < 4 models only
        listed = {i.name for i in model.graph.input}
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                                 for t in model.graph.initializer if t.name not in listed)
    base, report = training_plan(model, loss="cross-entropy")
    assert [i.name for i in base.graph.input] == ["x"] and report.inputs == ["x", "labels"]
    assert base.ir_version == max(ir_version, 4)
    assert report.ir_version == ([3, 4] if ir_version == 3 else None)
    assert len(model.graph.input) == 1 + len(model.graph.initializer)  # the input is untouched


def test_opset_newer_than_the_trainer_is_converted_and_computes_the_same():
    model = inserted(mlp(opset=22, ir_version=10))[0]
    base, report = training_plan(model, loss="cross-entropy")
    assert report.opset == [22, 21]
    assert [o.version for o in base.opset_import if o.domain in ("", "ai.onnx")] == [21]
    feeds = {"x": np.random.default_rng(2).normal(0, 1, (3, 5)).astype(np.float32)}
    np.testing.assert_allclose(run_unoptimised(base, feeds)["y"],
                               run_unoptimised(model, feeds)["y"], rtol=1e-6, atol=1e-7)


def test_the_training_form_is_set_to_inference_mode_for_the_trainer():
    model, insertion_report = inserted(training=True)
    (ins,) = insertion_report.insertions
    base, report = training_plan(model, loss="cross-entropy")
    assert report.dropped_outputs == ins.running_outputs
    assert report.outputs == ["y"]
    (bn,) = [n for n in base.graph.node if n.op_type == BN]
    assert len(bn.output) == 1 and not any(a.name == "training_mode" and a.i for a in bn.attribute)
    assert report.state == insertion_report.state


def test_statistics_read_by_a_node_are_refused():
    model, insertion_report = inserted(training=True)
    (ins,) = insertion_report.insertions
    model.graph.node.append(helper.make_node("Identity", [ins.running_outputs[0]], ["peek"]))
    model.graph.output.append(helper.make_tensor_value_info("peek", TensorProto.FLOAT, [6]))
    with pytest.raises(BadInput, match="in training mode, and a node reads its running statistics"):
        training_plan(model, loss="cross-entropy", logits="logits")


def test_unknown_loss_and_optimizer():
    with pytest.raises(BadInput, match="unknown loss 'hinge': choose from cross-entropy, mse, bce"):
        training_plan(inserted()[0], loss="hinge")
    with pytest.raises(BadInput, match="unknown optimizer 'lamb': choose from adamw, sgd"):
        training_artifacts(inserted()[0], "unused", loss="mse", optimizer="lamb")


# --------------------------------------------------------------------------- without the trainer

@pytest.fixture
def no_trainer(monkeypatch):
    """onnxruntime-training absent, as in the main environment (whichever this one is)."""
    monkeypatch.setitem(sys.modules, "onnxruntime.training", None)


def test_missing_trainer_is_one_line_exit_2_and_writes_nothing(tmp_path, no_trainer):
    path = tmp_path / "model.onnx"
    onnx.save(inserted()[0], path)
    result = invoke("artifacts", path, "-o", tmp_path / "out", "--loss", "cross-entropy")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("bnfold: error: ")
    assert "onnxruntime-training" in result.stderr and TRAINER_INSTALL in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import onnxruntime.training"],
                   capture_output=True).returncode == 0,
    reason="onnxruntime-training is installed here")
def test_missing_trainer_in_a_real_process(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(inserted()[0], path)
    done = subprocess.run([sys.executable, "-m", "bnfold", "artifacts", str(path), "-o",
                           str(tmp_path / "out"), "--loss", "mse"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert re.fullmatch(r"bnfold: error: bnfold artifacts needs onnxruntime-training, .*\n",
                        done.stderr)


def test_bad_usage_is_exit_2(tmp_path):
    result = invoke("artifacts", tmp_path / "missing.onnx", "-o", tmp_path / "out",
                    "--loss", "mse")
    assert result.exit_code == 2
    result = invoke("artifacts", tmp_path / "missing.onnx", "-o", tmp_path / "out",
                    "--loss", "hinge")
    assert result.exit_code == 2 and "'hinge' is not one of" in result.output


# --------------------------------------------------------------------------- insert's report

def test_insert_report_names_state_and_trainable_tensors(tmp_path):
    src, out, report_path = tmp_path / "m.onnx", tmp_path / "m.bn.onnx", tmp_path / "r.json"
    onnx.save(mlp(), src)
    result = invoke("insert", src, "-o", out, "--all", "--json", report_path)
    assert result.exit_code == 0, result.output
    model = onnx.load(out)
    bns = [n for n in model.graph.node if n.op_type == BN]
    assert len(bns) == 2
    trainable = [name for bn in bns for name in bn.input[1:3]]
    state = [name for bn in bns for name in bn.input[3:5]]
    data = json.loads(report_path.read_text())
    assert data["trainable"] == trainable and data["state"] == state
    initializers = {t.name for t in model.graph.initializer}
    assert set(trainable + state) <= initializers
    assert f"trainable (scale, shift): {', '.join(trainable)}" in result.stderr
    assert re.search(r"state \(running mean, variance; the trainer updates them, freeze them "
                     r"for the optimizer\): " + re.escape(", ".join(state)), result.stderr)


# --------------------------------------------------------------------------- the README

def training_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Train an inserted model")[1]
    section = section.split("\n## ")[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ")]


def test_ci_installs_the_readme_training_environment():
    install = next(c for c in training_commands() if "onnxruntime-training-cpu" in c)
    packages = shlex.split(install.split("pip install ", 1)[1])
    ci = (ROOT / ".ci" / "run").read_text()
    line = next(line for line in ci.splitlines() if "onnxruntime-training-cpu" in line)
    assert set(packages) <= set(shlex.split(line.split("pip\" install ", 1)[1]))
    assert TRAINER_INSTALL.split("pip install ", 1)[1] in install
    assert "-m pytest -m training" in ci and "install --no-deps ." in ci
