"""The round trip of `bnfold insert --training`: the ONNX training-mode form (BN-15 training_mode=1,
updated running statistics as graph outputs) is "trained" as a loop that runs the graph does it
(statistics fed back, scale and shift moved), then `bnfold fold --training-to-inference` returns
the inference model: statistics outputs dropped and reported, every BN folded, verified.

Reference: the inference-mode insertion (`bnfold insert` without --training) of the same model,
given the same parameters. Batch 3 and sequence 5 differ from every feature count.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from builders import GraphBuilder, count_ops, run_unoptimised
from bnfold.cli import main
from bnfold.fold import fold, to_inference_mode
from bnfold.insert import insert

BN = "BatchNormalization"


def dense_mlp(rank: int, opset: int = 17) -> onnx.ModelProto:
    """x[batch, (seq,) 6] -> dense_1 (MatMul 6->4 + bias) -> Relu -> dense_2 (4->2) -> y."""
    b = GraphBuilder(opset=opset, seed=3)
    h = b.input("x", ["batch", 6] if rank == 2 else ["batch", "seq", 6])
    for i, (k, n) in enumerate([(6, 4), (4, 2)], start=1):
        h = b.node("MatMul", [h, b.weight(f"dense_{i}.W", [k, n], fan_in=k)], name=f"dense_{i}")
        h = b.node("Add", [h, b.weight(f"dense_{i}.b", [n], fan_in=1)], name=f"dense_{i}/add",
                   outputs=["y"] if i == 2 else None)
        if i == 1:
            h = b.node("Relu", [h], name="relu_1")
    b.output("y")
    return b.build()


def small_cnn() -> onnx.ModelProto:
    """x[batch, 3, 9, 7] -> conv_1 (3->4, pad 1) -> Relu -> conv_2 (4->6, no pad) -> y."""
    b = GraphBuilder(seed=4)
    h = b.input("x", ["batch", 3, 9, 7])
    h = b.node("Conv", [h, b.weight("conv_1.W", [4, 3, 3, 3]), b.weight("conv_1.b", [4], fan_in=1)],
               name="conv_1", pads=[1, 1, 1, 1])
    h = b.node("Relu", [h], name="relu_1")
    b.node("Conv", [h, b.weight("conv_2.W", [6, 4, 3, 3]), b.weight("conv_2.b", [6], fan_in=1)],
           name="conv_2", outputs=["y"])
    b.output("y")
    return b.build()


FORMS = {  # name: (model, insert options, input shape)
    "dense": (lambda: dense_mlp(2), dict(after=["dense_1"]), (3, 6)),
    "dense-before-activation": (lambda: dense_mlp(2), dict(after=["dense_1"],
                                                           before_activation=True), (3, 6)),
    "dense-rank3-transposed": (lambda: dense_mlp(3), dict(after=["dense_1"]), (3, 5, 6)),
    "dense-opset13-upgraded": (lambda: dense_mlp(2, opset=13), dict(after=["dense_1"]), (3, 6)),
    "conv": (small_cnn, dict(ops=["Conv"], after=["conv_1"]), (3, 3, 9, 7)),
    "all-layers": (lambda: dense_mlp(2), dict(all_layers=True), (3, 6)),
}


def set_initializers(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    for t in model.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(
                values[t.name].astype(numpy_helper.to_array(t).dtype), t.name))


def train_in_the_graph(model: onnx.ModelProto, report, shape, steps: int = 3) -> dict:
    """What a loop running the training form does: each batch's updated running statistics
    (graph outputs) are written back; scale and shift move as an optimizer would move them."""
    rng = np.random.default_rng(7)
    values = {}
    for step in range(steps):
        got = run_unoptimised(model, {"x": rng.normal(0.5, 1.5, shape).astype(np.float32)})
        for ins in report.insertions:
            values[ins.params["mean"]], values[ins.params["var"]] = (
                got[name] for name in ins.running_outputs)
            n = ins.features
            values[ins.params["gamma"]] = rng.uniform(0.5, 2.0, n) * np.where(
                rng.random(n) < 0.3, -1, 1)
            values[ins.params["beta"]] = rng.normal(0, 1, n)
        set_initializers(model, values)
    for ins in report.insertions:  # training moved them
        assert not np.allclose(values[ins.params["mean"]], 0)
        assert not np.allclose(values[ins.params["var"]], 1)
    return values


@pytest.mark.parametrize("form", list(FORMS))
def test_training_form_round_trip_through_fold(tmp_path, form):
    build, options, shape = FORMS[form]
    original = build()
    training, report = insert(original, training=True, **options)
    statistics = [name for ins in report.insertions for name in ins.running_outputs]
    assert [o.name for o in training.graph.output] == ["y"] + statistics
    values = train_in_the_graph(training, report, shape)
    path, out, report_path = tmp_path / "t.onnx", tmp_path / "f.onnx", tmp_path / "r.json"
    onnx.save(training, path)

    result = CliRunner().invoke(main, ["fold", str(path), "-o", str(out),
                                       "--training-to-inference", "--json", str(report_path)])

    assert result.exit_code == 0, result.output
    assert "verification passed" in result.stderr
    dropped = f"dropped the running-statistics outputs {', '.join(statistics)}"
    assert dropped in result.stderr
    data = json.loads(report_path.read_text())
    assert any(dropped in note for note in data["notes"])
    assert data["folded"] == len(report.insertions) and data["kept"] == 0
    folded = onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    assert count_ops(folded)[BN] == 0
    assert [o.name for o in folded.graph.output] == ["y"]
    # The same numbers as the inference-mode insertion with the trained parameters.
    inference, _ = insert(original, **options)
    set_initializers(inference, values)
    feeds = {"x": np.random.default_rng(9).normal(0.5, 1.5, shape).astype(np.float32)}
    expected = run_unoptimised(inference, feeds)["y"]
    np.testing.assert_allclose(run_unoptimised(folded, feeds)["y"], expected,
                               rtol=1e-4, atol=1e-5 * max(1.0, np.abs(expected).max()))


def test_to_inference_mode_drops_the_statistics_outputs():
    training, report = insert(dense_mlp(2), after=["dense_1"], training=True)
    inference = to_inference_mode(training)
    assert [o.name for o in inference.graph.output] == ["y"]
    (bn,) = [n for n in inference.graph.node if n.op_type == BN]
    assert len(bn.output) == 1 and not [a for a in bn.attribute if a.name == "training_mode"]
    assert len(training.graph.output) == 3  # the input is not touched


def test_statistics_a_node_reads_keep_the_bn_in_training_mode():
    training, report = insert(dense_mlp(2), after=["dense_1"], training=True)
    (ins,) = report.insertions
    peek = onnx.helper.make_node("Identity", [ins.running_outputs[0]], ["peek"], name="peek")
    training.graph.node.append(peek)
    training.graph.output.append(onnx.helper.make_tensor_value_info("peek", 1, [4]))
    folded, fold_report = fold(training, training_to_inference=True)
    assert count_ops(folded)[BN] == 1 and "training mode" in fold_report.kept[0].reason
    assert [o.name for o in folded.graph.output] == [o.name for o in training.graph.output]
    assert fold_report.notes == ["nothing to fold: every batch norm kept"]  # nothing dropped
